"""Scratch folder of the scripts beside this file (it was /tmp/i10h when they ran first):
``$STLIB_BENCH_WORK/realtissue_recipe_session6``, by default ``runs/bench/realtissue_recipe_session6`` of the working directory."""
import os
from pathlib import Path

WORK = Path(os.environ.get("STLIB_BENCH_WORK", "runs/bench")) / "realtissue_recipe_session6"
WORK.mkdir(parents=True, exist_ok=True)
