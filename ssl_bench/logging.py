"""Training logs: metrics.jsonl (every logged step, every key), metrics.csv (fixed columns from the
first row), TensorBoard scalars when tensorboard is installed, a wandb run when asked (``train.wandb=true``,
``pip install 'ssl-bench[wandb]'``; ``WANDB_MODE=offline`` writes it under the run directory with no
network), and progress (``ssl_bench.progress``: a bar on a terminal, a periodic line in logs)."""
from __future__ import annotations

import csv
import io
import json
import time
import uuid
from pathlib import Path

from ssl_bench.errors import UserError
from ssl_bench.progress import StepProgress

WANDB_ID_FILE = "wandb_id"  # one wandb run per run directory: a resumed run continues it


def require_wandb():
    """The wandb module, or one line saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb=true needs the wandb package: pip install 'ssl-bench[wandb]' (or set train.wandb=false)") from None
    return wandb


def init_wandb(run_dir: Path, project: str, config: dict):
    """A wandb run named after the run directory, its files under it (run_dir/wandb/), resumed if the run is."""
    wandb = require_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)


class LogWindow:
    """The steps between two logged rows: their images/s and the share of their wall time spent waiting for the
    loader's batches, and whether this window should say that the loader sets the pace. It says so once per
    process, never in the process's first window (which pays for compilation and the first batches), and only
    from ``min_steps`` steps, so a short window's one slow batch does not speak for a run."""

    def __init__(self, images_per_step: int, loader_bound_share: float, min_steps: int = 5):
        self.images_per_step, self.loader_bound_share, self.min_steps = images_per_step, loader_bound_share, min_steps
        self.start, self.data_seconds, self.closed, self.said = time.perf_counter(), 0.0, 0, False

    def waited(self, seconds: float) -> None:
        """Time spent in the loader's ``next()`` during this window."""
        self.data_seconds += seconds

    def close(self, steps: int) -> tuple[float, float, bool]:
        """End the window after ``steps`` steps -> (images/s, data share, whether to say the loader sets the pace)."""
        now = time.perf_counter()
        wall = max(now - self.start, 1e-9)
        rate, share = self.images_per_step * steps / wall, min(1.0, self.data_seconds / wall)
        say = share > self.loader_bound_share and self.closed > 0 and steps >= self.min_steps and not self.said
        self.start, self.data_seconds, self.closed, self.said = now, 0.0, self.closed + 1, self.said or say
        return rate, share, say


def keep_rows_up_to(run_dir: Path, last_step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` / ``metrics.csv`` after ``last_step`` (and a row cut short by a kill):
    a run resumed from its checkpoint at ``last_step`` logs the steps after it again, once."""
    from ssl_bench.atomic import atomic_write

    def kept(row: dict) -> bool:
        try:
            return int(row["step"]) <= last_step
        except (KeyError, TypeError, ValueError):
            return False

    jsonl = run_dir / "metrics.jsonl"
    if jsonl.exists():
        rows = []
        for line in jsonl.read_text().splitlines():
            try:
                rows.append((line, json.loads(line)))
            except ValueError:
                continue
        text = "".join(f"{line}\n" for line, row in rows if isinstance(row, dict) and kept(row))
        atomic_write(jsonl, lambda f: f.write(text.encode()))
    table = run_dir / "metrics.csv"
    if table.exists():
        with open(table, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, [r for r in reader if kept(r)]
        if header:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write(table, lambda f: f.write(out.getvalue().encode()))


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, progress: bool | str = "auto", total: int = 0, initial: int = 0, log_every: int = 1,
                 wandb: dict | None = None):
        """``wandb``: None, or the arguments of :func:`init_wandb` besides the run directory (project, config)."""
        self.enabled, self.log_every = enabled, log_every
        self.run_dir = Path(run_dir)
        if enabled and initial:
            keep_rows_up_to(self.run_dir, initial)  # a resumed run logs the steps after its checkpoint again
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a") if enabled else None
        self._csv_file, self._csv, self._tb, self._bar = None, None, None, None
        self._wandb = init_wandb(self.run_dir, **wandb) if enabled and wandb else None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=initial + 1 if initial else None)
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
        if enabled:
            self._bar = StepProgress(total=total, initial=initial, mode=progress)

    def step(self, step: int, epoch: int, lr: float, losses: dict, metrics: dict, images_per_s: float, data_share: float) -> None:
        """One optimizer step's row. ``images_per_s`` and ``data_share`` (the share of the wall time spent
        waiting for the loader's batches) are over the logged window the step belongs to."""
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "lr": lr, **losses, **metrics, "images_per_s": images_per_s, "data_share": data_share}
        if self._bar is not None:
            self._bar.update(1, loss=f"{losses.get('loss', float('nan')):.4f}", img_s=f"{images_per_s:.0f}", data=f"{data_share:.0%}")
        if step % self.log_every and step != 1:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._csv is None:
            new = not (self.run_dir / "metrics.csv").exists()
            self._csv_file = open(self.run_dir / "metrics.csv", "a", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(row), extrasaction="ignore")
            if new:
                self._csv.writeheader()
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}" if k != "epoch" else k: v for k, v in row.items() if k != "step"}, step=step)

    def scalars(self, step: int, epoch: int, values: dict) -> None:
        """Occasional values (e.g. the monitor's kNN check): a metrics.jsonl row and TensorBoard scalars."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({"epoch": epoch, **values}, step=step)

    def note(self, text: str) -> None:
        """A one-off line for the user (stderr), written around the progress bar."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        for f in (self._jsonl, self._csv_file):
            if f is not None and not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
