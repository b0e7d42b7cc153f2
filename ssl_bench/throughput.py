"""Throughput measurements beside the trainer's own: the data loader alone and the method's step alone.

* loader alone: batches from the pretraining loader as the trainer builds it, on one core (no loader
  workers, one torch thread), so the per-sample and the batched paths compare per core;
* step alone: the method's training step (forward, backward, optimizer, method hooks) on one batch held
  in memory, with the trainer's autocast and compile settings; with a GPU also the model FLOPs utilisation
  (FLOPs of one step counted by ``torch.utils.flop_counter``) and the peak memory.

``trainer images/s / step-alone images/s`` is the share of the step's speed the full loop keeps: what the
data path and the loop's bookkeeping cost.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ssl_bench.build import build_method
from ssl_bench.data.datasets import load_dataset
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.distributed import resolve_device
from ssl_bench.optim import build_optimizer, scaled_lr

# dense bf16 peak of the GPUs we know (TFLOP/s); MFU is left out for others
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_on_device(cfg: dict):
    """``cfg``'s method, built from the run's seed on the run's device (the one ``train.device`` resolves to):
    -> (method, device). What every timed step here and the FLOP count start from."""
    device = resolve_device(cfg["train"]["device"])
    torch.manual_seed(cfg["seed"])
    _, info = load_dataset(cfg["data"]["name"], cfg["data"]["root"], "pretrain", img_size=cfg["data"]["img_size"])
    method = build_method(cfg, info).to(device)
    return method, device


def loader_alone(cfg: dict, batches: int = 8) -> float:
    """Images/s of the pretraining loader on one core: no workers, one torch thread."""
    cfg = {**cfg, "data": {**cfg["data"], "num_workers": 0}}
    method, device = build_on_device(cfg)
    with _threads(1):
        loader, sampler, _, _ = build_pretrain_loader(cfg, method.data_spec(), device=device)
        next(iter(loader))  # warm-up
        # whole items of a loader that draws several batches at once (the batched path's masks), from the
        # first: the timed batches pay their share of the draws; within one epoch
        per_item = getattr(loader, "batches_per_item", 1)
        batches = max(1, min(per_item * -(-batches // per_item), sampler.steps_per_epoch))
        it = iter(loader)
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            batch = next(it)
            n += len(batch["views"][0])
        _sync(device)
        return n / (time.perf_counter() - t0)


def held_batch(cfg: dict, method, device: torch.device) -> dict:
    """One pretraining batch of ``cfg``'s loader, on ``device``: what a step alone runs on."""
    from ssl_bench.trainer import batch_to_device

    loader, *_ = build_pretrain_loader(cfg, method.data_spec(), device=device)
    return batch_to_device(next(iter(loader)), device)


def seconds_per_step(one_step, device: torch.device, steps: int) -> float:
    """Mean seconds of ``one_step(i)`` over ``steps`` calls, after two (allocation, compilation); the peak
    memory statistics are reset after those two."""
    for i in range(2):
        one_step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        one_step(2 + i)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def step_flops(method, batch: dict, device: torch.device, amp) -> int:
    """Model FLOPs of one training step of ``method`` on ``batch`` (forward and backward, eager, counted by
    ``torch.utils.flop_counter``); the gradients it leaves are the caller's to clear."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_bench.runtime import autocast

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, amp):
            loss = sum(method(batch).values())
        loss.backward()
    method.pop_logged(as_float=False)
    return counter.get_total_flops()


def step_alone(cfg: dict, steps: int = 8) -> dict:
    """The method's step on one batch held in memory: images/s, whether it ran compiled
    (``runtime.compiled_or_not``), and with a GPU MFU and peak memory."""
    from ssl_bench.runtime import autocast, compiled_or_not, compiled_step

    method, device = build_on_device(cfg)
    train = cfg["train"]
    batch = held_batch(cfg, method, device)
    images = len(batch["views"][0])
    lr = scaled_lr(train, train["batch_size"])
    optimizer = build_optimizer(method.param_groups(train["weight_decay"]), train["optimizer"], lr,
                                betas=train["betas"], momentum=train["momentum"])
    model = compiled_step(method, cfg, device)
    method.train()

    def one_step(i: int) -> None:
        method.on_step_start(i, 1000)
        with autocast(device, train["amp"]):
            loss = sum(model(batch).values())
        loss.backward()
        if train["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(method.parameters(), train["clip_grad"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        method.pop_logged(as_float=False)

    seconds = seconds_per_step(one_step, device, steps)
    out = {"step_images_per_s": images / seconds, "step_compiled": compiled_or_not(model), "mfu": None, "peak_mem_gib": None,
           "flops_per_step": None}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["flops_per_step"] = step_flops(method, batch, device, train["amp"])
        optimizer.zero_grad(set_to_none=True)
        peak = peak_tflops(device)
        if peak:
            out["mfu"] = out["flops_per_step"] / seconds / (peak * 1e12)
    return out
