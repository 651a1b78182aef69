"""LafitE (Yin et al., 2023): latent DDIM on pretrained features with memory-bank feature editing."""
