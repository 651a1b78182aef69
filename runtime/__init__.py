"""edgead.runtime: torch-free inference on exported detectors (numpy, OpenCV, ONNX Runtime or TensorRT).

Nothing in this package imports torch; ``tests/runtime/test_torch_free.py`` proves it.
"""
