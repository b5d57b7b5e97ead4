#!/usr/bin/env bash
# Runs the suite; pytest's exit code 5 (no tests collected) is a failure here, not a pass.
set -uo pipefail
VPY="${1:-.venv/bin/python}"
"$VPY" -m pytest -q "${@:2}"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
