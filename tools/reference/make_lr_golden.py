"""transformers' `cosine_with_min_lr` schedule (what kohya's `--lr_scheduler cosine_with_min_lr
--lr_scheduler_min_lr_ratio R` builds) for tests/train_lr_min.rs: the learning rate each update
uses, base lr 1e-3, 5 warmup steps, 30 training steps (and 5 past the end), min_lr_rate 0.1.
Writes tests/fixtures/golden/lr_cosine_with_min_lr.json.

    /work/refenv/bin/python tools/reference/make_lr_golden.py
"""
import json, os

import torch
import transformers
from transformers import get_cosine_with_min_lr_schedule_with_warmup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=30, min_lr_rate=0.1)
    lrs = []
    for _ in range(35):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next update uses
        opt.step()
        sched.step()
    out = {"transformers": transformers.__version__, "base_lr": 1e-3, "warmup": 5, "total": 30, "min_lr_rate": 0.1, "lr": lrs}
    path = os.path.join(ROOT, "tests/fixtures/golden/lr_cosine_with_min_lr.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
