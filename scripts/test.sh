#!/usr/bin/env bash
# The test command: set-up (idempotent), a one-node local SLURM for the launcher tests, then the whole
# test suite on CPU. Without SLURM (no root, no apt) the SLURM tests are skipped with a reason, except
# in CI, where a cluster that fails to start fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! bash slurm/local-cluster.sh up; then
    if [ "${CI:-}" = "true" ]; then echo "test: the local SLURM did not start" >&2; exit 1; fi
    echo "test: no local SLURM; its tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
