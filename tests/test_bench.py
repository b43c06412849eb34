"""The benchmark commands run and write what the benchmark page shows (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json

from stlib import bench


def test_bench_refine_cli_writes_json(tmp_path):
    out = tmp_path / "refine.json"
    assert bench.cli_main(["refine", "--n-tiles", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "refine" and res["n_tiles"] == 3
    assert res["nuclei_per_tile"] > 5 and res["tiles_per_s"] > 0
    assert res["machine"]["cpu_count"] >= 1 and res["command"].startswith("stlib bench refine")


def test_bench_labels_small(tmp_path):
    out = tmp_path / "labels.json"
    assert bench.cli_main(["labels", "--nuclei", "300", "--baseline-nuclei", "20", "--tile-px", "256",
                           "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["nuclei_kept"] == 300 and res["instances_in_tiles"] >= 300 and res["speedup"] > 0
