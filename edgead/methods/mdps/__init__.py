"""MDPS: masked diffusion posterior sampling (Wu et al., 2024)."""
