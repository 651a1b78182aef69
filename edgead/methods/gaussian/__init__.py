"""gaussian: Mahalanobis distance to Gaussians on pre-trained features, opposite PCA (Wang et al., 2022)."""
