#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine; fast no-op when already done.
#   - Fashion-MNIST from Debian's dataset-fashion-mnist (the default data set)
#   - a virtual environment in .venv with ssl-bench installed (editable) and its test extras
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
    [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt_install dataset-fashion-mnist
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv 2>/dev/null || { apt_install python3-venv; "$PY" -m venv .venv; }
fi

# Reinstall only when the dependency list changed.
stamp=.venv/.ssl-bench-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing ssl-bench and its dependencies into .venv (torch is large: this takes a few minutes once)"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e ".[test,tensorboard,wandb]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -c "import ssl_bench, torch, timm, torchvision, faiss, submitit" 
    echo "$want" > "$stamp"
fi
