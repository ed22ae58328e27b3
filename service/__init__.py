"""Serve time: model repository, ONNX Runtime, the factor-code codec and the gRPC server (no torch)."""
