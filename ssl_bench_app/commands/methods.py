"""``ssl-bench methods``: list every registered method with its one-line description."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("methods", help="list registered SSL methods")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench.registry import available_methods

    methods = available_methods()
    width = max(len(n) for n in methods)
    for name, cls in methods.items():
        print(f"{name:<{width}}  [{cls.family}]  {cls.description}")
    return 0
