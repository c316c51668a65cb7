"""Golden steps of lion-pytorch's Lion (the optimizer kohya's `--optimizer_type Lion` uses) on a
small problem, for tests/optim_lion.rs: three parameters of different shapes, five steps with
seeded gradients (some exactly zero, to pin sign(0) = 0), lr 3e-4, betas (0.9, 0.99), weight decay
0.1. Writes tests/fixtures/golden/lion.safetensors: `before.<p>`, `grad.<step>.<p>`,
`after.<step>.<p>` (F32), and `ema.<step>.<p>`: diffusers' `EMAModel(decay=0.9)` (what
`train.ema_decay` follows) stepped after each update, its shadow parameters.

    /work/refenv/bin/python tools/reference/make_lion_golden.py
"""
import os

import torch
from lion_pytorch import Lion
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 8), "b": (8,), "c": (3, 2, 2)}
    params = {k: torch.nn.Parameter(torch.randn(*s, generator=g)) for k, s in shapes.items()}
    out = {f"before.{k}": p.detach().clone() for k, p in params.items()}
    opt = Lion(list(params.values()), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    from diffusers.training_utils import EMAModel
    ema = EMAModel(list(params.values()), decay=0.9)
    for step in range(5):
        for k, p in params.items():
            grad = torch.randn(*shapes[k], generator=g) * 0.1
            if step == 0:
                grad.view(-1)[::3] = 0.0  # sign(0) is 0: those elements only decay
            p.grad = grad
            out[f"grad.{step}.{k}"] = grad.clone()
        opt.step()
        ema.step(list(params.values()))
        for (k, p), shadow in zip(params.items(), ema.shadow_params):
            out[f"after.{step}.{k}"] = p.detach().clone()
            out[f"ema.{step}.{k}"] = shadow.detach().clone()
    path = os.path.join(ROOT, "tests/fixtures/golden/lion.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"lion_pytorch": "lion-pytorch (PyPI)", "lr": "3e-4", "betas": "0.9,0.99", "weight_decay": "0.1"})
    print(f"wrote {path} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
