"""Progress for long loops: a tqdm bar on a terminal, a periodic plain line in logs (files, SLURM).

    progress = StepProgress(total=312, initial=0, mode="auto")   # "auto" | True/"bar" | "lines" | False
    progress.update(loss=0.51, img_s=312)                          # once per step
    progress.close()

A job's output that is not a terminal gets one line every ``every_s`` seconds (and at the end) with
the step, percentage, postfix values, elapsed time and an estimate of what is left, so a log shows how
far a run has got without a bar's carriage returns.
"""
from __future__ import annotations

import sys
import time

MODES = ("auto", "bar", "lines", "off")


def resolve_mode(mode: bool | str | None, stream=None) -> str:
    """True/"auto" -> "bar" on a terminal, "lines" otherwise; False/None/"off" -> "off"."""
    if mode is False or mode is None or mode == "off":
        return "off"
    if mode is True or mode == "auto":
        stream = stream or sys.stderr
        return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    return mode


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StepProgress:
    def __init__(self, total: int, initial: int = 0, mode: bool | str = "auto", every_s: float = 30.0,
                 label: str = "step", stream=None):
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.total, self.n, self.label, self.every_s = total, initial, label, every_s
        self._start_n, self._t0 = initial, time.perf_counter()
        self._last_line = self._t0
        self._postfix: dict = {}
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=label, dynamic_ncols=True, mininterval=1.0, file=self.stream)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self._postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.every_s:
                self._last_line = now
                self._print_line(now)

    def write(self, text: str) -> None:
        """A line of its own on the progress stream; a bar is redrawn below it."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """'  step 120/312 (38%)  loss 0.5123  img_s 312  elapsed 1.2 min, ~2.0 min left'."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._start_n
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if done > 0 and self.total:
            left = f", ~{format_duration(elapsed / done * max(0, self.total - self.n))} left"
        values = "".join(f"  {k} {v}" for k, v in self._postfix.items())
        return f"  {self.label} {self.n}/{self.total}{pct}{values}  elapsed {format_duration(elapsed)}{left}"

    def _print_line(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.n > self._start_n:
            self._print_line(time.perf_counter())
            self.mode = "off"  # close() twice prints once


class StageClock:
    """Elapsed time and an estimate of what is left over a list of stages (a benchmark's runs and
    evaluations), printed as one line when each stage starts.

    A stage's kind (e.g. "pretrain", "eval/knn") groups stages of similar cost: what is left is the mean
    time of the finished stages of each kind times the stages of that kind still to run. Kinds not yet
    timed are counted, not guessed.
    """

    def __init__(self, kinds: list[str], stream=None):
        self.todo = list(kinds)  # kind of each stage still to run, in order
        self.total = len(kinds)
        self.times: dict[str, list[float]] = {}
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._current: tuple[str, float] | None = None

    def estimate_left(self) -> tuple[float, int]:
        """(seconds, number of stages whose kind has no timing yet) for the stages not finished."""
        seconds, untimed = 0.0, 0
        for kind in self.todo:
            if self.times.get(kind):
                seconds += sum(self.times[kind]) / len(self.times[kind])
            else:
                untimed += 1
        return seconds, untimed

    def start(self, kind: str, text: str) -> None:
        """Print '[3/28, elapsed 4.2 min, ~12 min left] text' and start timing a stage of ``kind``."""
        self.finish()
        seconds, untimed = self.estimate_left()
        left = f"~{format_duration(seconds)} left" if seconds else "time left not known yet"
        if seconds and untimed:
            left += f" + {untimed} stage(s) not yet timed"
        done = self.total - len(self.todo)
        elapsed = format_duration(time.perf_counter() - self._t0)
        print(f"[{done + 1}/{self.total}, elapsed {elapsed}, {left}] {text}", file=self.stream, flush=True)
        self._current = (kind, time.perf_counter())

    def finish(self) -> None:
        """The current stage ended (done or failed): time it and drop it from what is left."""
        if self._current is None:
            return
        kind, t0 = self._current
        self.times.setdefault(kind, []).append(time.perf_counter() - t0)
        self.todo.remove(kind)
        self._current = None

    def skip(self, kinds: list[str]) -> None:
        """Stages that will not run (e.g. the evaluations of a run whose pretraining failed)."""
        for kind in kinds:
            self.todo.remove(kind)
