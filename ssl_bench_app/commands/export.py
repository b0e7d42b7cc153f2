"""``ssl-bench export --run RUN_DIR --out DIR``: the encoder as a folder timm loads directly
(``model.safetensors`` + a timm ``config.json``): ``timm.create_model("local-dir:DIR", pretrained=True)``."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("export", help="export a pretrained encoder as a folder timm loads (safetensors + config.json)", description=__doc__)
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run directory (ssl-bench pretrain --out)")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new folder: gets model.safetensors and config.json")
    parser.set_defaults(func=run)


def run(args) -> int:
    from evals.export import export_encoder

    out = export_encoder(args.run, args.out)
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    print(f'load with: timm.create_model("local-dir:{out}", pretrained=True)   # timm >= 1.0.16')
    return 0
