"""The Open Inference Protocol (KServe v2 / Triton): tensor codec and routes."""
