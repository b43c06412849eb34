"""Train the pair (ST-derived and manual masks) of a recipe on all 9 development images (Breast, Lung,
Prostate: the chapter's training organs), for the one held-out evaluation of the recipe chosen on the
leave-one-organ-out protocol (``python -m stlib.realtissue heldout --models runs/realtissue-loo/models/final/NAME``).

    python benchmarks/realtissue_loo/final.py NAME '{"stain_norm": "macenko"}' [--steps 150] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loo  # noqa: E402

from stlib import realtissue as rt  # noqa: E402


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("kw", nargs="?", default="{}")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", action="store_true")
    a = ap.parse_args()
    loo.prepare()
    recipe = rt.RecipeConfig(steps=a.steps, seed=a.seed, device="cpu", **json.loads(a.kw))
    t0 = time.perf_counter()
    res = rt.train_pair(loo.RUN, recipe, parallel=a.parallel, models_dir=f"models/final/{a.name}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    print({k: str(r.model_path) for k, r in res.items()}, f"wall {time.perf_counter() - t0:.0f}s",
          f"cpu {ru.ru_utime + ru.ru_stime + me.ru_utime + me.ru_stime:.0f}s")
