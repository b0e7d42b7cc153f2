#!/usr/bin/env bash
# The README's quick table: the main job over seeds 0, 1 and 2 (fast-mode probes, as the quick preset runs
# them), then the same runs probed in official mode (the papers' probes), then the ranking shift between the
# two modes. Finished steps are skipped, so after `bash scripts/bench.sh` only seeds 1 and 2 and the official
# probes are left (about an hour more on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ssl_bench=.venv/bin/ssl-bench
$ssl_bench bench --preset quick --seeds 0,1,2 "$@"
$ssl_bench bench --preset quick --seeds 0,1,2 --protocols knn,linear,attentive \
    --eval-override knn.mode=official --eval-override linear.mode=official --eval-override attentive.mode=official "$@"
$ssl_bench compare-modes --results results/fashion_mnist-quick
