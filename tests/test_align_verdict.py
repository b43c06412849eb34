"""The sample-level alignment verdict (stlib.align.alignment_verdict) and what the label stage does with it.

The verdict's firing and not firing on demo-like slides inside and beyond the capture range is
tested in tests/test_align_demo.py; here: the rule on hand-made scores, its place in
alignment.json (also for files written before it existed), and the label stage's refusal of a
failed sample (with its message and the override).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stlib.align import (AlignmentFailedError, AlignmentResult, Transform, align_and_save, align_nuclei,
                         alignment_evidence, alignment_verdict, load_alignment)
from stlib.cli import main
from stlib.config import AlignConfig
from stlib.io.cohort import hest_dir
from stlib.labels.derive import derive_sample
from stlib.layout import RunLayout

PPU = 4.0  # H&E px per µm of the hand-made results


def _result(corr_after: float, n_nuclei: list[int], excluded: list[bool], *, moved_px: float = 0.0,
            params: dict | None = None) -> AlignmentResult:
    """An alignment with one tile per entry (tile centres 50 µm apart), refined map ``moved_px`` right of the initial."""
    M0 = np.diag([PPU, PPU, 1.0])
    M = M0.copy()
    M[0, 2] = moved_px
    tiles = [{"x_um": 50.0 * i, "y_um": 0.0, "x_px": 50.0 * i * PPU + moved_px, "y_px": 0.0, "n_nuclei": n,
              "corr_before": 0.1, "corr_after": corr_after, "dice_before": 0.1, "dice_after": 0.5,
              "residual_before_um": 1.0, "residual_after_um": 0.5, "reliability": 0.5, "excluded": e}
             for i, (n, e) in enumerate(zip(n_nuclei, excluded))]
    scores = {"global": {"before": {"corr": 0.1, "median_residual_um": 4.0},
                         "after": {"corr": corr_after, "median_residual_um": 0.4}}, "tiles": tiles}
    return AlignmentResult(sample="S1", route="hest", initial=M0, transform=Transform(M), scores=scores,
                           he_um_per_px=1 / PPU, params=params or AlignConfig().params())


def test_evidence_from_the_scores():
    # the 3-nuclei tile is not measured (min_nuclei 8): it counts in neither the share nor n_tiles
    r = _result(0.7, [10, 30, 60, 3], [True, False, False, True], moved_px=8.0)
    ev = alignment_evidence(r)
    assert ev["excluded_fraction"] == pytest.approx(10 / 100)
    assert ev["n_tiles"] == 3 and ev["corr_after"] == 0.7 and ev["corr_before"] == 0.1
    assert ev["moved_um"] == pytest.approx(8.0 / PPU)


def test_verdict_fires_on_each_signal_and_not_on_a_good_map():
    d = AlignConfig()
    ok = alignment_verdict(_result(0.65, [50] * 10, [False] * 9 + [True]))
    assert ok["status"] == "ok" and ok["reasons"] == []
    low = alignment_verdict(_result(d.fail_min_corr - 0.01, [50] * 10, [False] * 10))
    assert low["status"] == "failed" and "correlation" in low["reasons"][0]
    n_exc = int(np.floor(10 * d.fail_max_excluded)) + 1  # just above the share
    most = alignment_verdict(_result(0.65, [50] * 10, [True] * n_exc + [False] * (10 - n_exc)))
    assert most["status"] == "failed" and "excluded tiles" in most["reasons"][0]
    at = int(round(10 * d.fail_max_excluded))  # exactly at the share: not above it
    assert alignment_verdict(_result(0.65, [50] * 10, [True] * at + [False] * (10 - at)))["status"] == "ok"
    none = alignment_verdict(_result(0.65, [3] * 4, [False] * 4))
    assert none["status"] == "failed" and "no tile" in none["reasons"][0]
    # the thresholds come from the config, else from the result's params
    assert alignment_verdict(_result(0.65, [50] * 4, [False] * 4), config=AlignConfig(fail_min_corr=0.7))["status"] == "failed"
    r = _result(0.65, [50] * 4, [False] * 4, params={**AlignConfig().params(), "fail_min_corr": 0.7})
    assert alignment_verdict(r)["status"] == "failed" and r.status == "failed"


def test_alignment_json_holds_the_verdict_and_old_files_get_one(tmp_path):
    r = _result(0.2, [50] * 4, [False] * 4)
    r.verdict = alignment_verdict(r)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["status"] == "failed" and d["verdict"]["evidence"]["corr_after"] == 0.2
    r.save(tmp_path / "alignment.json")
    assert load_alignment(tmp_path / "alignment.json").status == "failed"
    # written before the verdict existed (no status, no thresholds in params): judged on load with the defaults
    old = {k: v for k, v in d.items() if k not in ("status", "verdict")}
    old["params"] = {k: v for k, v in old["params"].items() if not k.startswith("fail_")}
    back = AlignmentResult.from_dict(old)
    assert back.status == "failed" and back.verdict["thresholds"]["fail_min_corr"] == AlignConfig().fail_min_corr


def _shifted(M: np.ndarray, um: float) -> np.ndarray:
    px = um * Transform(M).px_per_um
    return np.array([[1, 0, px], [0, 1, 0.6 * px], [0, 0, 1.0]]) @ M


def test_labels_refuse_a_failed_sample_and_say_how_to_fix_it(small_cohort, tmp_path, capsys):
    """A map 58 µm off (beyond the 25 µm capture range): flagged failed; `stlib labels` writes no labels for
    it, names the sample and the fixes, goes on with the other samples and exits 1; the override derives them."""
    from stlib.align import _hest_inputs

    hest, sid, other = hest_dir(small_cohort), "DEMO_BREAST_1", "DEMO_LUNG_1"
    layout = RunLayout(tmp_path / "run")
    slide, M0, nuclei_um, _ = _hest_inputs(Path(hest), sid)
    with slide:
        res = align_nuclei(slide, nuclei_um, _shifted(M0, 50.0), sample=sid, route="hest")
    assert res.status == "failed", res.verdict
    res.save(layout.alignment_json(sid))
    good, _ = align_and_save(hest, other, layout.alignment_root)
    assert good.status == "ok", good.verdict
    with pytest.raises(AlignmentFailedError) as e:
        derive_sample(hest, sid, layout.root, neighbors_method="gauss")
    msg = str(e.value)
    assert f"sample {sid}" in msg and "--tile-um 200" in msg and "--accept-failed-alignment" in msg
    assert res.verdict["reasons"][0] in msg
    assert not layout.labels_dir(sid).exists()
    capsys.readouterr()
    rc = main(["labels", "--hest-dir", str(hest), "--sample", sid, "--sample", other, "--run-dir", str(layout.root),
               "--neighbors-method", "gauss"])
    out = capsys.readouterr()
    assert rc == 1 and f"sample {sid}" in out.err and "skipped" in out.err
    assert layout.cells_parquet(other).is_file() and not layout.labels_dir(sid).exists()
    rep = derive_sample(hest, sid, layout.root, neighbors_method="gauss", accept_failed_alignment=True)
    assert rep["alignment"]["status"] == "failed" and layout.cells_parquet(sid).is_file()

