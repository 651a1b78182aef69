"""score-resilience: restoration error of a score U-Net (Shin et al., ICCV 2023)."""
