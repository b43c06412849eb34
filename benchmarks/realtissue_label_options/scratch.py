"""Scratch folder of the scripts beside this file (it was /tmp/i10g when they ran first):
``$STLIB_BENCH_WORK/realtissue_label_options``, by default ``runs/bench/realtissue_label_options`` of the working directory."""
import os
from pathlib import Path

WORK = Path(os.environ.get("STLIB_BENCH_WORK", "runs/bench")) / "realtissue_label_options"
WORK.mkdir(parents=True, exist_ok=True)
