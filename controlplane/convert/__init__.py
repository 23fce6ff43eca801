"""`cpctl convert`: a model (TorchScript, ONNX, or a Python factory of an nn.Module) to a Triton repository entry.

`source` reads the model and its tensor signature, `entry` writes one Triton model per precision (model file,
config.pbtxt, a Python-backend model.py from `serve_torch` or `serve_onnx`), `verify` loads them into a real
tritonserver and compares their outputs with the source's. torch and onnx are imported only here (the
`models` extra of pyproject.toml).
"""
