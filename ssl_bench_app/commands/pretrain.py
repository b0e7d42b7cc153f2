"""``ssl-bench pretrain``: pretrain one method on one data set at a preset, with key=value overrides.

``--config FILE`` starts from a config file (TOML, YAML or JSON with the config's nested keys; ``method_name``
and ``preset`` at its top) or from a run's run.json, which repeats that run: same config, same seed.
The command-line options and key=value overrides apply on top of the file."""
from __future__ import annotations

import time
from pathlib import Path

from ssl_bench_app.launch import add_launcher_args, run_job


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain one SSL method", description=__doc__)
    p.add_argument("--method", default=None, help="a registered method (see `ssl-bench methods`); required unless --config names one")
    p.add_argument("--config", default=None, metavar="FILE", help="start from a config file (.toml, .yaml, .json) or a run's run.json (repeats that run)")
    p.add_argument("--data", default=None, help="data set name (default: fashion_mnist, or the config file's)")
    p.add_argument("--data-root", default=None, help="where the data set lives (default: its standard location)")
    p.add_argument("--preset", default=None, help="smoke | quick | standard | full (default: quick, or the config file's)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<method>-<data>-<preset>-<time>)")
    p.add_argument("--seed", type=int, default=None, help="shorthand for seed=N")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its checkpoint")
    p.add_argument("--trust-pickle", default=None, metavar="FILE",
                   help="allow unpickling this DALL-E encoder where a config file or the resumed run names it "
                        "(unpickling runs any code the file holds: only for OpenAI's own file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5 model.arch=vit_small")
    add_launcher_args(p)
    p.set_defaults(func=run)


def resolve(args) -> dict:
    from ssl_bench.config import read_config_file, resolve_config
    from ssl_bench.data.datasets import DATASETS
    from ssl_bench.errors import UserError
    from ssl_bench.registry import get_method

    file_cfg = read_config_file(args.config) if args.config else {}
    choice = {}
    for key, flag, given in (("method_name", "--method", args.method), ("preset", "--preset", args.preset)):
        in_file = file_cfg.get(key)
        if in_file is not None and not isinstance(in_file, str):
            raise UserError(f"{args.config}: '{key}' takes a name, got {in_file!r}")
        if in_file is not None and given is not None and in_file != given:
            raise UserError(f"{args.config} is for {key.split('_')[0]} '{in_file}' but {flag} says '{given}'; drop {flag} or use another config file")
        choice[key] = given or in_file
    if not choice["method_name"]:
        raise UserError("which method? pass --method NAME (see `ssl-bench methods`) or a --config file that sets method_name")
    overrides = [*([f"data.name={args.data}"] if args.data else []), *args.overrides]
    if args.data_root:
        overrides.insert(1 if args.data else 0, f"data.root={args.data_root}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = resolve_config(get_method(choice["method_name"]), choice["preset"] or "quick", overrides,
                         file_cfg=file_cfg, file_source=str(args.config))

    if cfg["data"]["name"] not in DATASETS:
        raise UserError(f"unknown data set '{cfg['data']['name']}'; known data sets: {', '.join(DATASETS)}")
    return cfg


def resumed_config(args) -> dict:
    """``--resume --out DIR``: the method and config come from the run. Options may repeat the run's own
    values; one that would change them is refused."""
    from ssl_bench.errors import UserError
    from ssl_bench.rundir import saved_config

    if not args.out:
        raise UserError("--resume needs --out RUN_DIR: the directory of the run to continue")
    if args.overrides or args.config or args.data_root:
        given = ", ".join([*(["--config"] if args.config else []), *(["--data-root"] if args.data_root else []), *args.overrides])
        raise UserError(f"a resumed run keeps the config it started with; drop {given}, or start a new run with a new --out")
    cfg = saved_config(args.out)
    for flag, given, saved in (("--method", args.method, cfg.get("method_name")), ("--preset", args.preset, cfg.get("preset")),
                               ("--data", args.data, cfg["data"]["name"]), ("--seed", args.seed, cfg.get("seed"))):
        if given is not None and given != saved:
            raise UserError(f"{args.out} is a run with {flag} {saved}, not {given}; drop {flag} to resume it as it started")
    return cfg


def check_pickle_trusted(cfg: dict, args) -> None:
    """A DALL-E tokenizer unpickles its encoder, which runs any code the file holds: it loads only where this
    command line names that file, by a ``method.tokenizer=dalle:`` override or by ``--trust-pickle``, never
    because a config file or a run's run.json (perhaps from someone else) asks for it."""
    from ssl_bench.dalle import pickled_encoder
    from ssl_bench.errors import UserError

    encoder = pickled_encoder(cfg["method"].get("tokenizer"))
    if encoder is None:
        return
    named = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0].strip() == "method.tokenizer"]
    if named and pickled_encoder(named[-1]) == encoder:
        return
    if args.trust_pickle and Path(args.trust_pickle).expanduser().resolve() == encoder:
        return
    source = f"the run in {args.out}" if args.resume else f"--config {args.config}"
    raise UserError(f"{source} asks to unpickle the DALL-E encoder {encoder}, and unpickling runs any code the file holds; "
                    f"if it is OpenAI's file and you trust it, add --trust-pickle {encoder}")


def run(args) -> int:
    from ssl_bench.trainer import pretrain

    cfg = resumed_config(args) if args.resume else resolve(args)
    check_pickle_trusted(cfg, args)
    method = cfg["method_name"]
    out = Path(args.out or f"runs/{method}-{cfg['data']['name']}-{cfg['preset']}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = run_job(args, pretrain, cfg, out, resume=args.resume, name=f"pretrain-{method}", log_dir=str(out), run_dir=out, resumable=True)
    loss = record.get("loss", {}).get("loss", {}).get("last")
    ips = record.get("images_per_s")
    print(f"{record['method']}: {record['status']} after {record.get('steps')} steps; final loss {loss:.4f}; "
          f"{ips:.1f} images/s; run dir {out}" if loss is not None and ips else f"{record['method']}: {record['status']}; run dir {out}")
    return 0
