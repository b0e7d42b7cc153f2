"""``ssl-bench export --run RUN_DIR --out FILE``: the encoder as a timm state dict + a JSON sidecar."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("export", help="export a pretrained encoder as a timm-loadable state dict")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run directory (ssl-bench pretrain --out)")
    parser.add_argument("--out", required=True, metavar="FILE", help="weights file: .pth/.pt/.bin (torch.save) or .safetensors; the sidecar is FILE with .json")
    parser.set_defaults(func=run)


def run(args) -> int:
    from evals.export import export_encoder

    weights, sidecar = export_encoder(args.run, args.out)
    print(f"wrote {weights} and {sidecar}")
    print(f"load with: spec = json.load(open('{sidecar}')); m = timm.create_model(spec['model_name'], **spec['create_kwargs']); "
          f"m.load_state_dict(torch.load('{weights}'))")
    return 0
