"""edgead: edge deployment toolkit for unsupervised visual anomaly detection.

The top-level package imports nothing heavy, so ``edgead.runtime`` stays importable without torch.
"""

__version__ = "0.1.0"
