"""Training logs: metrics.jsonl (every logged step, every key), metrics.csv (fixed columns from the
first row), TensorBoard scalars when tensorboard is installed, and progress (``ssl_bench.progress``: a bar
on a terminal, a periodic line in logs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ssl_bench.progress import StepProgress


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, progress: bool | str = "auto", total: int = 0, initial: int = 0, log_every: int = 1):
        self.enabled, self.log_every = enabled, log_every
        self.run_dir = Path(run_dir)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a") if enabled else None
        self._csv_file, self._csv, self._tb, self._bar = None, None, None, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
        if enabled:
            self._bar = StepProgress(total=total, initial=initial, mode=progress)

    def step(self, step: int, epoch: int, lr: float, losses: dict, metrics: dict, images_per_s: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "lr": lr, **losses, **metrics, "images_per_s": images_per_s}
        if self._bar is not None:
            self._bar.update(1, loss=f"{losses.get('loss', float('nan')):.4f}", img_s=f"{images_per_s:.0f}")
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

    def scalars(self, step: int, epoch: int, values: dict) -> None:
        """Occasional values (e.g. the monitor's kNN check): a metrics.jsonl row and TensorBoard scalars."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        for f in (self._jsonl, self._csv_file):
            if f is not None and not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
