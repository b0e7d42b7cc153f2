#!/usr/bin/env bash
# The main job: set-up (idempotent), then the quick benchmark on Fashion-MNIST (every method, every probe).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ssl-bench bench --preset quick "$@"
