"""How the ranking of methods moves between two modes of the same probes (e.g. ``fast`` against
``official``), from the leaderboard's rows: per protocol, each method's top-1 and rank in both modes.

    ssl-bench compare-modes --results results/fashion_mnist-quick            # fast -> official
"""
from __future__ import annotations

from evals.leaderboard import Leaderboard


def _ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = best; ties share the better rank."""
    return {m: 1 + sum(v > x for v in values.values()) for m, x in values.items()}


def ranking_shift(lb: Leaderboard, before: str = "fast", after: str = "official") -> list[dict]:
    """One row per (protocol, method) having a figure in both modes: top-1 (mean over seeds) and rank in
    each, and how many places the method moved (positive: up)."""
    out = []
    for protocol in dict.fromkeys(c.split(" (")[0] for c in lb.columns):  # the table's protocol order
        a, b = f"{protocol} ({before})", f"{protocol} ({after})"
        both = {f"{r.method} [{r.data}, {r.preset}]" if (lb.show_data or lb.show_preset) else r.method: r for r in lb.rows
                if a in r.top1 and b in r.top1}
        if not both:
            continue
        ra = _ranks({m: r.top1[a].mean for m, r in both.items()})
        rb = _ranks({m: r.top1[b].mean for m, r in both.items()})
        for m in sorted(both, key=lambda m: (rb[m], m)):
            out.append({
                "protocol": protocol, "method": m, f"top1_{before}": both[m].top1[a].mean, f"rank_{before}": ra[m],
                f"top1_{after}": both[m].top1[b].mean, f"rank_{after}": rb[m], "moved": ra[m] - rb[m],
            })
    return out


def format_shift(rows: list[dict], before: str = "fast", after: str = "official") -> str:
    from tabulate import tabulate

    if not rows:
        return f"no method has records in both modes '{before}' and '{after}'; run `ssl-bench eval --run RUN --mode {before},{after}`"
    table = [
        [r["protocol"], r["method"], f"{r[f'top1_{before}']:.2f}", r[f"rank_{before}"], f"{r[f'top1_{after}']:.2f}", r[f"rank_{after}"],
         f"{r['moved']:+d}" if r["moved"] else "0"]
        for r in rows
    ]
    moved = sum(r["moved"] != 0 for r in rows)
    return (tabulate(table, headers=["protocol", "method", f"top-1 {before}", f"rank {before}", f"top-1 {after}", f"rank {after}", "moved"],
                     tablefmt="github", disable_numparse=True)
            + f"\n{moved} of {len(rows)} (protocol, method) pairs change rank from {before} to {after}")
