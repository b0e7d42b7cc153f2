"""``ssl-bench throughput``: training images/s of each method under one preset, beside its limits.

A benchmark, not a test: per method it runs the real trainer (data loading, augmentation, masking,
forward, backward, optimizer) for a fixed number of steps (after the first two, timed), then the method's
step alone on one batch held in memory, and the data loader alone on one core (``ssl_bench.throughput``);
with a GPU also MFU and peak memory. Trainer and step alone alternate for ``--rounds`` rounds and the
table gives medians (the ratio: the median of the rounds' ratios), so a burst of load from elsewhere on
a shared machine moves one round, not the comparison. ``--compare-paths`` measures the per-sample CPU
data path (data.device_augment=false) and the batched device path side by side in one run, and where the
batched views are compiled (with a compiled step: the full preset on a GPU) the batched path with eager
views too. ``--vitb16`` is the 224 px ViT-B/16 configuration (batch 256, bf16) of the official codes' published figures, on
any data (``--synthetic-vitb16``: on synthetic data, as those figures), each method at its published sizes
(``vitb16_overrides``: MAE's decoder 512 x 8, not the full preset's 256 x 4). ``--official-code DIR`` also times the
official MAE and MoCo v3 steps in every round (``ssl_bench_app.official_speed``), and the table says whether each
step alone ran compiled. It writes a table (markdown + JSON) naming the hardware.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median


def register(sub) -> None:
    p = sub.add_parser("throughput", help="measure training images/s of every method", description=__doc__)
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--preset", default="quick", help="backbone/batch preset to measure (default: quick)")
    p.add_argument("--data", default="fashion_mnist", help="data set (default: fashion_mnist; 'synthetic' for any size)")
    p.add_argument("--data-root", "--root", default=None, help="where the data set lives (for imagefolder: the folder)")
    p.add_argument("--loader-only", action="store_true", help="imagefolder: only the loader table, no training")
    p.add_argument("--policies", default="mim,simsiam,byol", help="imagefolder: augmentation policies of the loader table (default: mim,simsiam,byol)")
    # 22: the trainer times steps 3-22, which hold whole loader items when an item is 1, 2, 4, 5, 10 or 20 batches
    # (the batched path draws 4 batches at a time at the quick preset: items begin at steps 1, 5, ..., 21)
    p.add_argument("--steps", type=int, default=22, help="optimizer steps per method and round (default: 22)")
    p.add_argument("--compare-paths", action="store_true",
                   help="measure the per-sample CPU data path (before) and the batched device path (after) side by side")
    p.add_argument("--vitb16", action="store_true",
                   help="ViT-B/16 on 224 px images, batch 256, bf16, each method at its published sizes (the official codes' H100 configuration), on --data")
    p.add_argument("--synthetic-vitb16", action="store_true", help="--vitb16 on synthetic data (the official codes' figures)")
    p.add_argument("--no-limits", action="store_true", help="trainer images/s only (skip step-alone and loader-alone)")
    p.add_argument("--limit-steps", type=int, default=10, help="timed steps of the step alone and batches of the loader alone (default: 10)")
    # five: on a shared 2-core CPU one round's ratio moves by a few percent, and a ratio is judged against 0.95
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of trainer and step alone; the table gives medians (default: 5)")
    p.add_argument("--official-code", metavar="DIR", default=None,
                   help="also time the official code's step (DIR/mae, DIR/moco-v3: local copies of facebookresearch/mae "
                        "and moco-v3) beside ours in every round, for MAE and MoCo v3")
    p.add_argument("--out", default="results/throughput", help="where to write the table (default: results/throughput)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every method")
    p.set_defaults(func=run)


def run(args) -> int:
    from tabulate import tabulate

    from ssl_bench.atomic import make_folder
    from ssl_bench.config import comma_list
    from ssl_bench.data.folder_bench import folder_section
    from ssl_bench.errors import UserError

    for flag, value, least in (("--steps", args.steps, 3), ("--limit-steps", args.limit_steps, 1), ("--rounds", args.rounds, 1)):
        if value < least:  # the first two trainer steps are not timed
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.loader_only and args.data != "imagefolder":
        raise UserError("--loader-only is the image folder's loader table: add --data imagefolder --root DIR "
                        "(for an in-memory data set, the main table has a loader column)")
    make_folder(args.out, "--out")  # before any measurement, not after the first
    if args.synthetic_vitb16:
        args.data, args.vitb16 = "synthetic", True
    plan = [] if args.loader_only else _plan(args)  # every row's config, resolved before any measurement
    data_overrides = [*VITB16, *args.overrides] if args.vitb16 else args.overrides
    folder_md = folder_section(args.data_root, args.out, data_overrides, comma_list(args.policies)) if args.data == "imagefolder" else ""
    if args.loader_only:
        return 0
    rows = []
    for name, vitb16, path_name, cfg in plan:
        rows.append(_measure(args, name, vitb16, path_name, cfg))
        _write(args, rows, folder_md, tabulate, finished=False)  # a cut-short run still leaves its rows
        row = rows[-1]
        print(f"{name} [{path_name}]: {row['images_per_s']:.1f} images/s"
              + (f", step alone {row['step_images_per_s']:.1f}, loader alone {row['loader_images_per_s']:.0f}" if "step_images_per_s" in row else ""),
              flush=True)
    print(_write(args, rows, folder_md, tabulate, finished=True))
    return 0


def _plan(args) -> list[tuple[str, list[str], str, dict]]:
    """The table's rows as (method, its ViT-B/16 overrides, data path, resolved config), all resolved here, so that a
    bad method name or value is one line before any measurement."""
    from ssl_bench.config import comma_list, resolve_config
    from ssl_bench.data.pipeline import compile_views
    from ssl_bench.distributed import resolve_device
    from ssl_bench.errors import UserError
    from ssl_bench.registry import available_methods, get_method
    from ssl_bench_app.official_speed import check_official_code

    if args.vitb16 and resolve_device("auto").type == "cpu":
        print("ssl-bench throughput: --vitb16 on a CPU: a ViT-B/16 step of batch 256 takes minutes here; "
              "the configuration is meant for a GPU", file=sys.stderr, flush=True)
    names = list(available_methods()) if args.methods == "all" else comma_list(args.methods)
    if not names:
        raise UserError(f"--methods {args.methods!r} names no method; give a comma-separated list, or 'all'")
    names = [n for n in names if get_method(n).pretrains]  # controls (random_init) have no training loop to time
    if not names:
        raise UserError(f"--methods {args.methods} names only controls, which have no training loop to time; name a method that pretrains")
    if args.official_code:
        check_official_code(args.official_code, names)
    common = [f"data.name={args.data}", f"train.max_steps={args.steps}", "train.progress=false",
              *([f"data.root={args.data_root}"] if args.data_root else [])]
    paths = [("per-sample CPU", "data.device_augment=false"), ("batched device", "data.device_augment=true")]
    # where the batched views would be compiled (a compiled step), also the same path with eager views
    eager_views = ("batched device, eager views", "data.device_augment=true data.compile_views=false")
    paths = paths + [eager_views] if args.compare_paths else [(None, None)]
    plan = []
    for name in names:
        vitb16 = vitb16_overrides(get_method(name), args.preset) if args.vitb16 else []
        for path_name, path_override in paths:
            cfg = resolve_config(get_method(name), args.preset,
                                 [*common, *vitb16, *args.overrides, *(path_override.split() if path_override else [])])
            if path_name == eager_views[0] and not compile_views(cfg, resolve_device(cfg["train"]["device"])):
                continue  # the batched row's views are eager already
            plan.append((name, vitb16, path_name or _path_name(cfg, args.data), cfg))
    return plan


def _measure(args, name: str, vitb16: list[str], path_name: str, cfg: dict) -> dict:
    """One row of the table: ``args.rounds`` alternating rounds of the trainer and the step alone (and the
    official step, where asked), then the loader alone; medians over the rounds."""
    from ssl_bench.throughput import loader_alone, step_alone
    from ssl_bench.trainer import pretrain
    from ssl_bench_app.official_speed import has_official, official_step_alone

    # images/s covers the training loop only; one-off set-up (e.g. a tokenizer in prepare()) is in setup_and_run_s
    trainer, waits, steps, totals, official = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            record = pretrain(cfg, Path(tmp) / f"run{r}")
            totals.append(time.perf_counter() - t0)
            trainer.append(record["images_per_s"])
            waits.append(record["data_share"])
            cfg = record["config"]  # prepare() may have written files (a tokenizer) later rounds and the step reuse
            if not args.no_limits:
                steps.append(step_alone(cfg, args.limit_steps))
                if args.official_code and has_official(name):
                    official.append(official_step_alone(cfg, args.official_code, args.limit_steps))
        limits = {"loader_images_per_s": loader_alone(cfg, args.limit_steps)} if not args.no_limits else {}
    row = {"method": name, "data_path": path_name, "images_per_s": median(trainer), "rounds": args.rounds, "vitb16_overrides": vitb16,
           "trainer_images_per_s_rounds": trainer, "data_share": median(waits), "data_share_rounds": waits, "steps": record["steps"], "batch": record["effective_batch"],
           "setup_and_run_s": totals[0], **limits}
    if steps:
        step_rates = [s["step_images_per_s"] for s in steps]
        row.update({k: v for k, v in steps[-1].items() if k != "step_images_per_s"}, step_images_per_s=median(step_rates),
                   step_images_per_s_rounds=step_rates,
                   trainer_over_step=median([t / s for t, s in zip(trainer, step_rates)]))
        if row.get("flops_per_step"):  # MFU at the median step rate
            row["mfu"] = median([s["mfu"] for s in steps])
        if official:
            rates = [o["images_per_s"] for o in official]
            row.update(official_step_images_per_s=median(rates), official_step_images_per_s_rounds=rates,
                       official_step_compiled=official[-1]["compiled"],
                       step_over_official=median([s / o for s, o in zip(step_rates, rates)]),
                       trainer_over_official=median([t / o for t, o in zip(trainer, rates)]))
    return row


def _write(args, rows: list[dict], folder_md: str, tabulate, finished: bool) -> str:
    """The table (markdown) and rows (JSON) so far, at paths chosen by the first call (never an earlier run's)."""
    from ssl_bench.atomic import atomic_write
    from ssl_bench.records import hardware, now_iso, write_json_new

    ref = next((r["images_per_s"] for r in rows if r["method"] == "mae"), rows[0]["images_per_s"])
    for r in rows:
        r["ratio_to_mae"] = r["images_per_s"] / ref
    hw = hardware()
    table = _table(rows, tabulate)
    record = {"rows": rows, "preset": args.preset, "data": args.data, "vitb16": args.vitb16, "hardware": hw, "overrides": args.overrides,
              "created": now_iso(), "finished": finished}
    if getattr(args, "_json_path", None) is None:
        out = Path(args.out)
        stem = f"throughput-{args.data}{'-vitb16' if args.vitb16 else ''}-{args.preset}"
        args._json_path = write_json_new(out, stem, record)
    else:
        atomic_write(args._json_path, lambda f: f.write(json.dumps(record, indent=2).encode()))
    md = args._json_path.with_suffix(".md")
    command = " ".join(["ssl-bench throughput", f"--preset {args.preset}", f"--data {args.data}", f"--steps {args.steps}",
                        f"--limit-steps {args.limit_steps}", f"--rounds {args.rounds}", *(["--methods " + args.methods] if args.methods != "all" else []),
                        *(["--compare-paths"] if args.compare_paths else []), *(["--synthetic-vitb16"] if args.synthetic_vitb16 else ["--vitb16"] if args.vitb16 else []),
                        *(["--data-root " + args.data_root] if args.data_root else []),
                        *(["--official-code " + args.official_code] if args.official_code else []),
                        *args.overrides])
    text = (f"# Training throughput, preset `{args.preset}`, data `{args.data}`\n\nHardware: {hw['summary']}; "
            f"torch {hw['torch']}, timm {hw['timm']}.\nCommand: `{command}`\n\n{_vitb16_note(rows)}"
            f"Trainer: the whole loop (data, step, bookkeeping), steps after the first two; waiting for data: the share of "
            f"its time spent in the loader's next() (views, masks, copies to the device). Step alone: the method's step "
            f"on one batch held in memory. Trainer and step alone alternate for {args.rounds} rounds: images/s are medians, "
            f"trainer / step the median of the rounds' ratios. Loader alone: the pretraining loader on one core "
            f"(no workers, one thread).\n\n"
            f"{table}\n{'' if finished else chr(10) + '(run still going or cut short: the rows measured so far)' + chr(10)}{folder_md}")
    atomic_write(md, lambda f: f.write(text.encode()))
    return f"{table}\nwritten to {args._json_path} and {md}"


def _vitb16_note(rows: list[dict]) -> str:
    """What ``--vitb16`` set, per method, as a paragraph (empty without it)."""
    sets = {r["method"]: r["vitb16_overrides"] for r in rows if r.get("vitb16_overrides")}
    if not sets:
        return ""
    own = "; ".join(f"{m}: {' '.join(o for o in v if o.startswith('method.'))}" for m, v in sets.items()
                    if any(o.startswith("method.") for o in v))
    return (f"ViT-B/16 configuration: {' '.join(VITB16)}"
            + (f"; the methods' published sizes where the preset scales them down ({own})" if own else "") + ".\n\n")


def _path_name(cfg: dict, data: str) -> str:
    if data == "imagefolder":
        return "device decode" if cfg["data"].get("decode") == "device" else "per-sample CPU"
    return "batched device" if cfg["data"]["device_augment"] else "per-sample CPU"


# the official codes' H100 figures were taken with ViT-B/16 on 224 px images, batch 256, bf16
VITB16 = ["data.img_size=224", "model.arch=vit_base", "model.patch_size=16", "train.batch_size=256", "train.amp=bf16",
          "model.embed_dim=none", "model.depth=none", "model.num_heads=none"]


def vitb16_overrides(method_cls: type, preset: str) -> list[str]:
    """The official codes' ViT-B/16 configuration for one method: ``VITB16``, and the method's options back at
    their defaults (the published ViT-B values) wherever ``preset``'s recipe scales them down for a small
    backbone (MAE's decoder is 256 wide x 4 blocks at ``full``, 512 x 8 in the official figures)."""
    from ssl_bench.config import resolve_config

    defaults = method_cls.option_defaults()
    scaled = resolve_config(method_cls, preset)["method"]
    return [*VITB16, *(f"method.{k}={defaults[k]!r}" for k in sorted(defaults) if scaled[k] != defaults[k])]


def _table(rows: list[dict], tabulate) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    gpu = any(r.get("mfu") is not None or r.get("peak_mem_gib") is not None for r in rows)
    head = ["method", "data path", "trainer img/s", "waiting for data", "step alone img/s", "trainer / step", "loader alone img/s (1 core)"]
    head += ["MFU", "peak GiB"] if gpu else []
    official = any(r.get("official_step_images_per_s") for r in rows)
    head += ["official step img/s", "step / official", "trainer / official"] if official else []
    body = []
    for r in rows:
        line = [r["method"], r["data_path"], num(r["images_per_s"], ".1f"), num(r.get("data_share"), ".0%"), num(r.get("step_images_per_s"), ".1f"),
                num(r.get("trainer_over_step"), ".2f"), num(r.get("loader_images_per_s"), ".0f")]
        line += [num(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""), num(r.get("peak_mem_gib"), ".1f")] if gpu else []
        line += [num(r.get("official_step_images_per_s"), ".1f"), num(r.get("step_over_official"), ".2f"),
                 num(r.get("trainer_over_official"), ".2f")] if official else []
        body.append(line)
    text = tabulate(body, headers=head, tablefmt="github")
    before = {r["method"]: r for r in rows if r["data_path"] == "per-sample CPU"}
    gains = [(m, r["loader_images_per_s"] / before[m]["loader_images_per_s"]) for m, r in
             ((r["method"], r) for r in rows if r["data_path"] == "batched device")
             if m in before and r.get("loader_images_per_s") and before[m].get("loader_images_per_s")]
    if gains:
        text += "\n\nLoader alone, batched / per-sample (same core): " + ", ".join(f"{m} {g:.1f}x" for m, g in gains)
    said = {None: None, True: "compiled", False: "eager: compiling failed"}
    compiled = [f"{r['method']} {said[r['step_compiled']]}" + (f", official {said[r['official_step_compiled']]}" if r.get("official_step_compiled") is not None else "")
                for r in rows if r.get("step_compiled") is not None]
    if compiled:  # a step that fell back to eager is not the comparison the table claims
        text += "\n\nStep alone: " + "; ".join(compiled)
    return text
