"""Stage 2, frontend: the PyTorch model traced (``torch.export``), its shifts rewritten into
slicing with named cache inputs and outputs, and the same step exported to ONNX.
"""
