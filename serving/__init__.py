"""The center: a Ray Serve application (ingress, preprocessing, ONNX runners)."""

__all__: list[str] = []
