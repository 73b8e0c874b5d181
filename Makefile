# Two commands do everything on a fresh clone with Python 3.11 and make:
#   make serve   install, export the trained models to ONNX if needed, and serve them
#   make test    install everything into .venv and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install test lint tools serve bench-http gpu-check
.DEFAULT_GOAL := help

help:
	@echo "make serve [DEVICE=cuda] | make test | make lint | make install | make bench-http | make gpu-check"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Everything (serve, export, bench, tests); reinstalled when the dependency list changes.
$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps kserve==0.21.0  # its pins (protobuf<7, psutil<6) are older than ours; imports: see pyproject
	touch $@

install: $(VENV)/.dev-installed

test: install tools
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

# Prometheus (prometheus + promtool) for tests/deploy. Installed with apt-get when missing and running as root (CI);
# otherwise those tests skip and say why. The Debian package's own service (port 9090) is stopped and disabled:
# the tests start their own Prometheus on a free loopback port.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing prometheus (apt-get) for tests/deploy"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	      >/dev/null) || echo "apt-get install prometheus failed: tests/deploy Prometheus tests will skip"; \
	    (systemctl disable --now prometheus || service prometheus stop) >/dev/null 2>&1 || true; \
	  else echo "promtool not on PATH and not root: tests/deploy Prometheus tests will skip (apt-get install prometheus)"; \
	  fi; }
	@# Chromium (driven by Playwright for tests/service/test_demo_browser.py; Playwright's own browser download is
	@# not used) and DejaVu Sans (the font service/protocols/v1/pictures.py draws labels with, accents and ¿¡ included).
	@{ command -v chromium >/dev/null 2>&1 && [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and fonts-dejavu-core (apt-get) for the demo browser test and the pictures"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium fonts-dejavu-core >/dev/null) \
	      || echo "apt-get install chromium fonts-dejavu-core failed: the browser test will skip"; \
	  else echo "chromium not on PATH and not root: tests/service/test_demo_browser.py will skip" \
	    "(apt-get install chromium fonts-dejavu-core)"; \
	  fi; }

# Serving plus the exporter (the service exports missing artifacts in a subprocess; torch never enters it).
$(VENV)/.serve-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[serve,export]'
	touch $@

# make serve SERVE_ARGS="--port 8001 --metrics-port 8090 --front-metrics-port 8091"  (8081 is the front's metrics port)
# make serve DEVICE=cuda: serve on the GPU from .venv-gpu, which holds onnxruntime-gpu (pinned in the gpu extra,
# CUDA 13 / cuDNN 9 libraries as pip wheels) and never the CPU onnxruntime; missing artifacts are exported by the
# CPU venv's Python (torch and the exporter live there). Needs an NVIDIA driver for CUDA 13; without a working
# CUDA provider `attnserve serve --device cuda` exits at once, saying why.
DEVICE ?= auto
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin

$(GPU_BIN)/python:
	$(PYTHON) -m venv $(GPU_VENV)

$(GPU_VENV)/.gpu-installed: pyproject.toml constraints.txt | $(GPU_BIN)/python
	$(GPU_BIN)/python -m pip install -q -c constraints.txt -e '.[gpu]'
	@# The install refuses nothing by itself: check that no CPU onnxruntime came along (the service also checks).
	$(GPU_BIN)/python -c "from service.runtime.sessions import check_install; check_install()"
	touch $@

ifeq ($(DEVICE),cuda)
serve: $(GPU_VENV)/.gpu-installed $(VENV)/.serve-installed
	ATTNSERVE_EXPORT_PYTHON=$(abspath $(BIN)/python) $(GPU_BIN)/attnserve serve --device cuda $(SERVE_ARGS)
else
serve: $(VENV)/.serve-installed
	$(BIN)/attnserve serve --device $(DEVICE) $(SERVE_ARGS)
endif

# Against a running `make serve` (another terminal): the HTTP table of docs/BENCHMARKS.md (bench/http.py).
bench-http: $(VENV)/.serve-installed
	$(BIN)/attnserve bench http $(BENCH_ARGS)

# The GPU checks (tests/gpu and the three benchmarks with --device cuda) as one script; see its header and
# docs/BENCHMARKS.md "GPU". `make gpu-check CHECK_DEVICE=cpu` runs it end to end here (GPU tests skip, short benches).
CHECK_DEVICE ?= cuda
gpu-check: $(VENV)/.dev-installed
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --device $(CHECK_DEVICE)
