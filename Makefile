# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-finetune test bench clean

setup: $(STAMP)

# Reinstall only when the project's requirements change. torch==2.13.0 first: a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

demo: setup
	$(BIN)/llmclock demo

# the demo, then its second act: LoRA fine-tuning on docstring summarization, ROUGE-L before/after
demo-finetune: setup
	$(BIN)/llmclock demo --finetune-minutes 3

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
