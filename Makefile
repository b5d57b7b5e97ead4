# Two commands on a fresh machine (each does its own set-up):
#   make demo   DFP16 training on Fashion-MNIST, compared with FP32 (and bf16 where the CPU has it)
#   make test   the test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.dfpgen-installed
DATA    ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@bash scripts/get_data.sh $(DATA)

demo: setup data
	$(VPY) examples/train_fashion_mnist.py --compare --data $(DATA)

test: setup data
	bash scripts/run_tests.sh $(VPY)

bench: setup
	$(VPY) benchmarks/layers.py
	$(VPY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build dist *.egg-info
