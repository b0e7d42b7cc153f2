"""Where the trainer's time goes: the real training loop of one method, step by step.

    python scripts/profile_trainer.py mae --preset full [--vitb16] [--data synthetic] [--steps 12] [--profile] [--out DIR] [key=value ...]

A diagnostic for the gap between ``ssl-bench throughput``'s trainer and step-alone figures. It runs
``ssl_bench.trainer.pretrain`` and prints the host milliseconds between micro-batches (every one, so one-off
stalls show) and those spent in the loader's ``next()`` (views, masks, copies). With --profile it also runs
torch.profiler over a window of steps after compilation (the profiler advances once per micro-batch) and prints
the ops that cost the host most, the device's busiest kernels and the host-device syncs per step; with --out
it writes that window's Chrome trace (gzipped) there.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssl_bench.trainer as trainer  # noqa: E402
from ssl_bench.atomic import make_folder  # noqa: E402
from ssl_bench.config import resolve_config  # noqa: E402
from ssl_bench.errors import UserError, one_line  # noqa: E402
from ssl_bench.registry import get_method  # noqa: E402
from ssl_bench_app.commands.throughput import vitb16_overrides  # noqa: E402

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
            "aten::item", "aten::nonzero", "cudaMemcpyAsync")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method")
    p.add_argument("--preset", default="full")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--vitb16", action="store_true", help="ViT-B/16, 224 px, batch 256, bf16 (as ssl-bench throughput --vitb16)")
    p.add_argument("--skip", type=int, default=12, help="steps before the profiled window (compilation, warm-up)")
    p.add_argument("--steps", type=int, default=12, help="profiled steps")
    p.add_argument("--profile", action="store_true", help="profile the window with torch.profiler (slows the host)")
    p.add_argument("--out", default=None, help="folder for the gzipped Chrome trace")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()  # key=value overrides may follow the options

    total = args.skip + args.steps + 2
    overrides = [f"data.name={args.data}", f"train.max_steps={total}", "train.progress=false",
                 *(vitb16_overrides(get_method(args.method), args.preset) if args.vitb16 else []), *args.overrides]
    cfg = resolve_config(get_method(args.method), args.preset, overrides)
    marks: list[float] = []

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=args.skip - 2, warmup=2, active=args.steps, repeat=1)) \
        if args.profile else contextlib.nullcontext()
    data_ms: list[float] = []  # host time inside the loader's next() per micro-batch: views, masks, copies
    with prof:
        to_device, build_loader = trainer.batch_to_device, trainer.build_pretrain_loader

        def stepping(batch, device):  # one mark (and profiler step) per micro-batch
            if args.profile:
                prof.step()
            marks.append(time.perf_counter())
            return to_device(batch, device)

        def timed_loader(*a, **kw):
            loader, *rest = build_loader(*a, **kw)
            return (_TimedIterable(loader, data_ms), *rest)

        trainer.batch_to_device, trainer.build_pretrain_loader = stepping, timed_loader
        try:
            with tempfile.TemporaryDirectory() as tmp:
                record = trainer.pretrain(cfg, Path(tmp) / "run")
        finally:
            trainer.batch_to_device, trainer.build_pretrain_loader = to_device, build_loader
    window = marks[args.skip + args.steps] - marks[args.skip] if len(marks) > args.skip + args.steps else float("nan")
    per_step = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
    print(f"\n== {args.method}, preset {args.preset}, data {args.data}{' ViT-B/16' if args.vitb16 else ''}: "
          f"trainer {record['images_per_s']:.0f} img/s; steps {args.skip}-{args.skip + args.steps}: {1000 * window / args.steps:.1f} ms a step (host clock)")
    print("host ms between micro-batches:", " ".join(f"{t:.0f}" for t in per_step))
    print("of which in the loader's next():", " ".join(f"{t:.1f}" for t in data_ms[1:]))
    if not args.profile:
        return 0
    events = prof.key_averages()
    print("\n-- host: self CPU time, top 30")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    if torch.cuda.is_available():
        print("\n-- device: self device time, top 20")
        print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
    print("\n-- host-device syncs and copies a step")
    for e in events:
        if e.key in SYNC_OPS:
            print(f"  {e.key:32s} {e.count / args.steps:6.1f} calls, {e.self_cpu_time_total / 1000 / args.steps:8.2f} ms host")
    if args.out:
        out = make_folder(args.out, "--out")
        trace = out / f"trace-{args.method}-{args.preset}{'-vitb16' if args.vitb16 else ''}.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        print(f"trace: {trace}.gz")
    return 0


class _TimedIterable:
    """The trainer's loader, timing each ``next()`` on the host clock into ``times`` (ms)."""

    def __init__(self, loader, times: list[float]):
        self.loader, self.times = loader, times

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.times.append(1000 * (time.perf_counter() - t0))
            yield batch


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # an unknown method or a bad key=value: one line, as the CLI's
        sys.exit(f"profile_trainer: error: {one_line(exc)}")
