"""Acceptance windows for statistics of the generated demo, derived from its knobs and sample size.

A fixed window (``0.03 < low-qv share < 0.15``) is too wide for a large sample (a wrong rate
passes) and may be too narrow for a small one (a right generator fails on some seeds). Here
each window is the knob's value +- ``Z`` standard errors of the statistic at the size of the
sample it is measured on, plus the rounding the generator does (counts are rounded to whole
cells). With ``Z = 5`` a correct generator fails one check in about two million.

:func:`demo_statistics` measures, per sample of a generated cohort, the statistics the
generator draws with a known law, and returns those outside their windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

#: standard errors either side of the expected value
Z = 5.0


def binomial_window(p: float, n: int, *, z: float = Z, slack: float = 0.0) -> tuple[float, float]:
    """Window of the share of ``n`` independent draws that succeed with probability ``p``."""
    se = math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))
    return p - z * se - slack, p + z * se + slack


def hypergeometric_window(k: int, N: int, n: int, *, z: float = Z, slack: float = 0.0) -> tuple[float, float]:
    """Window of the share of marked items among ``n`` drawn without replacement from ``N`` holding ``k``."""
    p = k / max(N, 1)
    fpc = (N - n) / (N - 1) if N > 1 else 0.0
    se = math.sqrt(max(p * (1 - p) * fpc, 0.0) / max(n, 1))
    return p - z * se - slack, p + z * se + slack


def _check(out: list[str], name: str, value: float, window: tuple[float, float]) -> None:
    lo, hi = window
    if not lo <= value <= hi:
        out.append(f"{name} = {value:.4f} outside [{lo:.4f}, {hi:.4f}]")


def demo_statistics(root: str | Path) -> list[str]:
    """Statistics of every sample of the cohort at ``root`` that fall outside their windows.

    Checked (the law each follows in :mod:`stlib.demo`):

    * share of transcripts with ``qv < 20``: each transcript independently, ``low_qv_fraction``;
    * share of a cell's transcripts inside its DAPI nucleus (``overlaps_nucleus`` among
      assigned transcripts): each independently, ``nuclear_tx_fraction`` (cytoplasm
      transcripts of cells on the Xenium-region border may fall outside it and be dropped:
      one point of slack);
    * visible nuclei without a Xenium polygon among those inside the Xenium region:
      ``round(missing_fraction * n_visible)`` of all visible nuclei drawn without replacement
      (hypergeometric in the region);
    * Xenium nuclei not visible in the H&E per visible nucleus in the region: about
      ``extra_fraction`` (each placed next to a random visible nucleus, kept when in the region:
      binomial in the region's share).
    """
    root = Path(root)
    meta = json.loads((root / "cohort.json").read_text())
    cfg = meta["config"]
    bad: list[str] = []
    for s in meta["samples"]:
        sid = s["sample_id"]
        tx = pd.read_parquet(root / "hest" / "transcripts" / f"{sid}_transcripts.parquet",
                             columns=["cell_id", "qv", "overlaps_nucleus"])
        _check(bad, f"{sid}: share of qv < 20", float((tx["qv"] < 20).mean()),
               binomial_window(cfg["low_qv_fraction"], len(tx)))
        cid = tx["cell_id"]
        assigned = (cid != -1) if np.issubdtype(cid.dtype, np.integer) else (cid != "UNASSIGNED")
        on = tx.loc[assigned.to_numpy(), "overlaps_nucleus"].to_numpy()
        _check(bad, f"{sid}: share of assigned transcripts in the nucleus", float(on.mean()),
               binomial_window(cfg["nuclear_tx_fraction"], on.size, slack=0.01))
        t = gpd.read_parquet(root / "truth" / sid / "nuclei.parquet")
        vis = t["visible"].to_numpy(bool)
        inside = t["in_xenium_region"].to_numpy(bool) if "in_xenium_region" in t.columns else np.ones(len(t), bool)
        poly = t["has_polygon"].to_numpy(bool)
        n_vis, n_in = int(vis.sum()), int((vis & inside).sum())
        k_miss = int(round(cfg["missing_fraction"] * n_vis))
        miss = int((vis & inside & ~poly).sum())
        _check(bad, f"{sid}: missed visible nuclei in the region", miss / max(n_in, 1),
               hypergeometric_window(k_miss, n_vis, n_in))
        n_extra = int(round(cfg["extra_fraction"] * n_vis))
        q = n_in / max(n_vis, 1)  # the region's share of the visible nuclei
        extra = int((~vis).sum())
        se = math.sqrt(max(n_extra * q * (1 - q), 0.0))
        expect = n_extra * q
        _check(bad, f"{sid}: out-of-plane Xenium nuclei per visible nucleus in the region", extra / max(n_in, 1),
               ((expect - Z * se - 1) / max(n_in, 1), (expect + Z * se + 1) / max(n_in, 1)))
    return bad
