#!/usr/bin/env bash
# One command for a GPU machine without internet: measures what issue 10 asks and writes
# results/gpu/<date>-<gpu>.md. It installs nothing; missing packages are named with how to bring them
# (README, "GPU check").
#
#   scripts/gpu-check.sh            # on a machine with a CUDA GPU
#   scripts/gpu-check.sh --dry-run  # anywhere: the same steps at smoke size on the CPU (checks the script)
#
# Steps: (1) the throughput table (fashion_mnist at the full preset for MAE, MoCo v3, SimSiam; synthetic
# 224 px ViT-B/16, batch 256, bf16, for MAE and MoCo v3), (2) a faiss kNN over 1M x 768 random features
# against 1M references on the GPU, (3) a short full-preset MAE pretraining on fashion_mnist and its
# kNN / linear evaluation, (4) with --only folders (issue 16; not in the default set): a synthetic JPEG folder, its
# loader table (CPU paths per core, and the device-decode path's rate) and ViT-B/16 MAE and MoCo v3 trained from
# it with data.decode=device, beside their step alone, (5) the tests that need a CUDA GPU (pytest, skipped on a
# CPU), each one's outcome in the report. Options: --out DIR (default results/gpu), --python PY (default: python3, or
# the repo's .venv), --steps N (trainer steps per throughput row, default 30), --pretrain-steps N (MAE
# pretraining steps, default 2000), --only PARTS (comma-separated of throughput, vitb16, knn, mae, tests, folders: run those alone,
# e.g. to split the check over calls with a time limit; on one H100 the parts took about 220, 200, 70 and 120 s),
# --official-code DIR (local copies of facebookresearch/mae and moco-v3 at DIR/mae, DIR/moco-v3: the ViT-B/16 rows
# also time the official step beside ours), --set KEY=VALUE (repeatable: a config override for every throughput row,
# e.g. --set train.compile_mode=reduce-overhead).
# The report is rewritten after every step, so a cut-short check keeps its figures.
set -uo pipefail  # no -e: a failing step is reported and the others still run

ARGS="$*"
DRY=0
OUT=results/gpu
STEPS=30
PRE_STEPS_ARG=""
ONLY=throughput,vitb16,knn,mae,tests
OFFICIAL=()
SETS=()
PY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --steps) STEPS="$2"; shift ;;
        --pretrain-steps) PRE_STEPS_ARG="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --python) PY="$2"; shift ;;
        --official-code) OFFICIAL=(--official-code "$2"); shift ;;
        --set) [[ "${2:-}" == *=* ]] || { echo "gpu-check: --set takes KEY=VALUE (e.g. train.compile_mode=reduce-overhead), got '${2:-}'" >&2; exit 2; }
               SETS+=("$2"); shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for part in ${ONLY//,/ }; do
    case "$part" in throughput|vitb16|knn|mae|tests|folders) ;; *) echo "gpu-check: unknown part '$part' in --only; choose from throughput, vitb16, knn, mae, tests, folders" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.."
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- 1. what is installed (nothing is fetched) ----------------------------------------------------------
"$PY" - "$DRY" <<'EOF'
import importlib, sys
dry = sys.argv[1] == "1"
missing = [m for m in ("torch", "torchvision", "timm", "faiss", "scipy", "tabulate") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu-check: missing Python packages: {', '.join(missing)}. This machine has no internet: on a connected "
             f"machine run `pip download -d wheels <packages>` for this Python and platform, copy wheels/ here and "
             f"`pip install --no-index --find-links wheels <packages>` (README, 'GPU check').")
import torch, faiss
if not dry and not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA GPU is visible to torch; run on a GPU machine, or pass --dry-run for the CPU check")
if not dry and faiss.get_num_gpus() == 0:
    print("gpu-check: warning: this faiss has no GPU support (faiss-cpu); the kNN step runs on the CPU. "
          "Bring a faiss-gpu wheel (README, 'GPU check') for the GPU figure.", file=sys.stderr)
EOF

SLUG=$("$PY" -c "
import re, sys, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and sys.argv[1] == '0' else 'cpu-dryrun'
print(re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower())" "$DRY")
DATE=$(date -u +%Y-%m-%d)
mkdir -p "$OUT"
REPORT="$OUT/$DATE-$SLUG.md"
n=1
while [ -e "$REPORT" ]; do REPORT="$OUT/$DATE-$SLUG-$n.md"; n=$((n + 1)); done  # never overwrite an earlier check
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CLI=("$PY" -m ssl_bench_app.cli)
: > "$WORK/failed"
report() {  # (re)writes the report from what the steps so far left in $WORK
"$PY" - "$WORK" "$REPORT" "$ARGS" <<'EOF'
import glob, json, sys
from pathlib import Path
from ssl_bench.records import hardware
work, report, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dry = "--dry-run" in args.split()
hw = hardware()
lines = [f"# GPU check, {hw['summary']}", ""]
if dry:
    lines += ["**Dry run on the CPU at smoke size: checks the script, measures nothing about a GPU.**", ""]
lines += [f"torch {hw['torch']}, timm {hw['timm']}, Python {hw['python']}; CPU: {hw['cpu']} ({hw['cpu_cores']} cores). "
          f"Command: `scripts/gpu-check.sh{' ' + args if args else ''}`.", ""]
tables = {md: Path(md).read_text() for md in sorted(glob.glob(str(work / "tp" / "*.md")))}
for md, text in tables.items():
    title, body = text.split("\n", 1)
    if any(body.strip() in other for m, other in tables.items() if m != md):
        continue  # the folder's loader table, which its training table holds too
    lines += ["## " + title.lstrip("# "), "", body.strip(), ""]
failed = (work / "failed").read_text().split("\n")
if any(failed):
    lines += ["**Failed steps** (their errors are in the script's output): " + "; ".join(f for f in failed if f), ""]
if (work / "knn.md").is_file() and (work / "knn.md").read_text().strip():
    lines += ["## kNN over random features (k = 20)", "", "| queries | references | index | index s | search s | queries searched again in float32 |",
              "|---|---|---|---|---|---|", (work / "knn.md").read_text().strip(), ""]
run = json.loads((work / "mae" / "run.json").read_text()) if (work / "mae" / "run.json").is_file() else {}
if run.get("status") == "finished":
    lines += ["## MAE, fashion_mnist, short pretraining", "",
              f"{run['steps']} steps, batch {run['effective_batch']}, {run['images_per_s']:.0f} images/s, "
              f"{run['wall_time_s']:.0f} s; loss {run['loss']['loss']['first']:.4f} -> {run['loss']['loss']['last']:.4f}.", ""]
if (work / "cuda-tests.xml").is_file():  # pytest's JUnit record of the CUDA tests
    import xml.etree.ElementTree as ET
    cases = ET.parse(work / "cuda-tests.xml").getroot().iter("testcase")
    outcome = lambda c: next((t for t in ("failure", "error", "skipped") if c.find(t) is not None), "passed")
    lines += ["## Tests that need a CUDA GPU", ""] + [f"- `{c.get('classname')}::{c.get('name')}`: {outcome(c)}" for c in cases] + [""]
for rec in sorted(glob.glob(str(work / "mae" / "evals" / "*.json")) + sorted(glob.glob(str(work / "mae" / "eval*.json")))):
    data = json.loads(Path(rec).read_text())
    score = {k: v for k, v in data.items() if isinstance(v, (int, float)) and ("top1" in k or "acc" in k)}
    lines.append(f"- {Path(rec).name}: " + ", ".join(f"{k} {v:.2f}" for k, v in score.items()))
report.parent.mkdir(parents=True, exist_ok=True)
report.write_text("\n".join(lines) + "\n")
EOF
}
step() {  # step NAME COMMAND...: runs it; a failure is logged and does not stop the check; the report follows each step
    local name="$1"; shift
    echo "gpu-check: $name" >&2
    local t0=$SECONDS
    if "$@"; then echo "gpu-check: $name done in $((SECONDS - t0)) s" >&2
    else echo "gpu-check: $name FAILED (exit $?) after $((SECONDS - t0)) s" >&2; echo "$name" >> "$WORK/failed"; fi
    report
}

# options first, then every key=value (the CLI takes its overrides as one run of positional arguments).
# One round of trainer and step alone per row, the step alone over 20 steps: five rounds (the command's default)
# would take the throughput part past a 10-minute call. One round is one reading: on an H100 the host-bound
# fashion_mnist steps moved by up to a quarter between calls minutes apart (results/gpu/2026-11-24-*-1.md)
if [ "$DRY" = 1 ]; then
    PRESET=smoke; TP_METHODS=mae,simsiam; TP_EXTRA=(--steps 3 --limit-steps 2 --rounds 1); VITB=(--preset smoke --data synthetic); VITB_SET=(data.img_size=28)
    KNN_N=5000; PRE=(--preset smoke); PRE_STEPS=4; EVAL=(--preset smoke --protocol knn)
    JPEGS=(--images 80 --size 64x48,48x64); FOLDER=(--preset smoke); FOLDER_SET=(data.img_size=28 data.num_workers=1)
else
    PRESET=full; TP_METHODS=mae,mocov3,simsiam; TP_EXTRA=(--steps "$STEPS" --limit-steps 20 --rounds 1); VITB=(--preset full --synthetic-vitb16); VITB_SET=()
    KNN_N=1000000; PRE=(--preset full); PRE_STEPS=${PRE_STEPS_ARG:-2000}; EVAL=(--preset quick --protocol knn,linear)
    # ViT-B/16 at the official codes' setting, fed from JPEGs; workers: the node's cores but two. 16,000 images are
    # 62 steps of 256, so the timed steps (--steps up to 62) stay in one epoch, as on ImageNet: each epoch's start
    # refills the loader's pipeline (4,000 images made every 15th step such a start); about 2 GB, written in parallel
    JPEGS=(--images 16000 --size 500x375,375x500); FOLDER=(--preset full --vitb16); FOLDER_SET=("data.num_workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))")
fi

# -- 2. throughput -----------------------------------------------------------------------------------
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

wanted throughput && step "throughput, fashion_mnist at $PRESET" "${CLI[@]}" throughput --preset "$PRESET" --methods "$TP_METHODS" "${TP_EXTRA[@]}" --out "$WORK/tp" "${SETS[@]}"
wanted vitb16 && step "throughput, ViT-B/16 synthetic" "${CLI[@]}" throughput "${VITB[@]}" --methods mae,mocov3 "${TP_EXTRA[@]}" "${OFFICIAL[@]}" --out "$WORK/tp" "${VITB_SET[@]}" "${SETS[@]}"

# -- 3. faiss kNN over random features -------------------------------------------------------------------
knn_check() {
"$PY" - "$KNN_N" > "$WORK/knn.md" <<'EOF'
import sys, time
import numpy as np, torch
from evals.knn import KNNClassifier
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
refs, queries = torch.randn(n, 768, generator=g), torch.randn(n, 768, generator=g)
labels = torch.randint(0, 1000, (n,), generator=g)
t0 = time.perf_counter()
knn = KNNClassifier(refs, labels, num_classes=1000)
t1 = time.perf_counter()
knn.scores(queries, ks=[20], chunk=8192)
t2 = time.perf_counter()
again = getattr(knn.index, "searched_again", None)  # the torch search: queries its float16 screen left open
print(f"| {n:,} x 768 | {n:,} | {knn.index_name} | {t1 - t0:.1f} | {t2 - t1:.1f} | {'-' if again is None else f'{again:,}'} |")
EOF
}
wanted knn && step "kNN, $KNN_N x 768 random features" knn_check

# -- 4. a short full-preset MAE pretraining and its evaluation ---------------------------------------------
wanted mae && step "MAE pretraining" "${CLI[@]}" pretrain --method mae "${PRE[@]}" --out "$WORK/mae" "train.max_steps=$PRE_STEPS" train.progress=lines
wanted mae && step "MAE evaluation" "${CLI[@]}" eval --run "$WORK/mae" "${EVAL[@]}"

# -- 5. the tests that need a CUDA GPU (the CPU test suite skips them) ------------------------------------
cuda_tests() {  # without pytest only this step fails, naming what to bring
"$PY" -c "import pytest" 2>/dev/null || { echo "gpu-check: the tests part needs pytest: bring its wheel (README, 'GPU check')" >&2; return 1; }
# the files that use the cuda marker (tests/conftest.py) only: others may import what this machine lacks
local files; mapfile -t files < <(grep -l ON_CUDA tests/test_*.py)
"$PY" -m pytest -q -p no:cacheprovider -m cuda --junitxml="$WORK/cuda-tests.xml" "${files[@]}"
}
wanted tests && step "tests that need a CUDA GPU" cuda_tests

# -- 6. image folders (only with --only folders) ----------------------------------------------------------
wanted folders && step "JPEG folder" "${CLI[@]}" make-jpeg-folder --out "$WORK/jpegs" "${JPEGS[@]}"
wanted folders && step "throughput, JPEG folder, device decode" "${CLI[@]}" throughput --data imagefolder --data-root "$WORK/jpegs" \
    --methods mae,mocov3 --policies mim,byol "${FOLDER[@]}" "${TP_EXTRA[@]}" --out "$WORK/tp" "${FOLDER_SET[@]}" data.decode=device "${SETS[@]}"

echo "gpu-check: written $REPORT" >&2
if [ -s "$WORK/failed" ]; then exit 1; fi  # the report names the failed steps
