# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The C++ kernels (src/llmclock/csrc), built by setup.py at install; rebuilt here when a source changes.
KERNELS := src/llmclock/_kernels_base.so

.PHONY: setup demo demo-finetune test bench clean

setup: $(STAMP) $(KERNELS)

# Reinstall only when the project's requirements change. torch==2.13.0 first: a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,hf,ray]'
	touch $(STAMP)

$(KERNELS): $(wildcard src/llmclock/csrc/*) | $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(KERNELS)

demo: setup
	$(BIN)/llmclock demo

# the demo, then its second act: LoRA fine-tuning on docstring summarization, ROUGE-L before/after
demo-finetune: setup
	$(BIN)/llmclock demo --finetune-minutes 3

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/llmclock/_kernels_*.so
