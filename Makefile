# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, train on handwritten digits, test and predict
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DIGITS := data/digits

.PHONY: demo test install clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes. The byte-compilation is what pip does unless
# PYTHONDONTWRITEBYTECODE is set: without it every `sedense` command recompiles torch and Lightning
# (about 7 s more per command on a 2-core machine).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	-$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null
	touch $@

install: $(VENV)/.installed

# Lint, then the suite on every core (pytest-xdist); most tests run the command in-process. The tests that
# time themselves or start several processes share one worker (xdist_group), so they never run side by side.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

$(DIGITS):
	$(BIN)/sedense digits $(DIGITS) --test_out $(DIGITS)-test

demo: install $(DIGITS)
	$(BIN)/sedense fit --config configs/digits.yaml
	$(BIN)/sedense test --config configs/digits.yaml --ckpt_path best --data.test_root $(DIGITS)-test
	$(BIN)/sedense predict --ckpt_path best --data.predict_root $(DIGITS)-test

clean-demo:
	rm -rf $(DIGITS) $(DIGITS)-test
