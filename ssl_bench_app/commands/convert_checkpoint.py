"""``ssl-bench convert-checkpoint PATH``: rewrite a checkpoint of an earlier ssl-bench version in the current
format, which loads without unpickling (tensors and plain values only); the original is kept as PATH.bak.

A checkpoint that names Python objects beyond the legacy numpy RNG array is unpickled only with --trust:
unpickling runs whatever code the file holds, so pass --trust only for a file whose source you trust."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("convert-checkpoint", help="rewrite an older checkpoint in the safe (weights-only) format", description=__doc__)
    p.add_argument("path", metavar="PATH", help="a checkpoint.pt, or the run directory holding one")
    p.add_argument("--trust", action="store_true", help="allow unpickling the file (runs any code it holds): only for a file you trust")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench.checkpoint import convert_checkpoint

    convert_checkpoint(args.path, trust=args.trust)
    return 0
