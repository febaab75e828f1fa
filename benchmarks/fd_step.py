"""How the finite-difference step ``h`` of RW-SAM's norm estimator affects its accuracy, against exact norms.

    python benchmarks/fd_step.py --json benchmarks/fd_step.json

For each model and precision, the same Q Rademacher probes are evaluated at every ``h`` (``u = z / sqrt(d)``, so ``h``
is the length of the step in parameter space) and compared with exact per-sample gradient norms: mean relative error
and Spearman rank correlation. Too small an ``h`` drowns the slope in rounding (fp32: ~1e-7 of the loss, bf16 logits:
~1e-2); too large an ``h`` lets curvature in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import timm
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from hf_rwsam import sample_grad_norms


def per_sample_ce(model, inputs):
    return F.cross_entropy(model(inputs["x"]).float(), inputs["labels"], reduction="none")


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def cases(batch):
    g = torch.Generator().manual_seed(0)
    yield "mlp (d=123)", mlp(), {"x": torch.randn(64, 6, generator=g), "labels": torch.randint(0, 3, (64,), generator=g)}
    yield "resnet18 32x32 (d=11.2M)", timm.create_model("resnet18", num_classes=10), {
        "x": torch.randn(batch, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (batch,), generator=g)
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1e-4,1e-3,1e-2,1e-1,1,3,10,30")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps = [float(h) for h in args.steps.split(",")]
    rows = []
    for name, model, inputs in cases(args.batch):
        torch.manual_seed(0)
        model.train()
        exact = sample_grad_norms(model, inputs, per_sample_ce, method="exact", chunk_size=8)
        d = sum(p.numel() for p in model.parameters())
        for precision in ("fp32", "bf16"):
            for h in steps:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    fd = sample_grad_norms(model, inputs, per_sample_ce, method="fd", num_probes=args.probes,
                                           fd_step=h, generator=torch.Generator().manual_seed(1))
                rel = float(((fd - exact).abs() / exact).mean())
                rho = float(spearmanr(fd.numpy(), exact.numpy())[0])
                rows.append(dict(model=name, d=d, precision=precision, h=h, h_per_coordinate=h / math.sqrt(d),
                                 mean_rel_error=rel, spearman=rho))
                print(f"{name:26s} {precision} h={h:<7g} h/sqrt(d)={h / math.sqrt(d):.1e} "
                      f"rel_err={rel:.3f} spearman={rho:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "probes": args.probes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
