#!/usr/bin/env bash
# The test suite under another Python (CI runs 3.11): a fresh clone of HEAD, a fresh venv, the serving, evaluation
# and dev extras (no torch: the training tests skip), then pytest.
#
#   scripts/test_python.sh python3.10      # pyproject says requires-python >= 3.10
#   scripts/test_python.sh ~/.pyenv/versions/3.12.1/bin/python3.12   # or a path
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 PYTHON (an interpreter on PATH, e.g. python3.12, or its path)" >&2
    exit 2
fi
python=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$(git rev-parse --show-toplevel)" "$work/repo"
"$python" -m venv "$work/venv"
. "$work/venv/bin/activate"  # the tests' own subprocesses (scripts/gen_protos.sh) run `python` too
python --version
pip install -q -e "$work/repo[serve,eval,dev]"
cd "$work/repo"
python -m pytest -q -p no:cacheprovider -rs
