"""Conformance of the readers on every real reference file in ../shared/realdata.

Skipped when the folder is absent (fixture ``realdata``). Each expectation is computed
independently from the raw file (pyarrow / pandas / h5py) and compared with the reader.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stlib.constants import XENIUM_PIXEL_SIZE_UM, is_control_feature
from stlib.io.hest import read_hest_metadata_csv
from stlib.io.manifest import KNOWN_ORGANS, build_manifest_from_hest_csv, load_manifest
from stlib.io.xenium import UNASSIGNED, XeniumBundle, read_he_alignment

MULTIQC = ["sample1", "sample2", "sample3"]
MOLEXP = ["sample1", "sample2"]


def _close_ring(poly) -> bool:
    for p in getattr(poly, "geoms", [poly]):
        c = np.asarray(p.exterior.coords)
        if not (c[0] == c[-1]).all():
            return False
    return True


# ------------------------------------------------------------------ xenium-multiqc (XOA 3.0)
@pytest.mark.parametrize("s", MULTIQC)
def test_multiqc_cells(realdata, s):
    b = XeniumBundle(realdata / "xenium-multiqc" / s)
    raw = pq.read_table(b.path / "cells.parquet")
    cells = b.cells()
    assert len(cells) == raw.num_rows == 10_000
    assert cells["cell_id"].map(type).eq(str).all() and cells["cell_id"].is_unique
    assert cells["cell_id"].str.fullmatch(r"[a-p]{8}-\d+").all()  # XOA >= 1.3 string ids
    assert np.isfinite(cells[["x_centroid", "y_centroid"]].to_numpy()).all()
    has_nuc = cells["nucleus_area"].notna()  # boundary-stain cells may have no nucleus (NaN)
    assert (cells.loc[has_nuc, "nucleus_area"] <= cells.loc[has_nuc, "cell_area"] + 1e-6).all()
    assert (cells["total_counts"] >= cells["transcript_counts"]).all()


@pytest.mark.parametrize("s", MULTIQC)
def test_multiqc_experiment(realdata, s):
    b = XeniumBundle(realdata / "xenium-multiqc" / s)
    raw = json.loads((b.path / "experiment.xenium").read_text())
    assert b.experiment == raw
    assert b.pixel_size_um == pytest.approx(XENIUM_PIXEL_SIZE_UM)


@pytest.mark.parametrize("s", MULTIQC)
def test_multiqc_transcripts_filters(realdata, s):
    b = XeniumBundle(realdata / "xenium-multiqc" / s)
    raw = pd.read_parquet(b.path / "transcripts.parquet")
    assert (raw["qv"] < 20).any(), "the filter must have something to remove"
    everything = b.transcripts(min_qv=None, genes_only=False)
    assert len(everything) == len(raw)
    q = b.transcripts(genes_only=False)
    assert len(q) == int((raw["qv"] >= 20).sum()) < len(raw)
    assert (q["qv"] >= 20).all()
    genes = b.transcripts()
    expect = raw[(raw["qv"] >= 20) & raw["is_gene"]]
    assert len(genes) == len(expect)
    assert not genes["feature_name"].map(is_control_feature).any()
    assert set(genes["codeword_category"]) <= {"predesigned_gene", "custom_gene"}
    # unassigned molecules are flagged, and their count matches the raw "UNASSIGNED" rows
    assert int((~genes["assigned"]).sum()) == int((expect["cell_id"] == "UNASSIGNED").sum())
    assert (genes.loc[~genes["assigned"], "cell_id"] == UNASSIGNED).all()


@pytest.mark.parametrize("s", MULTIQC)
def test_multiqc_counts_vs_cells_parquet(realdata, s):
    """The transcripts file is a cut-down subset: per-cell counts from it never exceed the
    cell's ``transcript_counts`` (all gene molecules, qv >= 20) of cells.parquet."""
    b = XeniumBundle(realdata / "xenium-multiqc" / s)
    ad = b.counts_from_transcripts()
    cells = b.cells().set_index("cell_id")
    common = ad.obs_names.intersection(cells.index)
    assert len(common) > 0
    n = ad.obs.loc[common, "n_counts"].to_numpy()
    assert (n <= cells.loc[common, "transcript_counts"].to_numpy()).all()
    assert ad.X.dtype == np.int32 and int(ad.X.sum()) == int(b.transcripts(drop_unassigned=True).shape[0])
    assert not any(is_control_feature(g) for g in ad.var_names)


@pytest.mark.parametrize("s", MULTIQC)
def test_multiqc_cell_feature_matrix(realdata, s):
    """The h5 of this test set is a small stub (``CELL_000-1`` x ``Gene_0``...), not the matrix of
    cells.parquet, so cell counts are checked against the file's own arrays, not cells.parquet."""
    b = XeniumBundle(realdata / "xenium-multiqc" / s)
    ad = b.cell_feature_matrix()
    with h5py.File(b.path / "cell_feature_matrix.h5") as h:
        n_feat, n_cells = h["matrix/shape"][()]
        indptr, data = h["matrix/indptr"][()], h["matrix/data"][()]
        ftype = h["matrix/features/feature_type"][()].astype(str)
        barcodes = h["matrix/barcodes"][()].astype(str)
    assert ad.n_obs == n_cells == len(barcodes) and list(ad.obs_names) == list(barcodes)
    assert ad.n_vars == int((ftype == "Gene Expression").sum()) <= n_feat
    per_cell = np.add.reduceat(data, indptr[:-1]) * (np.diff(indptr) > 0)
    np.testing.assert_array_equal(ad.obs["n_counts"].to_numpy(), per_cell)
    assert not any(is_control_feature(g) for g in ad.var_names)
    assert ad.obs_names.is_unique and ad.obs["cell_id"].map(type).eq(str).all()
    # documents why the cross-check with cells.parquet does not apply to this stub
    assert not set(ad.obs_names) & set(b.cells()["cell_id"])


# ------------------------------------------------------- xenium-moleculeexperiment (XOA 1.x)
@pytest.mark.parametrize("s", MOLEXP)
def test_molexp_transcripts_csv(realdata, s):
    b = XeniumBundle(realdata / "xenium-moleculeexperiment" / s)
    raw = pd.read_csv(b.path / "transcripts.csv")
    assert raw.columns[0].startswith("Unnamed")  # the R row index is really there
    tx = b.transcripts(min_qv=None, genes_only=False)
    assert len(tx) == len(raw) and not any(c == "" or c.startswith("Unnamed") for c in tx.columns)
    assert tx["cell_id"].tolist() == raw["cell_id"].astype(str).tolist()
    genes = b.transcripts()
    assert (raw["qv"] < 20).any() and raw["feature_name"].map(is_control_feature).any()
    expect = raw[(raw["qv"] >= 20) & ~raw["feature_name"].map(is_control_feature)]
    assert len(genes) == len(expect)
    ad = b.counts_from_transcripts()
    counts = expect.groupby(expect["cell_id"].astype(str)).size()
    np.testing.assert_array_equal(ad.obs["n_counts"].to_numpy(), counts.reindex(ad.obs_names).to_numpy())


@pytest.mark.parametrize("s", MOLEXP)
@pytest.mark.parametrize("kind", ["nucleus", "cell"])
def test_molexp_boundaries(realdata, s, kind):
    b = XeniumBundle(realdata / "xenium-moleculeexperiment" / s)
    raw = pd.read_csv(b.path / f"{kind}_boundaries.csv")
    g = b.nucleus_boundaries() if kind == "nucleus" else b.cell_boundaries()
    assert sorted(g.index) == sorted(raw["cell_id"].astype(str).unique())
    assert g.is_valid.all() and all(_close_ring(p) for p in g.geometry)
    assert (g.geom_type == "Polygon").all() and (g.area > 5).all()  # µm², a few µm across
    xmin, ymin, xmax, ymax = g.total_bounds
    assert xmin == pytest.approx(raw["vertex_x"].min()) and ymax == pytest.approx(raw["vertex_y"].max())
    for cid, grp in raw.groupby(raw["cell_id"].astype(str)):  # vertex order kept
        np.testing.assert_allclose(np.asarray(g.loc[cid].geometry.exterior.coords)[0],
                                   grp[["vertex_x", "vertex_y"]].to_numpy()[0])


@pytest.mark.parametrize("s", MOLEXP)
def test_molexp_nucleus_inside_cell(realdata, s):
    b = XeniumBundle(realdata / "xenium-moleculeexperiment" / s)
    nuc, cell = b.nucleus_boundaries(), b.cell_boundaries()
    assert set(nuc.index) <= set(cell.index)
    c = cell.loc[nuc.index]
    assert (nuc.area.to_numpy() < c.area.to_numpy()).all()
    assert nuc.geometry.within(c.geometry.buffer(0.5), align=False).all()
    assert b.pixel_size_um == pytest.approx(0.2125)


def test_molexp_alignment_absent_is_clear_error(realdata):
    b = XeniumBundle(realdata / "xenium-moleculeexperiment" / "sample1")
    from stlib.utils import InputError

    with pytest.raises(InputError, match="imagealignment"):
        b.he_alignment()
    with pytest.raises(InputError, match="not found"):
        read_he_alignment(b.path / "none_he_imagealignment.csv")


# ------------------------------------------------------------------------------ HEST table
def test_hest_csv_matches_manifest(realdata, repo):
    csv = realdata / "hest" / "HEST_v1_1_0.csv"
    table = read_hest_metadata_csv(csv)
    assert len(table) == 1229 and table.columns[0] == "dataset_title"  # BOM stripped
    built = build_manifest_from_hest_csv(csv)
    m = load_manifest(repo / "data_manifest.yaml")
    assert len(built) == len(m.samples) == 59
    assert built["organ"].nunique() == m.samples["organ"].nunique() == 13
    assert set(built["organ"]) == set(KNOWN_ORGANS)
    a = built.set_index("id").sort_index()
    b = m.samples.set_index("id").sort_index()
    assert list(a.index) == list(b.index)
    for col in ("organ", "tissue", "disease_state", "oncotree_code", "role"):
        assert a[col].fillna("<na>").tolist() == b[col].fillna("<na>").tolist(), col
    np.testing.assert_allclose(a["pixel_size_um"].to_numpy(), b["pixel_size_um"].to_numpy(), atol=1e-6)
    assert a["panel_size"].astype(int).tolist() == b["panel_size"].astype(int).tolist()
    raw = table[(table.st_technology == "Xenium") & (table.species == "Homo sapiens")].set_index("id")
    np.testing.assert_allclose(b["pixel_size_um"].to_numpy(),
                               raw.loc[b.index, "pixel_size_um_estimated"].to_numpy(), atol=1e-6)
