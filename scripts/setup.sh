#!/usr/bin/env bash
# Creates a virtual environment with dsmoe and its test extra.
#
#   bash scripts/setup.sh            .venv: the exact versions of requirements/lock-cpu.txt (the default)
#   bash scripts/setup.sh --latest   .venv-latest: the newest versions pyproject.toml's ranges allow
#   bash scripts/setup.sh --lock     as --latest, then writes those versions into requirements/lock-cpu.txt
#
# torch is installed first and only when the environment has none: a bare `torch` requirement would pull GBs of
# CUDA wheels, and an existing (e.g. GPU) build is kept. Every step uses pip; `pip check` closes the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") MODE=locked; VENV=${VENV:-.venv} ;;
  --latest) MODE=latest; VENV=${VENV:-.venv-latest} ;;
  --lock) MODE=update; VENV=${VENV:-.venv-latest} ;;
  *) echo "usage: bash scripts/setup.sh [--latest | --lock]" >&2; exit 2 ;;
esac
LOCK=requirements/lock-cpu.txt
NODEPS=requirements/extras-nodeps.txt
PYTHON=${PYTHON:-python3}
if [ "$MODE" != locked ]; then rm -rf "$VENV"; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip"
spec() {  # the requirement of package $1 in pyproject.toml
  "$PY" -c "import sys, tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print(next(r for r in d if r.split('>')[0].split('<')[0].split('=')[0].strip() == sys.argv[1]))" "$1"
}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ "$MODE" = locked ]; then torch_req=$(grep -E '^torch==' "$LOCK"); else torch_req=$(spec torch); fi
  echo "[setup] installing ${DSMOE_TORCH:-$torch_req} (CPU build where the index offers one) ..."
  $PIP install -q "${DSMOE_TORCH:-$torch_req}"
fi
if [ "$MODE" = locked ]; then
  echo "[setup] installing the locked versions of $LOCK ..."
  grep -vE '^torch==' "$LOCK" > "$VENV/lock-no-torch.txt"
  $PIP install -q --no-deps -r "$VENV/lock-no-torch.txt"
  $PIP install -q --no-deps -e .
else
  echo "[setup] installing dsmoe with the newest versions its ranges allow ..."
  $PIP install -q --upgrade --upgrade-strategy eager -e ".[test]"
fi
$PIP install -q --no-deps -r "$NODEPS"
NODEPS_NAMES=$(grep -vE '^\s*(#|$)' "$NODEPS" | sed -E 's/==.*//' | paste -sd'|')
# pip check, except for the --no-deps extras (their own declared dependencies are left out on purpose)
broken=$($PIP check 2>&1 | grep -vE "^($NODEPS_NAMES) |^No broken requirements" || true)
if [ -n "$broken" ]; then echo "[setup] inconsistent environment:"; echo "$broken"; exit 1; fi
if [ "$MODE" = update ]; then
  {
    echo "# Exact versions scripts/setup.sh installs (python $("$PY" -c 'import platform; print(platform.python_version())'), CPU)."
    echo "# Regenerate with: make lock   (the newest versions pyproject.toml allows; then run make test)"
    $PIP freeze --exclude-editable | grep -viE "^($NODEPS_NAMES)==" \
      | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
  } > "$LOCK"
  echo "[setup] wrote $LOCK"
fi
echo "[setup] done ($VENV): $("$PY" -c 'import torch, deepspeed, transformers, datasets; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__, "| datasets", datasets.__version__)' 2>/dev/null | tail -1)"
