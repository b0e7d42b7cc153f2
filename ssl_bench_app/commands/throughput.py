"""``ssl-bench throughput``: training images/s of each method under one preset, as ratios to MAE.

A benchmark, not a test: it runs the real trainer (data loading, augmentation, masking, forward,
backward, optimizer) for a fixed number of steps per method on the same backbone and data, and writes a
table (markdown + JSON) naming the hardware. Steps after the first two are timed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("throughput", help="measure training images/s of every method", description=__doc__)
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--preset", default="quick", help="backbone/batch preset to measure (default: quick)")
    p.add_argument("--data", default="fashion_mnist", help="data set (default: fashion_mnist; 'synthetic' for any size)")
    p.add_argument("--data-root", "--root", default=None, help="where the data set lives (for imagefolder: the folder)")
    p.add_argument("--loader-only", action="store_true", help="imagefolder: only the loader table, no training")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per method (default: 12)")
    p.add_argument("--out", default="results/throughput", help="where to write the table (default: results/throughput)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every method")
    p.set_defaults(func=run)


def run(args) -> int:
    from tabulate import tabulate

    from ssl_bench.config import resolve_config
    from ssl_bench.atomic import atomic_write
    from ssl_bench.data.folder_bench import folder_section
    from ssl_bench.records import hardware, now_iso, write_json_new
    from ssl_bench.registry import available_methods, get_method
    from ssl_bench.trainer import pretrain

    folder_md = folder_section(args.data_root, args.out, args.overrides) if args.data == "imagefolder" else ""
    if args.loader_only:
        return 0
    names = list(available_methods()) if args.methods == "all" else args.methods.split(",")
    names = [n for n in names if get_method(n).pretrains]  # controls (random_init) have no training loop to time
    overrides = [f"data.name={args.data}", f"train.max_steps={args.steps}", "train.progress=false", *args.overrides]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    rows = []
    for name in names:
        cfg = resolve_config(get_method(name), args.preset, overrides)
        # images/s covers the training loop only; one-off set-up (e.g. a tokenizer in prepare()) is in setup_and_run_s
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            record = pretrain(cfg, Path(tmp) / "run")
            total = time.perf_counter() - t0
        rows.append({"method": name, "images_per_s": record["images_per_s"], "steps": record["steps"],
                     "batch": record["effective_batch"], "setup_and_run_s": total})
        print(f"{name}: {record['images_per_s']:.1f} images/s", flush=True)
    ref = next((r["images_per_s"] for r in rows if r["method"] == "mae"), rows[0]["images_per_s"])
    for r in rows:
        r["ratio_to_mae"] = r["images_per_s"] / ref
    hw = hardware()
    table = tabulate(
        [[r["method"], f"{r['images_per_s']:.1f}", f"{r['ratio_to_mae']:.2f}", r["batch"], r["steps"]] for r in rows],
        headers=["method", "images/s", "× MAE", "batch", "steps"], tablefmt="github",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-{args.data}-{args.preset}"
    path = write_json_new(out, stem, {"rows": rows, "preset": args.preset, "data": args.data, "hardware": hw,
                                      "overrides": args.overrides, "created": now_iso()})
    md = path.with_suffix(".md")
    text = (f"# Training throughput, preset `{args.preset}`, data `{args.data}`\n\nHardware: {hw['summary']}; "
            f"torch {hw['torch']}, timm {hw['timm']}.\nCommand: `ssl-bench throughput --preset {args.preset} --data {args.data} "
            f"--steps {args.steps}`\n\n{table}\n{folder_md}")
    atomic_write(md, lambda f: f.write(text.encode()))
    print(table)
    print(f"written to {path} and {md}")
    return 0
