"""``ssl-bench tokenizer train``: train the discrete image tokenizer BEiT and CAE predict (one token per
ViT patch), without labels, on a data set's pretraining images."""
from __future__ import annotations

from ssl_bench_app.launch import add_launcher_args, run_job


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a discrete image tokenizer (BEiT / CAE targets)", description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a tokenizer into --out", description=__doc__)
    t.add_argument("--data", default="fashion_mnist", help="data set name (default: fashion_mnist)")
    t.add_argument("--data-root", default=None, help="where the data set lives (default: its standard location)")
    t.add_argument("--out", required=True, help="directory for tokenizer.pt and tokenizer.json")
    t.add_argument("--preset", default="quick", help="smoke | quick | standard | full: vocabulary, size and patch grid of that pretraining preset (default: quick)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. model.patch_size=4 tokenizer.vocab_size=1024 train.steps=2000 data.subset=none")
    add_launcher_args(t)
    t.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench.tokenizer_training import train_tokenizer

    r = run_job(args, train_tokenizer, args.data, args.data_root, args.out, args.preset, list(args.overrides),
                name="tokenizer", log_dir=args.out)
    print(f"tokenizer ({r['data']}, {r['grid_size']}x{r['grid_size']} tokens of {r['patch_size']}px, {r['vocab_size']} codes): "
          f"{r['codebook_usage']:.0%} of codes used, perplexity {r['perplexity']:.1f} on {r['heldout_images']} held-out images; "
          f"reconstruction MSE {r['recon_mse']:.4f} (untrained {r['recon_mse_untrained']:.4f}, pixel variance {r['pixel_variance']:.4f}); "
          f"{r['wall_time_s']:.0f}s; wrote {r['path']}")
    return 0
