# autocompress: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_DIR ?= runs/demo
DEMO_MODEL ?= fmnist_cnn
DEMO_EPOCHS ?= 15
# The committed baseline was made by: autocompress train --model fmnist_cnn --dataset fashion-mnist --epochs 15
BASE ?= assets/fmnist_cnn_base.pt
DEMO_CONFIG ?= configs/demo.yaml
DEMO_TARGET ?=
STAMP := $(VENV)/.installed

.PHONY: demo test install data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Fashion-MNIST (the idx files in /usr/share/datasets/fashion-mnist) when apt-get is there.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

demo: install data
	$(VENV)/bin/autocompress train --model $(DEMO_MODEL) --dataset fashion-mnist --epochs $(DEMO_EPOCHS) \
		--out $(BASE) --skip-if-exists
	$(VENV)/bin/autocompress inspect $(BASE) --latency-runs 10
	$(VENV)/bin/autocompress compress $(BASE) --config $(DEMO_CONFIG) $(if $(DEMO_TARGET),--target $(DEMO_TARGET)) \
		--out $(RUN_DIR)/compress$(if $(DEMO_TARGET),-$(DEMO_TARGET)) --resume-if-exists

test: install data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
