"""Progress output: a bar on a terminal, periodic lines in logs, and the benchmark's stage clock."""
from __future__ import annotations

import io

import pytest

from ssl_bench.progress import StageClock, StepProgress, resolve_mode


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_mode_follows_the_stream():
    assert resolve_mode("auto", FakeTTY()) == "bar"
    assert resolve_mode(True, io.StringIO()) == "lines"  # a log file or SLURM output
    assert resolve_mode(False) == "off" and resolve_mode("off") == "off"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def test_lines_mode_prints_step_percentage_and_time_left():
    out = io.StringIO()
    progress = StepProgress(total=10, mode="lines", every_s=0.0, stream=out)
    for i in range(4):
        progress.update(loss=f"{1.0 / (i + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert "step 4/10 (40%)" in lines[-1] and "loss 0.250" in lines[-1] and "left" in lines[-1]
    progress.close()
    progress.close()
    assert len(out.getvalue().splitlines()) == 5  # one closing line, once


def test_lines_mode_is_periodic_not_per_step():
    out = io.StringIO()
    progress = StepProgress(total=1000, mode="lines", every_s=3600, stream=out)
    for _ in range(1000):
        progress.update()
    assert out.getvalue() == ""
    progress.close()
    assert "step 1000/1000 (100%)" in out.getvalue()


def test_stage_clock_estimates_from_finished_stages_of_the_same_kind():
    out = io.StringIO()
    clock = StageClock(["pretrain", "eval/knn", "pretrain", "eval/knn"], stream=out)
    clock.start("pretrain", "a: pretraining")
    assert "[1/4," in out.getvalue() and "time left not known yet" in out.getvalue()
    clock.times["pretrain"] = [10.0]  # as if timed
    clock.finish()  # the running stage is timed too
    assert clock.todo == ["eval/knn", "pretrain", "eval/knn"]
    seconds, untimed = clock.estimate_left()
    assert untimed == 2 and seconds == pytest.approx(sum(clock.times["pretrain"]) / 2)
    clock.start("eval/knn", "a/knn: evaluating")
    assert "[2/4," in out.getvalue().splitlines()[-1] and "2 stage(s) not yet timed" in out.getvalue().splitlines()[-1]
    clock.finish()
    clock.skip(["pretrain", "eval/knn"])  # a failed run's remaining stages
    assert clock.todo == [] and clock.estimate_left() == (0.0, 0)
