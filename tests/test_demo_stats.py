"""Demo statistics within windows derived from the knobs and the sample size, over several seeds.

The windows (tests/windows.py) hold for a correct generator at any seed and size; they are
checked here on tiny cohorts of four seeds and two knob settings, and the checker is shown to
object to a generator whose rates are off (so its windows are not too wide to fail).
"""

from __future__ import annotations

import dataclasses

import pytest
from windows import binomial_window, demo_statistics, hypergeometric_window

from stlib.demo import make_cohort

TINY = {"image_px": 192, "pannuke_per_fold": 0, "raw_bundles": 0}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_windows_hold_over_seeds(tmp_path, seed):
    root = make_cohort(tmp_path / "c", seed=seed, **TINY)
    assert demo_statistics(root) == []


def test_windows_follow_the_knobs(tmp_path):
    knobs = {"low_qv_fraction": 0.2, "nuclear_tx_fraction": 0.8, "missing_fraction": 0.15, "extra_fraction": 0.1}
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


def test_window_arithmetic():
    lo, hi = binomial_window(0.1, 10_000, z=2)
    assert lo == pytest.approx(0.094) and hi == pytest.approx(0.106)
    assert binomial_window(0.1, 10_000, z=2, slack=0.01)[1] == pytest.approx(0.116)
    # drawing every item: no sampling error left
    assert hypergeometric_window(5, 100, 100) == pytest.approx((0.05, 0.05))
    lo, hi = hypergeometric_window(10, 200, 50, z=1)
    assert lo < 0.05 < hi and (hi - lo) < 2 * binomial_window(0.05, 50, z=1)[1] - 0.1
