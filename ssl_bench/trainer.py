"""One training loop for every method.

    cfg -> method.prepare -> build method + data -> [step: schedules, forward, backward, optimizer,
    method hooks, log, checkpoint] -> run.json

Exact resume: the checkpoint holds model, optimizer, step, elapsed time and the RNG states; the data
order and every sample's augmentation and mask are functions of (seed, epoch, index) (see
``ssl_bench.data.pipeline``), so a resumed run takes the same steps as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from ssl_bench.atomic import WriteFailed, make_folder, remove_stale_temps
from ssl_bench.build import build_method
from ssl_bench.checkpoint import check_signature, load_checkpoint, save_checkpoint
from ssl_bench.data.pipeline import build_pretrain_loader, loader_advice
from ssl_bench.distributed import init_distributed, resolve_device
from ssl_bench.errors import TrainingDiverged, UserError
from ssl_bench.logging import LogWindow, MetricLogger, require_wandb
from ssl_bench.monitor import build_monitor
from ssl_bench.optim import build_optimizer, cosine_with_warmup, scaled_lr, set_lr, set_weight_decay
from ssl_bench.records import git_commit, hardware, now_iso, read_json, write_json_atomic
from ssl_bench.registry import get_method
from ssl_bench.runtime import autocast, compiled_step, rng_state, seed_everything, set_rng_state
from ssl_bench.rundir import CHECKPOINT_NAME, RECORD_NAME, checked_config, locked, prepare_run_dir

LOADER_BOUND_SHARE = 0.25  # a logged window that waits for data longer than this share of its time may say so (LogWindow)


def _loss_summary(history: dict[str, list[tuple[int, float]]]) -> dict:
    """First / last / min per series (a loss, or a metric the method logs), and a curve of at most 100 points (step, value)."""
    out = {}
    for name, points in history.items():
        values = [v for _, v in points]
        if not values:
            continue
        tail = values[-max(1, len(values) // 10):]
        stride = max(1, len(points) // 100)
        out[name] = {
            "first": values[0], "last": values[-1], "min": min(values),
            "last_10pct_mean": sum(tail) / len(tail), "curve": points[::stride],
        }
    return out


# -- the loop ----------------------------------------------------------------------------------
def pretrain(cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    """Pretrain ``cfg["method_name"]`` as ``cfg`` says; returns the run record (also ``out_dir/run.json``).
    The main process holds the run's lock (``ssl_bench.rundir.locked``): a second process on the same
    run directory waits, then finds the run finished or resumes it."""
    if int(os.environ.get("RANK", 0)) != 0:
        return _pretrain(cfg, out_dir, resume)
    make_folder(out_dir, "--out")  # one that cannot be made is one line before any work
    with locked(out_dir, "pretraining this run"):
        return _pretrain(cfg, out_dir, resume)


def _pretrain(cfg: dict, out_dir: str | Path, resume: bool) -> dict:
    dist_info = init_distributed()
    run_dir = prepare_run_dir(out_dir, resume) if dist_info.is_main else Path(out_dir)
    if resume and dist_info.is_main:
        remove_stale_temps(run_dir)  # what a killed run was writing when it died
    requested = cfg  # as asked for, before prepare(): what a later sweep on this directory must ask for again
    if resume and (run_dir / RECORD_NAME).exists():
        previous = read_json(run_dir / RECORD_NAME)
        if previous.get("status") == "finished":
            return previous  # e.g. a requeued job whose run had already completed
        if previous.get("config") is not None:  # a resumed run continues with the config it started with
            cfg = checked_config(previous["config"], run_dir / RECORD_NAME)
            requested = previous.get("requested_config")  # (none in runs from before the key)
    if dist_info.world_size > 1:
        torch.distributed.barrier()

    method_cls = get_method(cfg["method_name"])
    if dist_info.is_main:
        cfg = method_cls.prepare(cfg, run_dir)
    if dist_info.world_size > 1:
        box = [cfg]
        torch.distributed.broadcast_object_list(box, src=0)
        cfg = box[0]

    train = cfg["train"]
    if train.get("wandb"):  # (absent from configs of runs started before the option)
        require_wandb()  # before the run directory holds a record
    device = resolve_device(train["device"])
    if device.type == "cuda":  # TF32 matmuls and convolutions for the float32 parts (bf16 autocast does the rest)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg["seed"] + dist_info.rank)

    # The data set's size and channels decide the backbone, so data comes first; the method's
    # mask generator needs the patch grid, so the method is built before the loader.
    from ssl_bench.data.datasets import load_dataset

    _, info = load_dataset(cfg["data"]["name"], cfg["data"]["root"], "pretrain", img_size=cfg["data"]["img_size"])
    method = build_method(cfg, info).to(device)
    loader, sampler, dataset, info = build_pretrain_loader(cfg, method.data_spec(), dist_info.rank, dist_info.world_size, device)

    accum = train["accum_steps"]
    steps_per_epoch = sampler.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise UserError(f"one epoch has {sampler.steps_per_epoch} micro-batches, fewer than train.accum_steps={accum}; lower accum_steps or batch_size")
    total_steps = steps_per_epoch * train["epochs"]
    stop_step = min(total_steps, total_steps if train["max_steps"] is None else train["max_steps"])
    effective_batch = train["batch_size"] * accum * dist_info.world_size
    base_lr = scaled_lr(train, effective_batch)
    warmup_steps = int(round(train["warmup_epochs"] * steps_per_epoch))

    optimizer = build_optimizer(
        method.param_groups(train["weight_decay"]), train["optimizer"], base_lr, betas=train["betas"], momentum=train["momentum"]
    )

    step, elapsed, history, logged = 0, 0.0, {}, {}  # logged: what the method logs besides losses (monitors)
    monitor_state = None
    ckpt_path = run_dir / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("method") != method_cls.name:
            raise UserError(f"checkpoint {ckpt_path} is from method '{ckpt.get('method')}', not '{method_cls.name}'; use another --out")
        try:
            check_signature(ckpt["signature"], method.encoder.signature(), ckpt_path)
            method.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, elapsed, history = int(ckpt["step"]), float(ckpt["elapsed_s"]), dict(ckpt["history"])
            logged = ckpt.get("logged", {})
            monitor_state = ckpt.get("monitor")
            set_rng_state(ckpt["rng"][dist_info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:  # a part missing or of another shape
            raise UserError(f"checkpoint {ckpt_path} is corrupt: it does not hold what a run of this config saves "
                            f"({exc.__class__.__name__}); resume from an intact copy, or start a new run with another --out") from None

    model = method
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    model = compiled_step(model, cfg, device)

    record = {
        "status": "running",
        "method": method_cls.name,
        "family": method_cls.family,
        "data": cfg["data"]["name"],
        "preset": cfg.get("preset"),
        "seed": cfg["seed"],
        "arch": method.encoder.signature(),
        "data_info": dataclasses.asdict(info),
        "epochs": train["epochs"],
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "effective_batch": effective_batch,
        "lr": base_lr,
        "world_size": dist_info.world_size,
        "num_params": sum(p.numel() for p in method.parameters()),
        "config": cfg,
        "requested_config": requested,
        "hardware": hardware(),
        "git_commit": git_commit(),
        "started": now_iso(),
    }
    if dist_info.is_main:
        write_json_atomic(run_dir / RECORD_NAME, record)

    logger = MetricLogger(
        run_dir, enabled=dist_info.is_main, progress=train["progress"], total=stop_step, initial=step, log_every=train["log_every"],
        wandb={"project": train.get("wandb_project", "ssl-bench"), "config": cfg} if train.get("wandb") else None,
    )
    monitor = build_monitor(cfg, method, info, device, logger) if dist_info.is_main else None
    if monitor is not None and monitor_state:
        monitor.load_state_dict(monitor_state)
    images_per_step = effective_batch
    timed_steps, timed_seconds, timed_data_seconds = 0, 0.0, 0.0

    def checkpoint() -> None:
        rng = rng_state()
        if dist_info.world_size > 1:  # every rank's RNG, so each resumes its own stream
            rng = [None] * dist_info.world_size
            torch.distributed.all_gather_object(rng, rng_state())
        if not dist_info.is_main:
            return
        save_checkpoint(ckpt_path, {
            "method": method_cls.name, "signature": method.encoder.signature(), "step": step,
            "model": method.state_dict(), "encoder": method.encoder.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng, "elapsed_s": elapsed,
            "history": history, "logged": logged, "config": cfg,
            "monitor": monitor.state_dict() if monitor is not None else None,
        })

    def finish(status: str, **extra) -> dict:
        record.update(status=status, steps=step, finished=now_iso(), wall_time_s=elapsed, loss=_loss_summary(history), **extra)
        record["metrics"] = _loss_summary(logged)  # e.g. SimSiam's collapse monitor z_std
        ips = images_per_step * timed_steps / timed_seconds if timed_seconds > 0 else None
        data_share = timed_data_seconds / timed_seconds if timed_seconds > 0 else None
        n_gpus = dist_info.world_size if device.type == "cuda" else 0
        record.update(images_per_s=ips, data_share=data_share, gpu_hours=elapsed * n_gpus / 3600.0)
        if monitor is not None:
            record["monitor"] = monitor.summary()
        if dist_info.is_main:
            try:
                write_json_atomic(run_dir / RECORD_NAME, record)
            except WriteFailed:
                if status == "finished":
                    raise
                # a failed run's error (often this same full disk) is the one worth reporting
        logger.close()
        return record

    # Losses stay on the device; they are read (one sync) every log_every steps and before each
    # checkpoint, where the NaN/inf guard runs: a checkpoint never holds weights after a bad step.
    pending: list[tuple[int, int, float, dict, dict]] = []  # (step index, epoch, lr, losses, logged)
    window = LogWindow(images_per_step, LOADER_BOUND_SHARE)

    def flush() -> None:
        if not pending:
            return
        tensors = [v for *_, losses, metrics in pending for v in (*losses.values(), *metrics.values()) if isinstance(v, torch.Tensor)]
        numbers = iter(torch.stack([t.float().reshape(()).to(device) for t in tensors]).tolist() if tensors else [])

        def read(values: dict) -> dict:
            return {k: next(numbers) if isinstance(v, torch.Tensor) else v for k, v in values.items()}

        rows = [(index, epoch, lr, read(losses), read(metrics)) for index, epoch, lr, losses, metrics in pending]
        pending.clear()
        rate, data_share, loader_bound = window.close(len(rows))
        for index, epoch, lr, losses, metrics in rows:
            if not math.isfinite(losses["loss"]):
                parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items() if k != "loss")
                raise TrainingDiverged(
                    f"loss is {losses['loss']} at step {index} ({parts}); stopped; last good checkpoint: "
                    f"{ckpt_path if ckpt_path.exists() else 'none yet'}; lower train.blr or set train.clip_grad"
                )
            for k, v in losses.items():
                history.setdefault(k, []).append((index + 1, v))
            for k, v in metrics.items():
                logged.setdefault(k, []).append((index + 1, v))
            logger.step(index + 1, epoch, lr, losses, metrics, rate, data_share)
        if loader_bound:
            first, last = rows[0][0] + 1, rows[-1][0] + 1
            logger.note(f"ssl-bench: steps {first}-{last} spent {data_share:.0%} of their time waiting for data "
                        f"(data_share in metrics.jsonl): the loader, not the step, sets the pace; {loader_advice(cfg, device)}")

    method.train()
    try:
        while step < stop_step:
            epoch, start_in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start_in_epoch * accum)
            dataset.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(start_in_epoch, steps_per_epoch):
                t0 = time.perf_counter()
                lr = cosine_with_warmup(step, total_steps, warmup_steps, base_lr, train["min_lr"])
                set_lr(optimizer, lr)
                if train.get("weight_decay_end") is not None:  # no warmup, as DINO's schedule
                    set_weight_decay(optimizer, cosine_with_warmup(step, total_steps, 0, train["weight_decay"], train["weight_decay_end"]))
                method.on_step_start(step, total_steps)
                totals: dict[str, torch.Tensor] = {}
                data_seconds = 0.0
                for micro in range(accum):
                    t_data = time.perf_counter()
                    batch = batch_to_device(next(batches), device)
                    data_seconds += time.perf_counter() - t_data
                    sync = micro == accum - 1 or dist_info.world_size == 1
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, train["amp"]):
                        losses = model(batch)
                        loss = sum(losses.values())
                    (loss / accum).backward()
                    for k, v in {**losses, "loss": loss}.items():
                        totals[k] = totals[k] + v.detach() / accum if k in totals else v.detach() / accum
                window.waited(data_seconds)
                if train["clip_grad"]:
                    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(method.parameters(), train["clip_grad"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_optimizer_step()
                step += 1
                if monitor is not None:
                    monitor.on_batch(step, batch, method)
                # copies of what the method logged: a CUDA-graphed step (train.compile_mode=reduce-overhead) reuses its
                # outputs' memory at the next step, and these are read at the next log (the monitor logs here too)
                logged_now = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in method.pop_logged(as_float=False).items()}
                pending.append((step - 1, epoch, lr, totals, logged_now))
                if step % train["log_every"] == 0 or step % train["ckpt_every"] == 0 or step == stop_step or step == 1:
                    flush()  # before any checkpoint: the NaN guard keeps bad weights out of it
                dt = time.perf_counter() - t0
                elapsed += dt
                if step > 2 or stop_step <= 2:  # the first steps pay for allocation/compilation
                    timed_steps, timed_seconds, timed_data_seconds = timed_steps + 1, timed_seconds + dt, timed_data_seconds + data_seconds
                if monitor is not None and step % steps_per_epoch == 0:  # before the checkpoint, which keeps its result
                    monitor.on_epoch_end(epoch)
                if step % train["ckpt_every"] == 0 or step == stop_step:
                    checkpoint()
                if step >= stop_step:
                    break
    except TrainingDiverged as exc:
        finish("diverged", error=str(exc))
        raise
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or a preempted/requeued job: resumable
        with contextlib.suppress(TrainingDiverged):
            flush()
        finish("interrupted", error=f"{exc.__class__.__name__}: {exc}")
        raise
    except BaseException as exc:
        finish("failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    if stop_step == 0:  # a 0-step run (the random_init control) still leaves the weights it was built with
        checkpoint()
    return finish("finished")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A loader's batch with its tensors, and the tensors of its lists (the views), on ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list):
            out[k] = [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in v]
        else:
            out[k] = v
    return out
