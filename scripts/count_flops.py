"""Model FLOPs of one training step per image, for each method of a configuration, counted on the CPU.

    python scripts/count_flops.py mae,mocov3 --preset full [--vitb16] [--data synthetic] [key=value ...]

The count behind ``ssl-bench throughput``'s MFU column (``ssl_bench.throughput.step_flops``: forward and
backward, ``torch.utils.flop_counter``), taken on a batch of two images on the CPU, so a configuration can be
checked without a GPU: what a method costs per image, and whether two runs timed the same model. A method whose
``method.tokenizer=auto`` is trained when pretraining starts (BEiT, CAE) is counted with that tokenizer's network
untrained: the same FLOPs, without the training.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_bench.config import comma_list, resolve_config  # noqa: E402
from ssl_bench.errors import UserError, one_line  # noqa: E402
from ssl_bench.registry import get_method  # noqa: E402
from ssl_bench.throughput import build_on_device, held_batch, step_flops  # noqa: E402
from ssl_bench.tokenizer import save_tokenizer  # noqa: E402
from ssl_bench.tokenizer_training import untrained_auto_tokenizer  # noqa: E402
from ssl_bench_app.commands.throughput import vitb16_overrides  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", help="comma-separated method names")
    p.add_argument("--preset", default="full")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--vitb16", action="store_true", help="ViT-B/16, 224 px, the published sizes (as ssl-bench throughput --vitb16)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()

    configs = []  # all resolved first: a bad name or key=value is one line before any output
    for name in comma_list(args.methods):
        method_cls = get_method(name)
        overrides = [f"data.name={args.data}", *(vitb16_overrides(method_cls, args.preset) if args.vitb16 else []),
                     *args.overrides, "train.batch_size=2", "train.device=cpu", "data.num_workers=0"]
        configs.append((name, resolve_config(method_cls, args.preset, overrides)))
    rows, stand_ins = [], []  # the table is printed whole: a data error on any method is one line, not half a table
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs:
            if cfg["method"].get("tokenizer") == "auto":
                path = save_tokenizer(untrained_auto_tokenizer(cfg), Path(tmp) / f"{name}.pt")
                cfg = {**cfg, "method": {**cfg["method"], "tokenizer": str(path)}}
                stand_ins.append(name)
            method, device = build_on_device(cfg)
            method.train()
            batch = held_batch(cfg, method, device)
            flops = step_flops(method, batch, device, "none")  # fp32: autocast does not change the count
            rows.append(f"| {name} | {flops / len(batch['views'][0]) / 1e9:.2f} |")
    print("| method | GFLOPs per image (one step: forward + backward) |\n|---|---|", *rows, sep="\n")
    if stand_ins:
        print(f"\n{', '.join(stand_ins)}: counted with the untrained network of the tokenizer method.tokenizer=auto trains (the same FLOPs)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # an unknown method or a bad key=value: one line
        sys.exit(f"count_flops: error: {one_line(exc)}")
