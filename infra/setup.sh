#!/usr/bin/env bash
# One-time (idempotent) set-up: ffmpeg/ffprobe, uv, and the locked environment in .venv/.
# Re-running it on a set-up machine takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

need_ffmpeg=0
command -v ffmpeg >/dev/null 2>&1 || need_ffmpeg=1
command -v ffprobe >/dev/null 2>&1 || need_ffmpeg=1
if [ "$need_ffmpeg" = 1 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing ffmpeg with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    echo "[setup] installing ffmpeg with sudo apt-get"
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "[setup] ffmpeg and ffprobe are required but not on PATH." >&2
    echo "        Install them first: 'apt-get install ffmpeg' (Debian/Ubuntu), 'brew install ffmpeg' (macOS)," >&2
    echo "        or 'conda install -c conda-forge ffmpeg', then re-run this command." >&2
    exit 1
  fi
fi

if ! command -v uv >/dev/null 2>&1; then
  if [ -x "$HOME/.local/bin/uv" ]; then
    export PATH="$HOME/.local/bin:$PATH"
  else
    echo "[setup] installing uv with pip"
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
    export PATH="$HOME/.local/bin:$PATH"
  fi
fi

# --frozen: install exactly what uv.lock says; never re-resolve on a user's machine.
uv sync --frozen --extra dev --quiet
echo "[setup] environment ready in .venv/ ($(.venv/bin/python --version), ffmpeg $(ffmpeg -version | head -1 | cut -d' ' -f3))"
