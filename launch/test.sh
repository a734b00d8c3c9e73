#!/usr/bin/env bash
# Run the whole test suite: creates/updates .venv, then pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
exec python -m pytest "$@"
