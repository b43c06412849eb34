"""Demo statistics within windows derived from the knobs and the sample size, over several seeds.

The windows (tests/windows.py) hold for a correct generator at any seed and size; they are
checked here on tiny cohorts of five seeds and two knob settings, and the checker is shown to
object to a generator whose rates are off (so its windows are not too wide to fail). Before
checking, 30 seeds (0-29) of the tiny cohort were run through the checker: none failed (the
normal-approximation windows used before failed two of them, seeds 4 and 9).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from windows import binomial_window, demo_statistics, hypergeometric_window, median_window

from stlib.demo import make_cohort

TINY = {"image_px": 192, "pannuke_per_fold": 0, "raw_bundles": 0}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_windows_hold_over_seeds(tmp_path, seed):
    root = make_cohort(tmp_path / "c", seed=seed, **TINY)
    assert demo_statistics(root) == []


def test_windows_follow_the_knobs(tmp_path):
    knobs = {"low_qv_fraction": 0.2, "nuclear_tx_fraction": 0.8, "missing_fraction": 0.15, "extra_fraction": 0.1,
             "tx_per_cell_median": 60.0, "library_log_sd": 0.3, "control_fraction": 0.03,
             "dapi_scale_mean": 1.0, "dapi_scale_sd": 0.05, "dapi_shift_um": 0.8, "dapi_jitter": 0.1}
    root = make_cohort(tmp_path / "c", seed=7, **TINY, **knobs)
    assert demo_statistics(root) == []


def test_windows_reject_a_generator_with_other_rates(tmp_path, monkeypatch):
    from stlib.demo import sample

    orig = sample.place_transcripts

    def off(*args, **kw):  # transcripts drawn with rates the config does not state
        args = list(args)
        i = next(i for i, a in enumerate(args) if dataclasses.is_dataclass(a) and hasattr(a, "low_qv_fraction"))
        cfg = args[i]
        args[i] = dataclasses.replace(cfg, low_qv_fraction=cfg.low_qv_fraction * 1.5,
                                      nuclear_tx_fraction=cfg.nuclear_tx_fraction - 0.1)
        return orig(*args, **kw)
    monkeypatch.setattr(sample, "place_transcripts", off)
    root = make_cohort(tmp_path / "c", seed=0, **TINY)
    bad = demo_statistics(root)
    assert any("qv < 20" in b for b in bad) and any("in the nucleus" in b for b in bad), bad


def test_windows_reject_a_generator_with_other_libraries_outlines_and_controls(tmp_path, monkeypatch):
    """Three generators the old fixed windows let through (median 50-200 transcripts, median IoU
    0.6-0.9, control share below 3 %): transcripts per cell 1.4x the knob, the DAPI shift taken in
    H&E px instead of µm (outlines 3.7x closer to the nucleus than the knob says), control probes
    1.5x the knob. A 384-px cohort (about 450 interior cells: the library window is +-15 %)."""
    from stlib.demo import sample

    orig_sim, orig_dapi, orig_place = sample.simulate_sample, sample.dapi_outlines, sample.place_transcripts
    monkeypatch.setattr(sample, "simulate_sample", lambda spec, cfg, **kw: orig_sim(
        spec, dataclasses.replace(cfg, tx_per_cell_median=1.4 * cfg.tx_per_cell_median), **kw))
    monkeypatch.setattr(sample, "dapi_outlines", lambda v, rng, *, shift_px, **kw: orig_dapi(
        v, rng, shift_px=shift_px * 0.2737, **kw))

    def place(*args, **kw):
        args = [dataclasses.replace(a, control_fraction=1.5 * a.control_fraction) if hasattr(a, "control_fraction")
                else a for a in args]
        return orig_place(*args, **kw)
    monkeypatch.setattr(sample, "place_transcripts", place)
    root = make_cohort(tmp_path / "c", seed=0, **{**TINY, "image_px": 384})
    bad = demo_statistics(root)
    for what in ("transcripts per live cell", "DAPI IoU", "control-probe"):
        assert any(what in b for b in bad), (what, bad)


def test_window_arithmetic():
    # exact binomial quantiles: close to p +- z se for a large sample (0.1 +- 2 x 0.003)
    lo, hi = binomial_window(0.1, 10_000, z=2)
    assert lo == pytest.approx(0.094, abs=3e-4) and hi == pytest.approx(0.106, abs=3e-4)
    assert binomial_window(0.1, 10_000, z=2, slack=0.01)[1] == pytest.approx(hi + 0.01)
    # and never a lower bound above 0 when 0 successes are plausible (2 expected, z = 5)
    assert binomial_window(0.02, 100)[0] == 0.0 and hypergeometric_window(2, 100, 80)[0] == 0.0
    # the median of n draws: between the law's quantiles 1/2 -+ z / (2 sqrt(n))
    ref = np.arange(100_001) / 100_000
    assert median_window(ref, 100, z=2) == pytest.approx((0.4, 0.6), abs=1e-4)
    assert median_window(ref, 1, z=5) == pytest.approx((0.0, 1.0))
    # drawing every item: no sampling error left
    assert hypergeometric_window(5, 100, 100) == pytest.approx((0.05, 0.05))
    # drawing most of the items: narrower than independent draws (finite-population correction)
    lo, hi = hypergeometric_window(50, 1000, 800, z=2)
    blo, bhi = binomial_window(0.05, 800, z=2)
    assert lo < 0.05 < hi and (hi - lo) < 0.6 * (bhi - blo)
