#!/usr/bin/env bash
# The project's test command (README): lint-free code is checked by .ci/run; this runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -n 2 --dist loadfile "$@"
