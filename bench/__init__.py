"""Benchmarks and their baselines: programs that print tables (`attnserve bench ...`), apart from the product.

Each `attnserve bench NAME` runs `bench/NAME.py:main` (service/cli.py's COMMANDS table); helpers that run in
their own process or server sit beside the command that starts them:

- `runtime.py`: ONNX Runtime vs PyTorch eager vs CTranslate2 on the same weights; `runtime_workers.py` runs one
  backend per process, `ct2.py` converts our checkpoint to CTranslate2.
- `http.py`: the running service vs a single-process FastAPI + ONNX Runtime server, `baseline_server.py`.

Nothing in `models/`, `export/` or `service/` imports this package (service/cli.py only names its commands), and
the serving image does not copy it. Benchmarks may import those layers: they measure them. Tests: `tests/bench/`.
"""
