"""Unit tests of stlib.io.xenium on small files written in tmp_path."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stlib.io.xenium import (
    UNASSIGNED,
    XeniumBundle,
    counts_from_transcripts,
    fit_affine,
    normalise_cell_ids,
    read_boundaries,
    read_cell_feature_matrix,
    read_he_alignment,
    read_transcripts_file,
    um_to_he_px_matrix,
)
from stlib.utils import InputError


def _tx_frame(cell_ids) -> pd.DataFrame:
    """6 molecules: 2 genes of cell A, 1 gene of cell B, 1 low-qv, 1 control probe, 1 unassigned."""
    a, b, un = cell_ids
    return pd.DataFrame({
        "transcript_id": np.arange(6, dtype=np.uint64),
        "cell_id": [a, a, b, a, b, un],
        "overlaps_nucleus": np.array([1, 0, 1, 1, 1, 0], np.uint8),
        "feature_name": ["EPCAM", "CD3E", "EPCAM", "EPCAM", "NegControlProbe_00042", "CD3E"],
        "x_location": np.linspace(10, 20, 6),
        "y_location": np.linspace(5, 9, 6),
        "qv": [40.0, 30.0, 25.0, 10.0, 40.0, 40.0],
    })


@pytest.mark.parametrize("ids,expect", [
    ((7, 8, -1), ("7", "8")),
    (("aaab-1", "aaac-1", "UNASSIGNED"), ("aaab-1", "aaac-1")),
    ((b"aaab-1", b"aaac-1", b"UNASSIGNED"), ("aaab-1", "aaac-1")),
])
def test_transcripts_cell_id_types_qv_and_controls(tmp_path, ids, expect):
    df = _tx_frame(ids)
    p = tmp_path / "transcripts.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    tx = read_transcripts_file(p)
    # qv filter drops row 3 (qv 10); genes_only drops the control probe; unassigned kept + flagged
    assert tx["transcript_id"].tolist() == [0, 1, 2, 5]
    assert all(isinstance(c, str) for c in tx["cell_id"])
    assert tx["cell_id"].tolist() == [expect[0], expect[0], expect[1], UNASSIGNED]
    assert tx["assigned"].tolist() == [True, True, True, False]
    everything = read_transcripts_file(p, min_qv=None, genes_only=False)
    assert len(everything) == 6
    assert "NegControlProbe_00042" in set(everything["feature_name"])
    dropped = read_transcripts_file(p, drop_unassigned=True)
    assert UNASSIGNED not in set(dropped["cell_id"]) and len(dropped) == 3


def test_is_gene_column_is_used(tmp_path):
    df = _tx_frame(("c1", "c2", "UNASSIGNED"))
    df["is_gene"] = [True, False, True, True, False, True]  # CD3E of row 1 marked non-gene
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    tx = read_transcripts_file(p)
    assert tx["transcript_id"].tolist() == [0, 2, 5]


def test_codeword_category_used_when_no_is_gene(tmp_path):
    df = _tx_frame(("c1", "c2", "UNASSIGNED"))
    df["codeword_category"] = ["predesigned_gene", "deprecated_codeword", "custom_gene",
                               "predesigned_gene", "negative_control_probe", "predesigned_gene"]
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    assert read_transcripts_file(p)["transcript_id"].tolist() == [0, 2, 5]


def test_v1_csv_with_r_row_index(tmp_path):
    df = _tx_frame((67500, 67501, -1))
    p = tmp_path / "transcripts.csv"
    df.index = np.arange(1, 7)
    df.to_csv(p, index=True, index_label="")  # R's write.csv: leading unnamed index column
    assert open(p).readline().startswith('"",') or open(p).readline().startswith(",")
    tx = read_transcripts_file(p)
    assert "" not in tx.columns and not any(c.startswith("Unnamed") for c in tx.columns)
    assert tx["cell_id"].tolist() == ["67500", "67500", "67501", UNASSIGNED]
    # gzipped too
    pgz = tmp_path / "transcripts.csv.gz"
    df.to_csv(pgz, index=True, index_label="", compression="gzip")
    assert read_transcripts_file(pgz)["cell_id"].tolist() == tx["cell_id"].tolist()


def test_parquet_without_cell_id_names_file(tmp_path):
    df = _tx_frame(("a", "b", "UNASSIGNED")).drop(columns="cell_id")
    p = tmp_path / "TENX95_transcripts.parquet"
    df.to_parquet(p)
    with pytest.raises(InputError, match="no cell_id") as ei:
        read_transcripts_file(p, sample="TENX95")
    assert "TENX95_transcripts.parquet" in str(ei.value) and "TENX95" in str(ei.value)
    assert "allow_missing_cell_id" in str(ei.value)
    tx = read_transcripts_file(p, allow_missing_cell_id=True)
    assert (tx["cell_id"] == UNASSIGNED).all() and not tx["assigned"].any()


def test_missing_file_and_missing_qv(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_transcripts_file(tmp_path / "nope.parquet", sample="S1")
    df = _tx_frame(("a", "b", "UNASSIGNED")).drop(columns="qv")
    p = tmp_path / "t.parquet"
    df.to_parquet(p)
    with pytest.raises(InputError, match="min_qv=None"):
        read_transcripts_file(p)
    assert len(read_transcripts_file(p, min_qv=None)) == 5


def test_normalise_cell_ids_mixed_inputs():
    assert normalise_cell_ids(np.array([1, 0, -1])).tolist() == ["1", UNASSIGNED, UNASSIGNED]
    assert normalise_cell_ids(pd.Series([b"x-1", None])).tolist() == ["x-1", UNASSIGNED]
    assert normalise_cell_ids(np.array([3.0, np.nan])).tolist() == ["3", UNASSIGNED]
    with pytest.raises(InputError, match="non-integer"):
        normalise_cell_ids(np.array([1.5]))


def test_counts_from_transcripts_exact():
    tx = pd.DataFrame({"cell_id": ["a", "a", "b", "a", UNASSIGNED],
                       "feature_name": ["G1", "G2", "G1", "G1", "G2"]})
    ad = counts_from_transcripts(tx, sample="S")
    assert list(ad.obs_names) == ["a", "b"] and list(ad.var_names) == ["G1", "G2"]
    assert ad.X.dtype == np.int32 and ad.X.format == "csr"
    np.testing.assert_array_equal(ad.X.toarray(), [[2, 1], [1, 0]])
    assert ad.obs["n_counts"].tolist() == [3, 1] and ad.obs["n_genes"].tolist() == [2, 1]
    ad2 = counts_from_transcripts(tx, cell_ids=["b", "z"], genes=["G2", "G1"])
    np.testing.assert_array_equal(ad2.X.toarray(), [[0, 1], [0, 0]])


def _boundary_frame():
    sq = [(0, 0), (2, 0), (2, 2), (0, 2), (0, 0)]  # closed
    tri = [(5, 5), (6, 5), (5, 6)]                  # open
    bow = [(10, 10), (12, 12), (12, 10), (10, 12)]  # self-intersecting
    rows = [("c1", *v, 1) for v in sq] + [("c1", *v, 2) for v in tri] + [("c2", *v, 1) for v in bow]
    return pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y", "label_id"])


def test_boundaries_union_keep_largest_and_valid(tmp_path):
    p = tmp_path / "nucleus_boundaries.parquet"
    _boundary_frame().to_parquet(p)
    g = read_boundaries(p)
    assert list(g.index) == ["c1", "c2"] and g.index.name == "cell_id"
    assert g.is_valid.all()
    assert g.loc["c1", "n_parts"] == 2 and g.loc["c1"].geometry.geom_type == "MultiPolygon"
    assert g.loc["c1"].geometry.area == pytest.approx(4.5)
    assert g.loc["c2"].geometry.area == pytest.approx(2.0)  # bow-tie repaired to two triangles
    keep = read_boundaries(p, multi="keep")
    assert len(keep) == 3 and keep.loc["c1"].shape[0] == 2 and "label_id" in keep.columns
    largest = read_boundaries(p, multi="largest")
    assert largest.loc["c1"].geometry.area == pytest.approx(4.0)
    for geom in keep.geometry:  # rings closed
        for poly in getattr(geom, "geoms", [geom]):
            c = np.asarray(poly.exterior.coords)
            assert (c[0] == c[-1]).all()


def test_boundaries_csv_int_ids_r_index(tmp_path):
    df = _boundary_frame().drop(columns="label_id")
    df["cell_id"] = df["cell_id"].map({"c1": 11, "c2": 12})
    df = df[df.vertex_x < 9]  # square + triangle for cell 11 only (one polygon, no label_id)
    df = df.iloc[:5]
    p = tmp_path / "nucleus_boundaries.csv"
    df.to_csv(p, index=True, index_label="")
    g = read_boundaries(p)
    assert list(g.index) == ["11"] and g.geometry.iloc[0].area == pytest.approx(4.0)
    with pytest.raises(InputError, match="lacks columns"):
        pd.DataFrame({"cell_id": [1], "x": [0]}).to_csv(tmp_path / "bad.csv", index=False)
        read_boundaries(tmp_path / "bad.csv")


def _write_h5(path, barcodes, names, ftypes, dense):
    """dense: (n_cells, n_features)."""
    import scipy.sparse as sp

    csr = sp.csr_matrix(np.asarray(dense, np.int32))
    with h5py.File(path, "w") as h:
        m = h.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"], m["indices"], m["indptr"] = csr.data, csr.indices, csr.indptr
        m["shape"] = np.array([len(names), len(barcodes)], np.int32)
        f = m.create_group("features")
        f["name"] = np.array(names, dtype="S")
        f["id"] = np.array([f"ENSG{i}" for i in range(len(names))], dtype="S")
        f["feature_type"] = np.array(ftypes, dtype="S")


def test_cell_feature_matrix(tmp_path):
    p = tmp_path / "cell_feature_matrix.h5"
    _write_h5(p, ["aa-1", "bb-1"], ["EPCAM", "NegControlProbe_1", "CD3E", "BLANK_0001"],
              ["Gene Expression", "Negative Control Probe", "Gene Expression", "Gene Expression"],
              [[3, 1, 0, 1], [0, 2, 5, 0]])
    ad = read_cell_feature_matrix(p)
    assert list(ad.obs_names) == ["aa-1", "bb-1"] and list(ad.var_names) == ["EPCAM", "CD3E"]
    np.testing.assert_array_equal(ad.X.toarray(), [[3, 0], [0, 5]])
    assert ad.X.dtype == np.int32
    assert read_cell_feature_matrix(p, genes_only=False).n_vars == 4
    with h5py.File(p, "a") as h:
        del h["matrix/indptr"]
        h["matrix/indptr"] = np.array([0, 1], np.int64)
    with pytest.raises(InputError, match="inconsistent"):
        read_cell_feature_matrix(p)


def test_bundle(tmp_path):
    b = tmp_path / "S1"
    b.mkdir()
    (b / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125, "run_name": "x"}))
    pq.write_table(pa.table({"cell_id": pa.array([1, 2], pa.int64()), "x_centroid": [1.0, 2.0],
                             "y_centroid": [1.0, 2.0]}), b / "cells.parquet")
    _tx_frame((1, 2, -1)).to_parquet(b / "transcripts.parquet")
    bundle = XeniumBundle(b)
    assert bundle.pixel_size_um == pytest.approx(0.2125)
    assert bundle.cells()["cell_id"].tolist() == ["1", "2"]
    ad = bundle.counts_from_transcripts()
    np.testing.assert_array_equal(ad.X.toarray(), [[1, 1], [0, 1]])  # CD3E, EPCAM
    assert list(ad.var_names) == ["CD3E", "EPCAM"]
    nuc = bundle.counts_from_transcripts(nucleus_only=True)
    assert nuc.obs["n_counts"].tolist() == [1, 1]
    with pytest.raises(InputError, match="nucleus boundaries"):
        bundle.nucleus_boundaries()
    (b / "experiment.xenium").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        XeniumBundle(b).pixel_size_um
    with pytest.raises(InputError, match="not found"):
        XeniumBundle(tmp_path / "missing")


def _known_affine():
    th = np.deg2rad(7.0)
    A = np.array([[1.3 * np.cos(th), -1.3 * np.sin(th), 120.0],
                  [1.3 * np.sin(th), 1.3 * np.cos(th), -45.0],
                  [0, 0, 1]])
    A[0, 1] += 0.02  # a little shear
    return A


def test_alignment_matrix_csv_and_um_to_he(tmp_path):
    A = _known_affine()
    p = tmp_path / "S1_he_imagealignment.csv"
    np.savetxt(p, A, delimiter=",")
    got = read_he_alignment(p)
    np.testing.assert_allclose(got, A)
    M = um_to_he_px_matrix(got, 0.2125)
    he = np.array([300.0, 700.0, 1.0])
    um = (A @ he) * np.array([0.2125, 0.2125, 1.0])  # H&E px -> morphology px -> µm
    np.testing.assert_allclose(M @ um, he, atol=1e-9)
    np.savetxt(p, A[:2], delimiter=",")
    with pytest.raises(InputError, match="shape"):
        read_he_alignment(p)


def test_alignment_keypoints_fit_recovers_affine(tmp_path):
    A = _known_affine()
    rng = np.random.default_rng(0)
    he = rng.uniform(0, 5000, size=(12, 2))
    morph_px = (A @ np.c_[he, np.ones(12)].T).T[:, :2]
    fixed_um = morph_px * 0.2125
    p = tmp_path / "keypoints.csv"
    pd.DataFrame({"fixedX": fixed_um[:, 0], "fixedY": fixed_um[:, 1],
                  "alignmentX": he[:, 0], "alignmentY": he[:, 1]}).to_csv(p, index=False)
    np.testing.assert_allclose(read_he_alignment(p), A, atol=1e-8)
    pd.DataFrame({"fixedX": morph_px[:, 0], "fixedY": morph_px[:, 1],
                  "alignmentX": he[:, 0], "alignmentY": he[:, 1]}).to_csv(p, index=False)
    np.testing.assert_allclose(read_he_alignment(p, keypoint_units="px"), A, atol=1e-8)
    pd.DataFrame({"fixedX": [0, 1, 2], "fixedY": [0, 1, 2], "alignmentX": [0, 1, 2],
                  "alignmentY": [0, 1, 2]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="collinear"):
        read_he_alignment(p)
    with pytest.raises(ValueError):
        fit_affine(np.zeros((2, 2)), np.zeros((2, 2)))
