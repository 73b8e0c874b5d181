"""attnserve serving layer: ONNX Runtime + Ray Serve. Never imports torch or models/."""
