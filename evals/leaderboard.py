"""The leaderboard: every finished run under a results directory, one row per method (and per data set /
preset when there are several), a column per evaluation protocol with mean ± std over seeds.

    results/.../<run>/run.json              written by the trainer (status, method, data, preset, seed, cost)
    results/.../<run>/evals/<p>-<data>-<preset>[-k].json   written by ``evals.run.evaluate`` (top1, ...)

Rules (stated again under the table):
* runs whose status is not "finished" are skipped, with a note naming them;
* a seed counts once per (method, data, preset): the latest finished run of that seed;
* a protocol counts once per run: its latest record (a rerun writes ``-1``, ``-2``..., never overwrites);
* std is the sample std (ddof 1) over seeds; a cell shows n when it averages more than one run;
* an evaluation on another data set (transfer) or preset gets its own column, e.g. ``finetune (cifar10)``;
  so does each mode: ``linear (official)``, ``linear (fast)``, ``finetune (proxy)`` (records before modes
  existed have none);
* a cell is marked † when a counted record warns that its choice sits on the edge of its grid;
* "Against the controls" (under the table): per protocol column, which control rows a method beats beyond
  the seed spread (its lowest seed above the control's highest), with at least two seeds of the method and
  of each control (a control without that protocol is left out of its verdict);
* an eval record whose ``checkpoint_sha256`` is not the run's current ``checkpoint.pt`` is stale (it scored
  weights that are no longer there): it is not counted and is listed under the table. Records whose run keeps
  no checkpoint (committed results) cannot be checked and count.

Outputs (atomic writes, deterministic content so a regenerated table diffs cleanly):
``leaderboard.md`` / ``.csv`` / ``.tex`` (tabulate) and ``leaderboard.png`` (top-1 per method and protocol).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from evals.registry import protocol_order
from ssl_bench.atomic import atomic_write, make_folder
from ssl_bench.config import comma_list
from ssl_bench.errors import UserError
from ssl_bench.records import CONTROL_FAMILY, file_sha256
from ssl_bench.rundir import CHECKPOINT_NAME, RECORD_NAME, eval_made_with, eval_records, eval_stem, has_stem, record_rank

FORMATS = {"md": "leaderboard.md", "csv": "leaderboard.csv", "latex": "leaderboard.tex"}
PLOT_NAME = "leaderboard.png"
MISSING = "-"
EDGE_MARK = " †"


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0


@dataclass
class Row:
    method: str
    family: str
    data: str
    preset: str
    seeds: list = field(default_factory=list)
    top1: dict[str, Stat] = field(default_factory=dict)  # column -> Stat
    edge: set[str] = field(default_factory=set)  # columns with a choice on the edge of its grid
    ci_half: dict[str, float] = field(default_factory=dict)  # column -> widest 95% half-width over test images
    images_per_s: Stat | None = None
    gpu_hours: Stat | None = None
    wall_min: Stat | None = None
    hardware: list[str] = field(default_factory=list)


@dataclass
class Leaderboard:
    rows: list[Row]
    columns: list[str]  # protocol columns, in display order
    notes: list[str]  # skipped runs and records
    show_data: bool
    show_preset: bool


# -- reading ---------------------------------------------------------------------------------------
def _read(path: Path) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _column(protocol: str, eval_data: str, eval_preset: str, run_data: str, run_preset: str, mode: str | None = None) -> str:
    extra = [mode] if mode else []
    extra += [eval_data] if eval_data != run_data else []
    extra += [f"{eval_preset} preset"] if eval_preset != run_preset else []
    return f"{protocol} ({', '.join(extra)})" if extra else protocol


def _column_key(col: str) -> tuple:
    base = col.split(" (")[0]
    return (protocol_order(base), base, col)


def _run_evals(run_dir: Path, record: dict, notes: list[str], rel, asked: dict | None = None) -> dict[str, tuple[float, dict]]:
    """column -> (top1, record) of the latest eval record of each protocol (and mode / data set / preset), of
    those made with the settings ``asked`` (see ``collect``)."""
    latest: dict[str, tuple] = {}
    checkpoint, current = run_dir / CHECKPOINT_NAME, None
    for path in eval_records(run_dir):
        ev = _read(path)
        top1 = ev.get("top1") if ev else None
        if not _is_top1(top1) or not _texts(ev, ("protocol",), ("data", "preset", "mode")):
            notes.append(f"skipped eval record {rel(path)}: unreadable, or without a top-1 in [0, 100] and its protocol")
            continue
        if ev.get("checkpoint_sha256") and checkpoint.is_file():
            current = current or file_sha256(checkpoint)
            if ev["checkpoint_sha256"] != current:
                notes.append(f"stale, not counted: {rel(path)} scored a checkpoint (sha256 {ev['checkpoint_sha256'][:12]}) that "
                             f"{rel(checkpoint)} no longer is (now {current[:12]}); rerun ssl-bench eval --run {rel(run_dir)}")
                continue
        wanted = (asked or {}).get("protocols", {}).get(ev["protocol"])
        if wanted is not None and has_stem(path, eval_stem(ev["protocol"], asked["data"], asked["preset"], wanted.get("mode"))) \
                and not eval_made_with(ev, ev["protocol"], wanted):
            notes.append(f"not counted: {rel(path)} was made with other {ev['protocol']} settings than this sweep asks for")
            continue
        col = _column(ev["protocol"], ev.get("data", record["data"]), ev.get("preset", record.get("preset")), record["data"], record.get("preset"), ev.get("mode"))
        rank = record_rank(path, ev)
        if col not in latest or rank > latest[col][0]:
            latest[col] = (rank, (float(top1), ev))
    return {col: v for col, (_, v) in latest.items()}


def _is_top1(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 100


def _texts(record: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> bool:
    """``required`` keys hold non-empty strings, ``optional`` ones a string or nothing."""
    return (all(isinstance(record.get(k), str) and record[k] for k in required)
            and all(isinstance(record.get(k), (str, type(None))) for k in optional))


def _seed(record: dict):
    """The run's seed (run.json's, else its config's): an int, a string (hand-written records), or None."""
    config = record.get("config")
    return record.get("seed", config.get("seed") if isinstance(config, dict) else None)


def _seed_ok(record: dict) -> bool:
    seed = _seed(record)
    return seed is None or isinstance(seed, (int, str)) and not isinstance(seed, bool)


def collect(results_dir: str | Path, asked: dict | None = None) -> Leaderboard:
    """Walk ``results_dir`` (any depth) for run directories and aggregate them. ``asked`` (a sweep's
    {"data", "preset", "protocols": protocol -> settings}): in the columns of that data set, preset and mode, only
    records made with those settings count, so a table never shows a score its sweep did not ask for."""
    root = Path(results_dir)
    if not root.is_dir():
        state = "is a file" if root.exists() else "does not exist"
        raise UserError(f"results directory {root} {state}; pass --results DIR holding run directories (e.g. results/)")

    def rel(p: Path) -> str:
        return str(p.relative_to(root))

    notes: list[str] = []
    latest_per_seed: dict[tuple, tuple] = {}  # (data, preset, method, seed) -> (finished, run_dir, record)
    for path in sorted(root.rglob(RECORD_NAME)):
        run_dir = path.parent
        record = _read(path)
        if record is None or not _texts(record, ("method", "data"), ("preset", "family")) or not _seed_ok(record):
            notes.append(f"skipped {rel(run_dir)}: run.json unreadable or incomplete")
            continue
        if record.get("status") != "finished":
            notes.append(f"skipped {rel(run_dir)}: status '{record.get('status')}', not finished")
            continue
        seed = _seed(record)
        key = (record["data"], str(record.get("preset")), record["method"], seed)
        entry = (str(record.get("finished", "")), rel(run_dir), record, run_dir)
        if key in latest_per_seed:
            older, newer = sorted([latest_per_seed[key], entry], key=lambda e: (e[0], e[1]))
            notes.append(f"skipped {older[1]}: same method, data, preset and seed as {newer[1]}, which finished later")
            entry = newer
        latest_per_seed[key] = entry

    rows: dict[tuple, Row] = {}
    def order(item):  # numeric seeds in numeric order (2 before 10)
        data, preset, method, seed = item[0]
        return (data, preset, method, (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed)))

    for (data, preset, method, seed), (_, _, record, run_dir) in sorted(latest_per_seed.items(), key=order):
        row = rows.setdefault((data, preset, method), Row(method, record.get("family", ""), data, preset))
        row.seeds.append(seed)
        for col, (top1, ev) in _run_evals(run_dir, record, notes, rel, asked).items():
            row.top1.setdefault(col, Stat([])).values.append(top1)
            if ev.get("warnings"):
                row.edge.add(col)
            ci = ev.get("ci95")
            if isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
                row.ci_half[col] = max(row.ci_half.get(col, 0.0), (ci[1] - ci[0]) / 2)
        for attr, value in (
            ("images_per_s", record.get("images_per_s")),
            ("gpu_hours", record.get("gpu_hours")),
            ("wall_min", record["wall_time_s"] / 60 if isinstance(record.get("wall_time_s"), (int, float)) else None),
        ):
            if isinstance(value, (int, float)):
                if getattr(row, attr) is None:
                    setattr(row, attr, Stat([]))
                getattr(row, attr).values.append(float(value))
        hardware = record.get("hardware")
        summary = hardware.get("summary") if isinstance(hardware, dict) and isinstance(hardware.get("summary"), str) else None
        if summary and summary not in row.hardware:
            row.hardware.append(summary)

    ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], rows[k].family == CONTROL_FAMILY, k[2]))]  # controls last
    columns = sorted({c for r in ordered for c in r.top1}, key=_column_key)
    return Leaderboard(
        ordered, columns, notes,
        show_data=len({r.data for r in ordered}) > 1, show_preset=len({r.preset for r in ordered}) > 1,
    )


# -- formatting ------------------------------------------------------------------------------------
def fmt_stat(stat: Stat | None, digits: int = 2) -> str:
    """'71.20' for one run, '71.20 ± 0.45 (n=3)' for several."""
    if stat is None or stat.n == 0:
        return MISSING
    if stat.n == 1:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f} (n={stat.n})"


def _plain(stat: Stat | None, digits: int) -> str:
    return MISSING if stat is None else f"{stat.mean:.{digits}f}"


def headers(lb: Leaderboard) -> list[str]:
    return (
        ["Method"] + (["Data"] if lb.show_data else []) + (["Preset"] if lb.show_preset else []) + ["Seeds"]
        + lb.columns + ["Pretrain img/s", "GPU-h", "Pretrain min", "Hardware"]
    )


def table_rows(lb: Leaderboard) -> list[list[str]]:
    out = []
    for r in lb.rows:
        out.append(
            [r.method] + ([r.data] if lb.show_data else []) + ([r.preset] if lb.show_preset else [])
            + [",".join(map(str, r.seeds))]
            + [fmt_stat(r.top1.get(c)) + (EDGE_MARK if c in r.edge else "") for c in lb.columns]
            + [_plain(r.images_per_s, 0), _plain(r.gpu_hours, 2), _plain(r.wall_min, 1), "; ".join(r.hardware) or MISSING]
        )
    return out


def _scope(lb: Leaderboard) -> str:
    parts = []
    if not lb.show_data and lb.rows:
        parts.append(f"data set: {lb.rows[0].data}")
    if not lb.show_preset and lb.rows:
        parts.append(f"preset: {lb.rows[0].preset}")
    return ", ".join(parts)


FOOTNOTE = (
    "Top-1 (%) on the test split; hyper-parameters / epoch selected on a held-out part of the train split. "
    "Several seeds: mean ± sample std (n runs). Cost columns are means per pretraining run."
)


def footnotes(lb: Leaderboard) -> list[str]:
    """Notes the table's content calls for: edge choices, proxies, the widest interval over test images."""
    out = []
    if any(r.edge for r in lb.rows):
        out.append("† a hyper-parameter chosen on held-out sits on the edge of its grid in at least one run (the record's warnings): the best may lie outside the grid.")
    if any("(proxy" in c for c in lb.columns):
        out.append("finetune (proxy): a budget proxy of fine-tuning (the quick preset's LP-FT without augmentation), not the published recipe; compare it only with itself.")
    if any(" (fast" in c for c in lb.columns):
        out.append("(fast): probes on cached un-augmented features with the feature chosen per method (quick looks, and the quick preset's default for its budget); (official): each protocol as its source defines it (docs/protocols.md).")
    if any(c in ("knn", "linear", "attentive") for c in lb.columns):
        out.append("A probe column without a mode holds records written before modes existed: cached un-augmented features, the feature chosen per method (as fast mode).")
    halves = [h for r in lb.rows for h in r.ci_half.values()]
    if halves:
        out.append(f"95% interval over test images (Wilson, in each record's ci95): at most ±{max(halves):.2f} points per run.")
    return out


def beats_controls(lb: Leaderboard) -> dict[tuple[str, str, str], dict[str, str]]:
    """(data, preset, method) -> column -> which control rows (of the same data and preset) the method beats
    beyond the seed spread, its lowest seed above the control's highest: ``all`` (every control that has
    the column), ``none``, or the beaten ones' names joined by ``+``; ``n<2`` when the method or a control
    has fewer than two seeds (no spread to judge by); ``-`` when the method, or every control, has no score
    there. A control without the column (raw pixels cannot be fine-tuned) is left out of its verdict."""
    out: dict[tuple, dict[str, str]] = {}
    for r in lb.rows:
        if r.family == CONTROL_FAMILY:
            continue
        controls = [c for c in lb.rows if c.family == CONTROL_FAMILY and (c.data, c.preset) == (r.data, r.preset)]
        verdicts = {}
        for col in lb.columns:
            mine, theirs = r.top1.get(col), [(c.method, c.top1[col]) for c in controls if col in c.top1]
            if mine is None or not theirs:
                verdicts[col] = MISSING
            elif mine.n < 2 or any(t.n < 2 for _, t in theirs):
                verdicts[col] = "n<2"
            else:
                beaten = [name for name, t in theirs if min(mine.values) > max(t.values)]
                verdicts[col] = "all" if len(beaten) == len(theirs) else "+".join(beaten) or "none"
        out[(r.data, r.preset, r.method)] = verdicts
    return out


def controls_section(lb: Leaderboard) -> list[str]:
    """The markdown lines under the table that say which controls each method beats, per protocol."""
    from tabulate import tabulate

    verdicts = beats_controls(lb)
    if not verdicts:
        return []
    controls = sorted({r.method for r in lb.rows if r.family == CONTROL_FAMILY})
    rows = [[method] + ([data] if lb.show_data else []) + ([preset] if lb.show_preset else []) + [v[c] for c in lb.columns]
            for (data, preset, method), v in verdicts.items()]
    head = ["Method"] + (["Data"] if lb.show_data else []) + (["Preset"] if lb.show_preset else []) + lb.columns
    return [
        f"## Against the controls ({', '.join(controls)})", "",
        "Which control rows each method beats beyond the seed spread (its lowest seed above the control's highest): "
        "all, none, or their names; n<2: fewer than two seeds, so no spread to judge by. A control without the "
        "protocol is left out of its column (raw pixels cannot be fine-tuned).", "",
        tabulate(rows, headers=head, tablefmt="github", disable_numparse=True), "",
    ]


def to_markdown(lb: Leaderboard) -> str:
    from tabulate import tabulate

    lines = ["# Leaderboard", ""]
    scope = _scope(lb)
    if scope:
        lines += [scope[0].upper() + scope[1:], ""]
    if lb.rows:
        lines += [tabulate(table_rows(lb), headers=headers(lb), tablefmt="github", disable_numparse=True), ""]
    else:
        lines += ["No finished runs.", ""]
    lines += [FOOTNOTE, ""]
    for note in footnotes(lb):
        lines += [note, ""]
    controls = sorted({r.method for r in lb.rows if r.family == CONTROL_FAMILY})
    if controls:
        lines += [f"Control rows (never pretrained; what every method should beat): {', '.join(controls)}.", ""]
        lines += controls_section(lb)
    if lb.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in lb.notes] + [""]
    return "\n".join(lines)


def _slug(column: str) -> str:
    """'finetune (cifar10)' -> 'finetune_cifar10', for CSV headers."""
    return re.sub(r"\W+", "_", column).strip("_")


def to_csv(lb: Leaderboard) -> str:
    """Numbers unformatted, one mean/std/n triple per protocol column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["method", "family", "data", "preset", "seeds"]
        + [f"{_slug(c)}_{s}" for c in lb.columns for s in ("mean", "std", "n")]
        + ["images_per_s", "gpu_hours", "pretrain_min", "hardware"]
    )

    def num(stat: Stat | None, attr: str):
        return "" if stat is None else round(getattr(stat, attr), 6)

    for r in lb.rows:
        cells = [r.method, r.family, r.data, r.preset, " ".join(map(str, r.seeds))]
        for c in lb.columns:
            s = r.top1.get(c)
            cells += [num(s, "mean"), num(s, "std"), "" if s is None else s.n]
        cells += [num(r.images_per_s, "mean"), num(r.gpu_hours, "mean"), num(r.wall_min, "mean"), "; ".join(r.hardware)]
        w.writerow(cells)
    return buf.getvalue()


def to_latex(lb: Leaderboard) -> str:
    """booktabs table; tabulate escapes LaTeX's special characters (e.g. moco\\_v3), ± becomes $\\pm$."""
    from tabulate import tabulate

    body = tabulate(table_rows(lb), headers=headers(lb), tablefmt="latex_booktabs", disable_numparse=True)
    scope = f"% {_scope(lb)}\n" if _scope(lb) else ""
    notes = "".join(f"% {n}\n" for n in footnotes(lb))
    return f"% {FOOTNOTE}\n{notes}{scope}" + body.replace("±", r"$\pm$") + "\n"


# -- plot ------------------------------------------------------------------------------------------
def make_figure(lb: Leaderboard):
    """Grouped bars: one group per row (method), one bar per protocol column, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        r.method + (f"\n{r.data}" if lb.show_data else "") + (f"\n{r.preset}" if lb.show_preset else "")
        + ("\n(control)" if r.family == CONTROL_FAMILY else "") for r in lb.rows
    ]
    n_cols = max(1, len(lb.columns))
    width = 0.8 / n_cols
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(lb.rows) * max(1, n_cols) ** 0.5 + 2), 4.5))
    for j, col in enumerate(lb.columns):
        xs = [i + (j - (n_cols - 1) / 2) * width for i in range(len(lb.rows))]
        stats = [r.top1.get(col) for r in lb.rows]
        heights = [s.mean if s else math.nan for s in stats]
        bars = ax.bar(xs, heights, width, label=col)
        for bar, row in zip(bars, lb.rows):
            if row.family == CONTROL_FAMILY:  # the baseline reads as a reference, not as one more method
                bar.set_hatch("//")
                bar.set_edgecolor("white")  # light hatch lines keep the white value labels readable
                bar.set_linewidth(0)
        ax.bar_label(bars, labels=[f"{h:.1f}" if s else "" for h, s in zip(heights, stats)], label_type="center", rotation=90, fontsize=7, color="white")
        spread = [(x, s) for x, s in zip(xs, stats) if s and s.n > 1]  # error bars only where there are seeds
        if spread:
            ax.errorbar([x for x, _ in spread], [s.mean for _, s in spread], yerr=[s.std for _, s in spread], fmt="none", ecolor="black", capsize=2, lw=1)
    ax.set_xticks(range(len(lb.rows)), labels)
    ax.set_ylabel("top-1 (%)")
    finite = [s.mean for r in lb.rows for s in r.top1.values()]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if lb.columns:
        ax.legend(ncols=min(5, n_cols), fontsize="small", loc="upper left", bbox_to_anchor=(0, 1.15), frameon=False)
    ax.set_title(_scope(lb) or "top-1 per method and protocol", fontsize="small", loc="right")
    fig.tight_layout()
    return fig


# -- writing ---------------------------------------------------------------------------------------
def parse_formats(text: str | list[str]) -> list[str]:
    names = comma_list(["latex" if n == "tex" else n for n in comma_list(text)])
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise UserError(f"unknown leaderboard format(s) {', '.join(bad)}; choose from: {', '.join(FORMATS)} (comma-separated)")
    return names


def write_leaderboard(results_dir: str | Path, formats=("md", "csv", "latex"), out_dir: str | Path | None = None, plot: bool = True,
                      asked: dict | None = None) -> tuple[Leaderboard, list[Path]]:
    """Collect ``results_dir`` (``asked``: as ``collect``) and write the tables (and the plot) into ``out_dir``
    (default: ``results_dir``)."""
    import matplotlib.pyplot as plt

    lb = collect(results_dir, asked)
    out = make_folder(out_dir or results_dir, "--out")
    render = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
    written = []
    for fmt in parse_formats(list(formats)):
        path = out / FORMATS[fmt]
        text = render[fmt](lb)
        atomic_write(path, lambda f, t=text: f.write(t.encode()))
        written.append(path)
    if plot and lb.rows:
        fig = make_figure(lb)
        atomic_write(out / PLOT_NAME, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(out / PLOT_NAME)
    return lb, written
