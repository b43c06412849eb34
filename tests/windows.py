"""Acceptance windows for statistics of the generated demo, derived from its knobs and sample size.

A fixed window (``0.03 < low-qv share < 0.15``) is too wide for a large sample (a wrong rate
passes) and may be too narrow for a small one (a right generator fails on some seeds). Here
each window is the knob's value +- ``Z`` standard errors of the statistic at the size of the
sample it is measured on, plus the rounding the generator does (counts are rounded to whole
cells). With ``Z = 5`` a correct generator fails one check in about two million.

Medians (transcripts per cell, DAPI-vs-H&E IoU) have no closed-form law here; their windows
are distribution-free (:func:`median_window`): the law the knobs state is drawn many times
by code written in this file (not the generator's), and the sample median of ``n`` cells must
lie between the law's quantiles ``1/2 -+ Z / (2 sqrt(n))`` (the number of cells below a
quantile ``p`` is binomial(``n``, ``p``), or a less spread Poisson-binomial for cells that
are independent but not identically distributed).

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
import shapely
from scipy import stats

#: standard errors either side of the expected value
Z = 5.0


def _tail(z: float) -> float:
    """Probability of each tail beyond ``z`` standard errors of a normal law."""
    return float(stats.norm.sf(z))


def binomial_window(p: float, n: int, *, z: float = Z, slack: float = 0.0) -> tuple[float, float]:
    """Window of the share of ``n`` independent draws that succeed with probability ``p``.

    Exact binomial quantiles at the tail probabilities of ``z`` normal standard errors: a normal
    approximation is too narrow on one side for small counts (a sample with 2 expected misses and
    0 seen fell outside the old +- ``z`` se window).
    """
    n = max(int(n), 1)
    a = _tail(z)
    return float(stats.binom.ppf(a, n, p)) / n - slack, float(stats.binom.isf(a, n, p)) / n + slack


def hypergeometric_window(k: int, N: int, n: int, *, z: float = Z, slack: float = 0.0) -> tuple[float, float]:
    """Window of the share of marked items among ``n`` drawn without replacement from ``N`` holding ``k``."""
    n = max(int(n), 1)
    a = _tail(z)
    law = stats.hypergeom(max(int(N), n), int(k), n)
    return float(law.ppf(a)) / n - slack, float(law.isf(a)) / n + slack


def median_window(reference: np.ndarray, n: int, *, z: float = Z) -> tuple[float, float]:
    """Window of the median of ``n`` independent draws from the law of which ``reference`` is a large sample.

    The sample median lies below the law's ``p``-quantile when at least ``n / 2`` draws do: for
    ``p = 1/2 - z / (2 sqrt(n))`` that is a ``z``-standard-error excess of a binomial(``n``, ``p``)
    count (the same above). ``reference`` must be much larger than ``n`` (its own quantile error
    is then small beside the window).
    """
    half = z * 0.5 / math.sqrt(max(n, 1))
    ref = np.asarray(reference, dtype=float)
    return float(np.quantile(ref, max(0.5 - half, 0.0))), float(np.quantile(ref, min(0.5 + half, 1.0)))


def _check(out: list[str], name: str, value: float, window: tuple[float, float]) -> None:
    lo, hi = window
    if not lo <= value <= hi:
        out.append(f"{name} = {value:.4f} outside [{lo:.4f}, {hi:.4f}]")


def demo_statistics(root: str | Path) -> list[str]:
    """Statistics of every sample of the cohort at ``root`` that fall outside their windows.

    Checked (the law each follows in :mod:`stlib.demo`):

    * share of transcripts with ``qv < 20``: each transcript independently, ``low_qv_fraction``;
    * share of a cell's transcripts inside its DAPI nucleus (``overlaps_nucleus`` among the
      transcripts of cells whose outline and cytoplasm rim lie inside the Xenium region,
      :func:`_interior`): each independently, ``nuclear_tx_fraction``;
    * visible nuclei without a Xenium polygon among those inside the Xenium region:
      ``round(missing_fraction * n_visible)`` of all visible nuclei drawn without replacement
      (hypergeometric in the region);
    * Xenium nuclei not visible in the H&E per visible nucleus in the region: about
      ``extra_fraction`` (each placed next to a random visible nucleus, kept when in the region:
      binomial in the region's share);
    * control-probe transcripts of a sample (:func:`_control_window`);
    * median transcripts per live cell, pooled over the cohort (:func:`_library_reference`);
    * median IoU of the DAPI outlines with the true H&E nuclei, pooled over the cohort
      (:func:`_dapi_reference`).
    """
    root = Path(root)
    meta = json.loads((root / "cohort.json").read_text())
    cfg = meta["config"]
    rng = np.random.default_rng(0)  # the reference draws: fixed, so a check never flickers
    bad: list[str] = []
    counts, lib_ref, ious, iou_ref = [], [], [], []
    for s in meta["samples"]:
        sid = s["sample_id"]
        tx = pd.read_parquet(root / "hest" / "transcripts" / f"{sid}_transcripts.parquet",
                             columns=["cell_id", "feature_name", "qv", "overlaps_nucleus"])
        _check(bad, f"{sid}: share of qv < 20", float((tx["qv"] < 20).mean()),
               binomial_window(cfg["low_qv_fraction"], len(tx)))
        t = gpd.read_parquet(root / "truth" / sid / "nuclei.parquet")
        cells = _xenium_cells_um(root, sid, t)
        interior = _interior(cfg, s, cells)
        # transcripts of interior cells: those of a border cell that fall outside the region (its
        # cytoplasm, mostly) are dropped, which raised the border cells' nuclear share
        on = tx.loc[tx["cell_id"].astype(str).isin(set(cells.loc[interior, "cell_id"])), "overlaps_nucleus"].to_numpy()
        if on.size:  # (a sample too small to have an interior cell has nothing to measure)
            _check(bad, f"{sid}: share of (interior cells') assigned transcripts in the nucleus", float(on.mean()),
                   binomial_window(cfg["nuclear_tx_fraction"], on.size))
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
        lo, hi = binomial_window(q, n_extra) if n_extra else (0.0, 0.0)
        # an extra nucleus is kept by its own position, not its neighbour's: one nucleus of slack
        _check(bad, f"{sid}: out-of-plane Xenium nuclei per visible nucleus in the region", extra / max(n_in, 1),
               ((lo * n_extra - 1) / max(n_in, 1), (hi * n_extra + 1) / max(n_in, 1)))
        # control probes: the generator draws int(control_fraction * m) of them for the m transcripts it
        # drew for cells (truth/expression.parquet), a third of the low-qv ones decoded as a gene
        m = int(pd.read_parquet(root / "truth" / sid / "expression.parquet",
                                columns=["n_own", "n_spill", "n_ambient"]).to_numpy().sum())
        n_ctrl = int(tx["feature_name"].str.startswith(("NegControlProbe_", "BLANK_")).sum())
        _check(bad, f"{sid}: control-probe transcripts", n_ctrl, _control_window(cfg, m))
        # per-cell material of the pooled medians
        c, ref = _library_reference(cfg, s, tx, cells[interior], rng)
        counts.append(c)
        lib_ref.append(ref)
        iou, ref = _dapi_reference(cfg, s, cells, rng)
        ious.append(iou)
        iou_ref.append(ref)
    counts = np.concatenate(counts)
    _check(bad, f"cohort: median transcripts per live cell (qv >= 20, {counts.size} interior cells)",
           float(np.median(counts)), median_window(np.concatenate(lib_ref), counts.size))
    ious = np.concatenate(ious)
    _check(bad, f"cohort: median DAPI IoU with the H&E nucleus ({ious.size} nuclei)",
           float(np.median(ious)), median_window(np.concatenate(iou_ref), ious.size))
    return bad


def _control_window(cfg: dict, m: int, *, z: float = Z) -> tuple[float, float]:
    """Window of the number of control-probe transcripts of a sample whose cells got ``m`` transcripts.

    :func:`stlib.demo.sample.place_transcripts` scatters ``int(control_fraction * m)`` control
    probes over the imaged field (all kept: the field is clipped to the Xenium region first); each
    is low-qv with probability ``low_qv_fraction`` and then, with probability 1/3, decoded as a
    panel gene: binomial thinning (exact quantiles), plus one count for rounding.
    """
    k = int(cfg["control_fraction"] * m)
    p = 1.0 - cfg["low_qv_fraction"] / 3.0
    a = _tail(z)
    return float(stats.binom.ppf(a, k, p)) - 1, float(stats.binom.isf(a, k, p)) + 1


def _xenium_cells_um(root: Path, sid: str, truth: pd.DataFrame) -> pd.DataFrame:
    """The Xenium cells of a sample: DAPI outline in Xenium µm and in the true H&E frame, truth row.

    The written outlines are in H&E px through HEST's registration; its inverse gives them in
    Xenium µm, and the true map (:func:`stlib.demo.true_he_xy`) places them on the H&E.
    """
    from stlib.demo import true_he_xy
    from stlib.demo.registration import apply_affine

    tf = json.loads((root / "truth" / sid / "transform.json").read_text())
    seg = gpd.read_parquet(root / "hest" / "xenium_seg" / f"{sid}_xenium_nucleus_seg.parquet")
    inv = np.linalg.inv(np.asarray(tf["hest_registration_um_to_he_px"]))
    to_um = lambda xy: np.stack(apply_affine(inv, xy[:, 0], xy[:, 1]), 1)  # noqa: E731
    dapi_um = shapely.transform(seg.geometry.values, to_um)
    dapi_he = shapely.transform(dapi_um, lambda xy: np.stack(true_he_xy(tf, xy[:, 0], xy[:, 1]), 1))
    row = truth.set_index("cell_id").loc[[str(i) for i in seg.index]]
    return pd.DataFrame({"cell_id": row.index.to_numpy(), "fine_type": row["fine_type"].to_numpy(),
                         "visible": row["visible"].to_numpy(bool), "dapi_um": dapi_um, "dapi_he": dapi_he,
                         "true_he": row.geometry.values})


def _interior(cfg: dict, sample: dict, cells: pd.DataFrame) -> np.ndarray:
    """Cells whose DAPI outline with its ``cyto_um`` cytoplasm rim lies inside the Xenium region.

    The generator places a cell's transcripts in that rim and drops those outside the region.
    """
    region = (sample.get("stats") or {}).get("xenium_region_um")
    if not region:
        return np.ones(len(cells), bool)
    rim = shapely.buffer(cells["dapi_um"].to_numpy(), cfg["cyto_um"])
    return np.asarray(shapely.contains(shapely.box(*region), rim), bool)


def library_factor(cfg: dict, organ_key: str, fine_type: str) -> float:
    """Relative library size of a generator type: the generator's declared per-type parameter.

    (:attr:`stlib.demo.biology.CellType.library`; tumour cells: 1.25 x the mean of their lineage,
    :func:`stlib.demo.biology.make_sample_biology`; legacy biology: ``expression._LIB`` / 0.95.)
    These are parameters of the generator, like its knobs; the test checks that the counts it
    writes follow them, not how it draws them.
    """
    from stlib.demo import biology, expression

    if cfg.get("biology", "realistic") == "legacy":
        return expression._LIB[fine_type] / 0.95
    if fine_type == biology.TUMOUR_TYPE:
        lineage = (biology.TUMOUR_SIGNATURES.get(organ_key) or biology.TUMOUR_SIGNATURES["breast"])["lineage"]
        return 1.25 * float(np.mean([biology.CATALOGUE[t].library for t in lineage]))
    return biology.CATALOGUE[fine_type].library


def _library_reference(cfg: dict, sample: dict, tx: pd.DataFrame, cells: pd.DataFrame,
                       rng: np.random.Generator, *, draws: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Transcripts (qv >= 20, genes only) of the sample's interior live cells, and draws of the law they follow.

    The law the knobs state: a cell of type ``t`` gets ``tx_per_cell_median * L_t *
    exp(N(0, library_log_sd))`` transcripts on average (own + spill-over + ambient), Poisson
    counts around it, and keeps each with probability ``1 - low_qv_fraction`` (qv >= 20).
    ``cells`` must be interior cells (:func:`_interior`): a border cell loses the transcripts
    that fall outside the region (up to a third at 192 px).
    Dying cells lose RNA by a further factor and are left out (as the knob says: *live* cells).
    """
    from stlib.demo.biology import DEAD_TYPE

    sel = cells[~cells["fine_type"].isin({DEAD_TYPE, "dead"}).to_numpy()]
    good = tx[(tx["qv"] >= 20) & ~tx["feature_name"].str.startswith(("NegControlProbe_", "BLANK_"))]
    per_cell = good["cell_id"].astype(str).value_counts()
    counts = per_cell.reindex(sel["cell_id"].astype(str)).fillna(0).to_numpy()
    organ = sample["organ"].lower()
    lam = cfg["tx_per_cell_median"] * (1 - cfg["low_qv_fraction"]) * \
        np.array([library_factor(cfg, organ, f) for f in sel["fine_type"]])
    ref = rng.poisson(lam[None, :] * np.exp(rng.normal(0.0, cfg["library_log_sd"], (draws, lam.size))))
    return counts, ref.ravel()


def _dapi_reference(cfg: dict, sample: dict, cells: pd.DataFrame, rng: np.random.Generator,
                    *, draws: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """IoU of each visible Xenium cell's DAPI outline with its true H&E nucleus, and draws of the law.

    The law the knobs state (written here from their descriptions, not from the generator's
    code): the DAPI outline is the true outline scaled about its centre by
    ``N(dapi_scale_mean, dapi_scale_sd)``, shifted by ``N(0, dapi_shift_um)`` per axis and its
    radii jittered by a smooth relative error of sd ``dapi_jitter`` (four low Fourier modes here).
    """
    vis = cells[cells["visible"].to_numpy(bool)]
    a, b = vis["dapi_he"].to_numpy(), vis["true_he"].to_numpy()
    iou = shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))
    shift_px = cfg["dapi_shift_um"] / sample["um_per_px"]
    out = []
    for g in b:
        xy = shapely.get_coordinates(g)[:-1]
        c = xy.mean(0)
        th = np.linspace(0.0, 2 * np.pi, len(xy), endpoint=False)
        k = np.arange(1, 5)
        amp = rng.normal(0.0, cfg["dapi_jitter"] / math.sqrt(2.0), (draws, 4))  # sd of the sum = dapi_jitter
        phase = rng.uniform(0.0, 2 * np.pi, (draws, 4))
        jit = (amp[:, :, None] * np.cos(k[None, :, None] * th[None, None, :] + phase[:, :, None])).sum(1)
        scale = rng.normal(cfg["dapi_scale_mean"], cfg["dapi_scale_sd"], (draws, 1, 1))
        shift = rng.normal(0.0, shift_px, (draws, 1, 2))
        v = c + shift + (xy - c)[None] * scale * (1 + jit[..., None])
        out.append(shapely.polygons(np.concatenate([v, v[:, :1]], 1)))
    if not out:
        return iou, np.zeros(0)
    ref = np.concatenate(out)
    truth = np.repeat(b, draws)
    ref = shapely.make_valid(ref)
    return iou, shapely.area(shapely.intersection(ref, truth)) / shapely.area(shapely.union(ref, truth))
