"""Datasets, preprocessing, synthetic defects and pseudo-anomalies. Submodules are torch-free."""
