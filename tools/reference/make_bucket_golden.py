"""kohya sd-scripts' aspect-ratio buckets, computed by kohya's own functions, for
tests/data_buckets.rs: `make_bucket_resolutions` (library/model_util.py) and
`BucketManager.select_bucket` (library/train_util.py), taken from a sd-scripts checkout at run
time (parsed with `ast` and run with numpy and math; nothing of them is copied here).

    /work/refenv/bin/python tools/reference/make_bucket_golden.py --kohya SD_SCRIPTS_DIR \
        > tests/fixtures/golden/buckets.json

SD_SCRIPTS_DIR holds library/model_util.py and library/train_util.py (made with sd-scripts
48d368f). For each configuration (resolution, min_bucket_reso, max_bucket_reso,
bucket_reso_steps, bucket_no_upscale) it writes the predefined bucket sizes (none with
no_upscale) and, for each image size of a fixed list (edge cases and seeded random sizes), the
bucket, the resized size and the aspect-ratio error kohya computes.
"""
import argparse
import ast
import json
import math
import random

import numpy as np


def load(path, names):
    tree = ast.parse(open(path).read())
    picked = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in picked} == set(names), f"{path}: found {[n.name for n in picked]}"
    module = ast.Module(body=picked, type_ignores=[])
    return compile(module, path, "exec")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya", required=True)
    args = ap.parse_args()
    ns = {"math": math, "np": np, "Tuple": tuple, "List": list, "Optional": object}
    exec(load(f"{args.kohya}/library/model_util.py", ["make_bucket_resolutions"]), ns)

    class ModelUtil:
        make_bucket_resolutions = staticmethod(ns["make_bucket_resolutions"])

    ns["model_util"] = ModelUtil
    exec(load(f"{args.kohya}/library/train_util.py", ["BucketManager"]), ns)
    BucketManager = ns["BucketManager"]

    rng = random.Random(0)
    sizes = [(512, 512), (768, 512), (512, 768), (1024, 256), (100, 100), (150, 50), (50, 150), (96, 64), (64, 96),
             (1920, 1080), (1080, 1920), (4000, 3000), (333, 777), (640, 384), (2048, 2048), (63, 200), (200, 63)]
    sizes += [(rng.randint(40, 3000), rng.randint(40, 3000)) for _ in range(40)]
    configs = [(512, 256, 1024, 64, False), (1024, 256, 2048, 64, False), (128, 64, 256, 64, False),
               (768, 320, 1536, 32, False), (512, 256, 1024, 64, True), (1024, 256, 1024, 64, True)]
    out = {"kohya": "sd-scripts 48d368f library/model_util.py make_bucket_resolutions, library/train_util.py BucketManager.select_bucket", "cases": []}
    for res, lo, hi, step, no_up in configs:
        bm = BucketManager(no_up, (res, res), lo, hi, step)
        if not no_up:
            bm.make_buckets()
        picks = []
        for w, h in sizes:
            try:
                reso, resized, err = bm.select_bucket(w, h)
            except ZeroDivisionError:
                # no_upscale rounds a side smaller than a step down to 0 (kohya fails on it too).
                continue
            picks.append({"image": [w, h], "bucket": [int(reso[0]), int(reso[1])], "resized": [int(resized[0]), int(resized[1])], "ar_error": float(err)})
        out["cases"].append({
            "resolution": res, "min_bucket_reso": lo, "max_bucket_reso": hi, "bucket_reso_steps": step, "no_upscale": no_up,
            "resolutions": [] if no_up else [[int(a), int(b)] for a, b in bm.predefined_resos],
            "picks": picks,
        })
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
