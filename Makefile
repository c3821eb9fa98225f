# `make demo` and `make test` each create .venv and install the project when needed (the exact versions of
# constraints.txt); `make test-lower-bounds` reruns the API, Hub and invariant tests with timm at its declared
# lower bound, in .venv-lower: that timm over the packages of .venv (nothing else is reinstalled).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOWER := .venv-lower
LOWER_TIMM := 1.0.22

.PHONY: install demo test test-lower-bounds clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-netmerge demo

test: $(STAMP)
	$(PY) -m pytest -q

test-lower-bounds: $(STAMP)
	test -x $(LOWER)/bin/python || python3 -m venv $(LOWER)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(LOWER)/bin/python -c 'import site; print(site.getsitepackages()[0])')/netmerge-base.pth"
	$(LOWER)/bin/python -m pip install -q --no-deps 'timm==$(LOWER_TIMM)'
	$(LOWER)/bin/python -c "import timm; assert timm.__version__ == '$(LOWER_TIMM)', timm.__version__"
	$(LOWER)/bin/python -m pytest -q -p no:cacheprovider tests/test_api.py tests/test_hub.py tests/test_invariants.py

clean:
	rm -rf demo_output .pytest_cache $(LOWER)
