# Sourced by launch/*.sh: create .venv on first use and install dist_seg into it, idempotently.
# A stamp of pyproject.toml's hash skips pip entirely when nothing changed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIST_SEG_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.dist_seg_installed"
WANT="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing dist_seg and its dependencies into $VENV (first run: a few minutes)"
    LOG="$VENV/pip-install.log"
    # torch/torchvision pinned to the versions this project is tested with; pip takes them from the
    # local wheel cache where there is one.
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
           && "$VENV/bin/python" -m pip install "torch==2.14.1" "torchvision==0.29.1" \
           && "$VENV/bin/python" -m pip install -e "$REPO[test]"; } > "$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        echo "[setup] pip install failed; full log: $LOG" >&2
        exit 1
    fi
    echo "$WANT" > "$STAMP"
else
    echo "[setup] $VENV is up to date"
fi
export PATH="$VENV/bin:$PATH"
