#!/usr/bin/env bash
# Install conus and its pinned dependencies into the active Python environment.
# Used by the README, .ci/run and the Dockerfile alike.
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   runtime + test tools (pytest, hypothesis, ruff, hadolint)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra=""
if [[ "${1:-}" == "--test" ]]; then extra="[test]"; fi
python -m pip install --no-cache-dir --upgrade "pip<27" >/dev/null
python -m pip install --no-cache-dir -c "$here/constraints.txt" -e "$here$extra"
