"""Per-image CPU cost (process time) of the official probes on a checkpoint, through the real code paths:
feature extraction, one official linear epoch (the quick grid) and one attentive epoch on N training images.

    PYTHONPATH=. python scripts/probe_cost.py RUN_DIR [N]      # prints JSON; N defaults to 2048
"""
import json
import sys
import tempfile
import time

import torch
from evals.presets import resolve_eval_config
from evals.run import make_context
from evals.linear import linear_probe
from evals.attentive import attentive_probe

run = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
cfg = resolve_eval_config("quick", [f"linear.train_size={n}", f"attentive.train_size={n}", f"knn.train_size={n}", "knn.heldout_size=500", "knn.test_size=500",
                                    f"features.cache_dir={tempfile.mkdtemp(prefix='probe-cost-')}"])
ctx = make_context(run, None, None, "quick", cfg)
out = {"threads": torch.get_num_threads()}
# (a) cached extraction (cls, mean, patches) of n train images
ctx.params = cfg["knn"]
t = time.process_time(); w = time.perf_counter()
ctx.features("train", ("cls", "mean", "patches"))
out["extract_cpu_s_per_img"] = (time.process_time() - t) / n
out["extract_wall_s_per_img"] = (time.perf_counter() - w) / n
held = ctx.features("heldout", ("cls", "mean", "patches"))
test = ctx.features("test", ("cls", "mean", "patches"))
for name, fn in (("linear", lambda tr, p: linear_probe(tr, held, test, ctx.num_classes, p, ctx.device)),
                 ("attentive", lambda tr, p: attentive_probe(tr, held, test, ctx.num_classes, ctx.frozen_encoder().num_heads, p, ctx.device))):
    p = {**cfg[name], "epochs": 1, "warmup_epochs": 0}
    ctx.params = p
    train = ctx.augmented_train()
    t = time.process_time(); w = time.perf_counter()
    r = fn(train, p)
    out[f"{name}_official_cpu_s_per_img_epoch"] = (time.process_time() - t) / n
    out[f"{name}_official_wall_s_per_img_epoch"] = (time.perf_counter() - w) / n
    out[f"{name}_heads"] = len(p["blrs"])
    out[f"{name}_forwards"] = train.forwards
print(json.dumps(out, indent=1))
