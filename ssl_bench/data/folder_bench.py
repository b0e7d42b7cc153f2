"""Loader benchmark for image folders, per augmentation policy:

* per core, before and after: CPU seconds of one thread per sample for the torchvision path (Pillow
  decode, torchvision ops on uint8 tensors) and for the fast path (``cpu_views``), measured in
  alternating rounds in one process so both see the same machine load; images/s per core = samples /
  CPU seconds (so other jobs on a shared machine slow the wall clock but not this figure much);
* in the same rounds, the fast path's file read and decode alone (at the DCT scale its views allow): the most
  that path can reach with this decoder, and so the share of a sample the view operations still take;
* the fast path in a DataLoader with ``workers`` worker processes: wall-clock images/s, and images per
  CPU second of the workers;
* with a GPU: the device path (``device_decode``), images/s of batched nvjpeg decode plus batched views, and of
  the decode alone.
"""
from __future__ import annotations

import os
import resource
import statistics
import time

import torch
from torch.utils.data import DataLoader

POLICIES = ("mim", "simsiam", "byol")
LOADER_BATCH, LOADER_BATCHES = 32, 24  # the DataLoader timed: enough batches that its worker's start is a small share


def _cpu_time(fn, items) -> float:
    """CPU seconds of this process (one torch thread) for ``fn(i, item)`` over ``items``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        for i, item in enumerate(items):
            fn(i, item)
        return time.process_time() - start
    finally:
        torch.set_num_threads(threads)


def per_core_rates(samples: list[tuple[str, int]], policy: str, img_size: int, n: int, rounds: int = 3) -> dict:
    """images/s per core of the torchvision path and of the fast path (median over ``rounds``)."""
    from ssl_bench.data.cpu_views import FolderViews
    from ssl_bench.data.datasets import ImageFileDataset
    from ssl_bench.data.transforms import build_policy
    from ssl_bench.data.views import resolve_policy

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    files = ImageFileDataset(samples)
    before = build_policy(policy, img_size, 3, mean, std)
    after = FolderViews(resolve_policy(policy), img_size, 3, mean, std)

    def torchvision_path(i, _):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            before(files[i % len(files)][0])

    normalise = after.normaliser()

    def fast_path(i, sample):
        [normalise(view[None]) for view in after(sample[0], i)]  # (normalised per batch on the device in training)

    def decode_alone(i, sample):
        after.decoded(sample[0], i)

    n_before = max(4, n // 4)  # the torchvision path is slower: fewer samples, same rounds
    timed = [samples[i % len(samples)] for i in range(n)]
    times_before, times_after, times_decode = [], [], []
    for _ in range(rounds):
        times_before.append(_cpu_time(torchvision_path, range(n_before)) / n_before)
        times_after.append(_cpu_time(fast_path, timed) / n)
        times_decode.append(_cpu_time(decode_alone, timed) / n)
    before_s, after_s, decode_s = (statistics.median(t) for t in (times_before, times_after, times_decode))
    return {"policy": policy, "views": len(after.policy), "torchvision_per_core": 1 / before_s, "fast_per_core": 1 / after_s,
            "speedup": before_s / after_s, "decode_per_core": 1 / decode_s, "decode_share": decode_s / after_s,
            "samples_timed": [n_before * rounds, n * rounds]}


def loader_rate(samples: list[tuple[str, int]], policy: str, img_size: int, workers: int, batch_size: int, batches: int) -> dict:
    """The fast path in a DataLoader: wall images/s, and images per CPU second of its workers."""
    from ssl_bench.data.cpu_views import FolderViews, NormalisedBatches
    from ssl_bench.data.datasets import ImagePaths
    from ssl_bench.data.pipeline import PretrainDataset, ResumableSampler
    from ssl_bench.data.views import resolve_policy

    transform = FolderViews(resolve_policy(policy), img_size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # an epoch of exactly the batches timed, so the workers' CPU time covers no prefetched batch left unused
    samples = [samples[i % len(samples)] for i in range((batches + 1) * batch_size)]
    dataset = PretrainDataset(ImagePaths(samples), transform, seed=0)
    sampler = ResumableSampler(len(dataset), batch_size, seed=0)
    loader = NormalisedBatches(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                                          prefetch_factor=4 if workers else None), transform.normaliser())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, wall0, seen = time.process_time(), None, 0
    iterator = iter(loader)
    for k, _ in enumerate(iterator):
        if k == 0:  # the first batch pays for starting the workers
            wall0 = time.perf_counter()
        else:
            seen += batch_size
    wall = time.perf_counter() - wall0 if seen else 0.0
    del iterator  # joins the workers, so their CPU time is counted below
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) if workers else time.process_time() - cpu0
    total = seen + batch_size
    return {"policy": policy, "workers": workers, "batch": batch_size, "images": seen,
            "wall_images_per_s": seen / wall if wall > 0 else None, "images_per_cpu_s": total / cpu if cpu > 0 else None}


def folder_samples(root: str) -> list[tuple[str, int]]:
    from ssl_bench.data.datasets import load_dataset

    base, _ = load_dataset("imagefolder", root, "pretrain")
    return base.samples


def folder_report(root: str, img_size: int = 224, workers: int = 1, n: int = 60, batch_size: int = LOADER_BATCH, batches: int = LOADER_BATCHES,
                  policies=POLICIES, device_batch_size: int | None = None) -> tuple[list[dict], str]:
    """Every measurement above for each policy -> (rows, markdown table); the device path in batches of
    ``device_batch_size`` (default ``batch_size``): a batched decode's rate depends on its batch."""
    from tabulate import tabulate

    samples = folder_samples(root)
    rows = []
    for policy in policies:
        row = per_core_rates(samples, policy, img_size, n)
        row.update({f"loader_{k}": v for k, v in loader_rate(samples, policy, img_size, workers, batch_size, batches).items()
                    if k in ("wall_images_per_s", "images_per_cpu_s", "workers")})
        if torch.cuda.is_available():
            from ssl_bench.data.device_decode import device_rate

            rates = device_rate(samples, policy, img_size, device_batch_size or batch_size, batches)
            row.update(device_images_per_s=rates["images_per_s"], device_decode_images_per_s=rates["decode_images_per_s"])
        rows.append(row)
        print(f"{policy}: {row['torchvision_per_core']:.0f} -> {row['fast_per_core']:.0f} images/s per core", flush=True)

    def fmt(v):
        return "-" if v is None else f"{v:.0f}"

    headers = ["policy", "views", "torchvision path, img/s per core (before)", "fast path, img/s per core (after)", "×",
               "its read + decode alone, img/s per core", "read + decode, share of a sample",
               f"loader, {workers} worker(s), img/s wall", "loader img/s per worker CPU s"]
    table = [[r["policy"], r["views"], fmt(r["torchvision_per_core"]), fmt(r["fast_per_core"]), f"{r['speedup']:.1f}",
              fmt(r["decode_per_core"]), f"{r['decode_share']:.0%}",
              fmt(r["loader_wall_images_per_s"]), fmt(r["loader_images_per_cpu_s"])] for r in rows]
    if torch.cuda.is_available():
        headers += ["device path img/s", "its decode alone img/s"]
        for line, r in zip(table, rows):
            line += [fmt(r["device_images_per_s"]), fmt(r["device_decode_images_per_s"])]
    return rows, tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def folder_section(root: str, out: str, overrides: list[str], policies=POLICIES) -> str:
    """``ssl-bench throughput --data imagefolder``'s loader part: measures, prints, writes
    ``out/loader-imagefolder-<px>px.{json,md}`` (never overwriting) and returns the markdown section.
    ``data.img_size=``, ``data.num_workers=`` and ``train.batch_size=`` among ``overrides`` set the size (224),
    the workers (1) and the device path's batch (32; the CPU loader's stays 32)."""
    from pathlib import Path

    from ssl_bench.atomic import atomic_write
    from ssl_bench.config import CHECKS, check_config, parse_value
    from ssl_bench.data.views import resolve_policy
    from ssl_bench.errors import UserError
    from ssl_bench.records import hardware, now_iso, write_json_new

    options = dict(o.split("=", 1) for o in overrides if "=" in o)
    policies = list(policies)
    if not policies:
        raise UserError("--policies names no augmentation policy; give a comma-separated list, e.g. mim,byol")
    for name in policies:
        resolve_policy(name)  # an unknown name is one line before anything is measured
    given = {key: parse_value(options[key]) for key in ("data.img_size", "data.num_workers", "train.batch_size") if key in options}
    check_config(given, CHECKS)  # a bad value is one line, as it is for training
    img_size = given.get("data.img_size") or 224
    workers = given.get("data.num_workers", 1)
    batch = given.get("train.batch_size", LOADER_BATCH)  # the training batch: the device path's
    load_before = os.getloadavg()[0]
    rows, table = folder_report(root, img_size=img_size, workers=workers, policies=policies, device_batch_size=batch)
    hw, load_after = hardware(), os.getloadavg()[0]
    section = (f"## Image-folder loader, {img_size} px\n\nHardware: {hw['summary']}; torch {hw['torch']}; "
               f"load average {load_before:.1f} before, {load_after:.1f} after (other jobs on the machine).\n"
               f"Command: `ssl-bench throughput --data imagefolder --root {root} --loader-only --policies {','.join(policies)} "
               f"data.img_size={img_size} data.num_workers={workers} train.batch_size={batch}`\n\n"
               f"Per core: one thread's CPU time per sample, torchvision path (before) and fast path (after) in "
               f"alternating rounds, and the fast path's file read and decode alone (at the DCT scale its views allow): the "
               f"fast path's ceiling with this JPEG decoder. Loader: the fast path in a DataLoader with {workers} worker process(es), wall-clock "
               f"images/s and images per CPU second of the workers (their start included), {LOADER_BATCHES} batches of {LOADER_BATCH}"
               f"{f'; the device path in batches of {batch}' if torch.cuda.is_available() else ''}.\n\n{table}\n")
    print(section)
    path = write_json_new(Path(out), f"loader-imagefolder-{img_size}px", {
        "rows": rows, "root": root, "policies": policies, "img_size": img_size, "workers": workers, "device_batch_size": batch,
        "hardware": hw, "created": now_iso(),
        "load_average": [load_before, load_after]})
    atomic_write(path.with_suffix(".md"), lambda f: f.write(section.encode()))
    print(f"written to {path} and {path.with_suffix('.md')}")
    return "\n" + section
