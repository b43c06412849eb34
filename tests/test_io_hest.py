"""Unit tests of stlib.io.hest on a tiny HEST folder written in tmp_path."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shapely.geometry import Polygon, box

from stlib.io.hest import HestSample, list_samples, read_hest_metadata_csv
from stlib.io.xenium import UNASSIGNED
from stlib.utils import InputError


def _write_sample(root, sid="TENX00", *, cell_id_kind="str", with_seg=True):
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / f"{sid}.json").write_text(json.dumps({
        "pixel_size_um_estimated": 0.2737, "organ": "Breast", "disease_state": "Cancer",
        "oncotree_code": "IDC", "st_technology": "Xenium"}))
    ids = {"str": ["c1", "c1", "c2", "c1", "c2", "UNASSIGNED", "c3"],
           "int": [1, 1, 2, 1, 2, -1, 3],
           "bytes": [b"c1", b"c1", b"c2", b"c1", b"c2", b"UNASSIGNED", b"c3"]}[cell_id_kind]
    tx = pd.DataFrame({
        "cell_id": ids,
        "feature_name": ["EPCAM", "KRT7", "EPCAM", "BLANK_0003", "CD3E", "CD3E", "CD3E"],
        "qv": [40.0, 40.0, 35.0, 40.0, 12.0, 40.0, 40.0],
        "x_location": np.arange(7.0), "y_location": np.arange(7.0),
        "overlaps_nucleus": np.array([1, 0, 1, 1, 1, 0, 1], np.uint8),
        "he_x": [10.0, 12.0, 50.0, 11.0, 52.0, 90.0, 200.0],
        "he_y": [10.0, 12.0, 50.0, 11.0, 52.0, 90.0, 100.0],
    })
    (root / "transcripts").mkdir(exist_ok=True)
    tx.to_parquet(root / "transcripts" / f"{sid}_transcripts.parquet")
    if with_seg:
        (root / "xenium_seg").mkdir(exist_ok=True)
        seg_ids = {"str": ["c1", "c2"], "int": [1, 2], "bytes": [b"c1", b"c2"]}[cell_id_kind]
        bowtie = Polygon([(40, 40), (60, 60), (60, 40), (40, 60)])  # invalid: repaired on read
        gdf = gpd.GeoDataFrame({"cell_id": seg_ids}, geometry=[box(5, 5, 15, 15), bowtie])
        gdf.to_parquet(root / "xenium_seg" / f"{sid}_xenium_nucleus_seg.parquet")
    return sid


@pytest.mark.parametrize("kind", ["str", "int", "bytes"])
def test_cells_counts_and_centroids(tmp_path, kind):
    sid = _write_sample(tmp_path, cell_id_kind=kind)
    s = HestSample(tmp_path, sid)
    ad = s.cells()
    exp_ids = ["c1", "c2", "c3"] if kind != "int" else ["1", "2", "3"]
    assert list(ad.obs_names) == exp_ids
    assert list(ad.var_names) == ["CD3E", "EPCAM", "KRT7"]  # BLANK_ dropped
    # c1: EPCAM, KRT7; c2: EPCAM (its CD3E has qv 12); c3: CD3E; unassigned CD3E ignored
    np.testing.assert_array_equal(ad.X.toarray(), [[0, 1, 1], [0, 1, 0], [1, 0, 0]])
    assert ad.X.dtype == np.int32
    assert (ad.obs["sample"] == sid).all() and (ad.obs["organ"] == "Breast").all()
    assert ad.obs["has_nucleus"].tolist() == [True, True, False]
    np.testing.assert_allclose(ad.obsm["spatial"][0], [10, 10])   # square centroid
    np.testing.assert_allclose(ad.obsm["spatial"][1], [50, 50])   # repaired bow-tie centroid
    np.testing.assert_allclose(ad.obsm["spatial"][2], [200, 100])  # no polygon: transcript mean
    nuc_only = s.cells(nucleus_only=True)
    assert nuc_only.obs["n_counts"].tolist() == [1, 1, 1]


def test_metadata_and_paths(tmp_path):
    sid = _write_sample(tmp_path)
    s = HestSample(tmp_path, sid)
    assert s.id == sid and s.organ == "Breast" and s.disease_state == "Cancer" and s.oncotree_code == "IDC"
    assert s.pixel_size_um == pytest.approx(0.2737)
    assert s.path("wsi").name == f"{sid}.tif" and s.path("cellvit_seg").parent.name == "cellvit_seg"
    assert list_samples(tmp_path) == [sid]
    assert s.cellvit() is None
    with pytest.raises(ValueError):
        s.path("nope")
    with pytest.raises(InputError, match="wsi file not found") as ei:
        s.wsi()
    assert sid in str(ei.value)


def test_nuclei_index_str_and_valid(tmp_path):
    sid = _write_sample(tmp_path, cell_id_kind="bytes")
    nuc = HestSample(tmp_path, sid).nuclei()
    assert list(nuc.index) == ["c1", "c2"] and nuc.index.name == "cell_id"
    assert nuc.is_valid.all()
    assert nuc.geometry.iloc[1].area == pytest.approx(200.0)


def test_transcripts_options(tmp_path):
    sid = _write_sample(tmp_path, cell_id_kind="int")
    s = HestSample(tmp_path, sid)
    tx = s.transcripts()
    assert set(tx["feature_name"]) == {"EPCAM", "KRT7", "CD3E"} and (tx["qv"] >= 20).all()
    assert tx["cell_id"].tolist() == ["1", "1", "2", UNASSIGNED, "3"]
    assert tx["assigned"].tolist() == [True, True, True, False, True]
    assert len(s.transcripts(drop_unassigned=True)) == 4
    sel = s.transcripts(columns=["cell_id", "he_x"])
    assert list(sel.columns) == ["cell_id", "he_x"]
    assert len(s.transcripts(min_qv=None, genes_only=False)) == 7


def test_errors_name_file_and_sample(tmp_path):
    sid = _write_sample(tmp_path)
    s = HestSample(tmp_path, "MISSING1")
    with pytest.raises(InputError, match="MISSING1") as ei:
        s.metadata
    assert "MISSING1.json" in str(ei.value)
    (tmp_path / "metadata" / "BAD.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        HestSample(tmp_path, "BAD").organ
    # a transcripts parquet without cell_id
    p = tmp_path / "transcripts" / f"{sid}_transcripts.parquet"
    t = pq.read_table(p).drop_columns(["cell_id"])
    pq.write_table(t, p)
    with pytest.raises(InputError, match="no cell_id") as ei:
        HestSample(tmp_path, sid).cells()
    assert sid in str(ei.value) and "allow_missing_cell_id" in str(ei.value)
    assert (HestSample(tmp_path, sid).transcripts(allow_missing_cell_id=True)["cell_id"] == UNASSIGNED).all()


def test_cells_without_segmentation(tmp_path):
    sid = _write_sample(tmp_path, with_seg=False)
    ad = HestSample(tmp_path, sid).cells()
    assert not ad.obs["has_nucleus"].any()
    np.testing.assert_allclose(ad.obsm["spatial"][0], [11, 11])  # mean of c1's EPCAM + KRT7 he_xy


def test_wsi_opens(tmp_path):
    from stlib.io import wsi as wsi_mod

    sid = _write_sample(tmp_path)
    (tmp_path / "wsis").mkdir()
    img = np.full((600, 700, 3), 200, np.uint8)
    wsi_mod.write_pyramidal_tiff(tmp_path / "wsis" / f"{sid}.tif", img, um_per_px=0.25)
    w = HestSample(tmp_path, sid).wsi()
    assert tuple(w.shape[:2]) == (600, 700)
    assert w.um_per_px == pytest.approx(0.2737)  # metadata wins over the TIFF tag


def test_read_hest_metadata_csv_bom(tmp_path):
    p = tmp_path / "HEST_v1_1_0.csv"
    p.write_bytes("\ufeffdataset_title,id,organ\nX,TENX1,Lung\n".encode("utf-8"))
    df = read_hest_metadata_csv(p)
    assert "dataset_title" in df.columns and df["id"].tolist() == ["TENX1"]
    assert read_hest_metadata_csv(tmp_path)["organ"].tolist() == ["Lung"]
    with pytest.raises(InputError, match="not found"):
        read_hest_metadata_csv(tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="no 'id' column"):
        read_hest_metadata_csv(tmp_path / "x.csv")


def test_arrow_dictionary_cell_ids(tmp_path):
    sid = _write_sample(tmp_path)
    p = tmp_path / "transcripts" / f"{sid}_transcripts.parquet"
    t = pq.read_table(p)
    i = t.column_names.index("cell_id")
    t = t.set_column(i, "cell_id", t.column("cell_id").dictionary_encode())
    pq.write_table(t, p)
    assert pa.types.is_dictionary(pq.read_schema(p).field("cell_id").type)
    assert HestSample(tmp_path, sid).cells().n_obs == 3


def test_data_root_holding_hest(tmp_path):
    sid = _write_sample(tmp_path / "hest")
    assert list_samples(tmp_path) == [sid]
    assert HestSample(tmp_path, sid).organ == "Breast"
    with pytest.raises(InputError, match="HEST folder not found"):
        list_samples(tmp_path / "nowhere")


def test_package_reexports_resolve():
    import stlib.io as sio
    import stlib.io.hest as hest_mod

    assert sio.HestSample is hest_mod.HestSample
    for name in sio.__all__:
        assert getattr(sio, name) is not None, name
    with pytest.raises(AttributeError):
        sio.no_such_reader


def test_empty_segmentation_reads_as_empty(tmp_path):
    sid = _write_sample(tmp_path, with_seg=False)
    (tmp_path / "xenium_seg").mkdir()
    gpd.GeoDataFrame({"cell_id": []}, geometry=[]).to_parquet(tmp_path / "xenium_seg" / f"{sid}_xenium_nucleus_seg.parquet")
    s = HestSample(tmp_path, sid)
    assert len(s.nuclei()) == 0
    assert not s.cells().obs["has_nucleus"].any()
