# Two commands a new user needs (README "Quick start"); both set up .venv on first use.
#   make train   - the main job on the packaged default data (CPU is fine)
#   make test    - the test suite (pytest-xdist, 2 workers)
PY := .venv/bin/python
ARGS ?=

.PHONY: setup train test bench clean-venv
setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

train: setup
	$(PY) launch/train.py $(ARGS)

test: setup
	$(PY) -m pytest -n 2 -q tests $(ARGS)

bench: setup
	$(PY) launch/bench_moe.py $(ARGS)

clean-venv:
	rm -rf .venv
