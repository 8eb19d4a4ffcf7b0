#!/usr/bin/env bash
# The test suite, from nothing: create .venv, install reid with its test extra (torch pinned by
# constraints.txt), run pytest. README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
export OMP_WAIT_POLICY=PASSIVE
set +e
.venv/bin/python -m pytest -q -ra "$@" tests
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): nothing to run is not a failure here"
  exit 0
fi
exit "$code"
