VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokensieve-installed

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

# torch first, from the pinned version, so nothing later can pull a CUDA build. The lmms-eval extra
# brings PyPI's torchvision, a build that does not import beside the CPU torch: it is removed then
# (nothing of tokensieve needs it; lmms-eval's LLaVA wrapper runs without it).
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,lmms-eval]"
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2

demo: $(STAMP)
	$(PY) -m tokensieve.cli demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
