"""edgead.export: trace a method's inference graph to ONNX (FP32 and FP16), check parity, build TensorRT engines."""
