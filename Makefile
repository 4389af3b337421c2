# autocompress: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_DIR ?= runs/demo
DEMO_MODEL ?= fmnist_cnn
DEMO_EPOCHS ?= 15
DEMO_TARGET ?= params=12x
STAMP := $(VENV)/.installed

.PHONY: demo test install data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Fashion-MNIST (the idx files in /usr/share/datasets/fashion-mnist) when apt-get is there.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

demo: install data
	$(VENV)/bin/autocompress train --model $(DEMO_MODEL) --dataset fashion-mnist --epochs $(DEMO_EPOCHS) \
		--out $(RUN_DIR)/base.pt --skip-if-exists
	$(VENV)/bin/autocompress inspect $(RUN_DIR)/base.pt
	$(VENV)/bin/autocompress compress $(RUN_DIR)/base.pt --target $(DEMO_TARGET) --out $(RUN_DIR)/compress --resume-if-exists

test: install data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
