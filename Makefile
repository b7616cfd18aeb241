# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .setup.stamp

.PHONY: setup demo test lint bench vllm-setup

$(STAMP): pyproject.toml Makefile scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	dsla demo

test: $(STAMP)
	@$(MAKE) --no-print-directory vllm-setup || echo "make test: the vLLM environment could not be built;" \
		"the vLLM plugin's tests are skipped" >&2
	$(PYTHON) -m pytest -q tests

lint: $(STAMP)
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# vLLM with the dsla-hf plugin in its own environment, .venv-vllm (vLLM pins an older Transformers).
VLLM_STAMP := .venv-vllm/.setup.stamp
$(VLLM_STAMP): pyproject.toml scripts/setup_vllm.sh
	PYTHON=$(PYTHON) bash scripts/setup_vllm.sh
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)
