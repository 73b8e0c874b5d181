"""attnserve export: committed checkpoints -> verified ONNX artifacts with a manifest."""
