"""Readers of manually annotated H&E (stlib.io.annotations): synthetic edge cases, then
conformance on the real MoNuSeg / CoNSeP files of ../shared/realdata (skipped when absent)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from stlib.constants import (CONNECTIVE, EPITHELIAL, EPITHELIAL_ANY, IGNORE, INFLAMMATORY, NEOPLASTIC,
                             SOURCE_CLASS_MAPS, merge_epithelial)
from stlib.io import annotations as A
from stlib.utils import InputError


# ----------------------------------------------------------------------------- helpers
def _xml(regions: list[list[tuple[float, float]]], mpp: str | None = "0.2500", broken: bool = False) -> str:
    head = f'<Annotations MicronsPerPixel="{mpp}">' if mpp is not None else "<Annotations>"
    out = [head, '<Annotation Id="1"><Regions>']
    for k, reg in enumerate(regions, start=1):
        out.append(f'<Region Id="{k}"><Attributes/><Vertices>')
        for j, (x, y) in enumerate(reg):
            xs = "abc" if broken and k == 2 and j == 1 else f"{x}"
            out.append(f'<Vertex X="{xs}" Y="{y}"/>')
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


def _square(x0, y0, s):
    return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]


def _write_img(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


# ----------------------------------------------------------------------------- class table
def test_class_tables_and_merge():
    assert SOURCE_CLASS_MAPS["consep"] == {1: IGNORE, 2: INFLAMMATORY, 3: EPITHELIAL_ANY, 4: CONNECTIVE}
    assert SOURCE_CLASS_MAPS["consep_original"][4] == NEOPLASTIC
    assert SOURCE_CLASS_MAPS["consep_original"][3] == EPITHELIAL
    got = A.map_classes(np.array([[0, 1, 2], [3, 4, 0]]), "consep")
    assert got.tolist() == [[0, IGNORE, INFLAMMATORY], [EPITHELIAL_ANY, CONNECTIVE, 0]]
    with pytest.raises(InputError, match="not in the consep class table"):
        A.map_classes(np.array([5]), "consep", path="x.mat")
    merged = merge_epithelial(np.array([0, NEOPLASTIC, EPITHELIAL, EPITHELIAL_ANY, INFLAMMATORY, IGNORE]))
    assert merged.tolist() == [0, EPITHELIAL, EPITHELIAL, EPITHELIAL, INFLAMMATORY, IGNORE]


def test_losses_treat_merged_epithelial_as_unknown_class():
    import torch

    from stlib.model.losses import hovernet_loss

    inst = torch.zeros(1, 32, 32, dtype=torch.long)
    inst[0, 4:12, 4:12] = 1
    inst[0, 20:28, 20:28] = 2
    hv = torch.zeros(1, 2, 32, 32)
    out = {"np": torch.zeros(1, 2, 32, 32), "hv": torch.zeros(1, 2, 32, 32), "nt": torch.zeros(1, 6, 32, 32)}
    t1 = torch.zeros(1, 32, 32, dtype=torch.uint8)
    t1[inst == 1] = EPITHELIAL_ANY
    t1[inst == 2] = IGNORE
    _, terms = hovernet_loss(out, inst=inst, hv=hv, type_map=t1)
    t2 = t1.clone()
    t2[inst == 1] = IGNORE
    _, terms2 = hovernet_loss(out, inst=inst, hv=hv, type_map=t2)
    assert float(terms["nt_ce"]) == pytest.approx(float(terms2["nt_ce"]))  # 254 counts like 255 for NT


# ----------------------------------------------------------------------------- MoNuSeg XML
def test_monuseg_xml_quirks(tmp_path):
    big = _square(10, 10, 20)
    small_inside = _square(15, 15, 6)  # overlaps `big`: the smaller wins
    two = [(50, 50), (52, 52)]  # fewer than three vertices: skipped
    dup = [(60, 60), (60, 60), (61, 61)]  # three vertices but two distinct: skipped
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    _write_img(tmp_path / "images" / "TCGA-B0-0000-01Z.png", 64, 64)
    (tmp_path / "annotations" / "TCGA-B0-0000-01Z.xml").write_text(_xml([big, small_inside, two, dup]))
    polys, um, notes = A.read_monuseg_xml(tmp_path / "annotations" / "TCGA-B0-0000-01Z.xml")
    assert um == pytest.approx(0.25) and len(polys) == 2
    assert "2 region(s) with fewer than 3 distinct vertices skipped" in notes[0]
    [a] = A.read_monuseg_folder(tmp_path)
    assert a.organ == "Kidney" and a.source == "monuseg" and a.type is None
    assert a.n_nuclei == 2
    assert a.inst[18, 18] == 2  # the small region owns the overlap
    assert a.inst[12, 12] == 1
    # pixel-centre rule: pixel (r, c) belongs to the square [10, 30) iff 10 <= c + 0.5 < 30
    assert a.inst[10, 10] == 1 and a.inst[29, 29] == 1 and a.inst[30, 30] == 0 and a.inst[9, 9] == 0


def test_monuseg_xml_without_mpp_gz_and_nominal_size(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    _write_img(tmp_path / "images" / "X.tif", 40, 40) if False else Image.fromarray(
        np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / "X.png")
    (tmp_path / "annotations" / "X.xml.gz").write_bytes(gzip.compress(_xml([_square(5, 5, 8)], mpp=None).encode()))
    [a] = A.read_monuseg_folder(tmp_path)
    assert a.um_per_px == pytest.approx(0.25)
    assert any("nominal 40x" in n for n in a.notes)
    assert a.organ is None  # not a TCGA name: no organ guessed


def test_monuseg_broken_region_is_one_error_naming_the_file(tmp_path):
    p = tmp_path / "bad.xml"
    p.write_text(_xml([_square(1, 1, 5), _square(10, 10, 5)], broken=True))
    with pytest.raises(InputError) as e:
        A.read_monuseg_xml(p)
    assert "bad.xml" in str(e.value) and "Id=2" in str(e.value)
    p.write_text("<Annotations><Region")
    with pytest.raises(InputError, match="not valid XML"):
        A.read_monuseg_xml(p)
    p.write_text("<Annotations/>")
    with pytest.raises(InputError, match="no <Region>"):
        A.read_monuseg_xml(p)


def test_monuseg_xml_for_another_image_is_refused(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    xml = tmp_path / "a.xml"
    xml.write_text(_xml([_square(100 + 10 * k, 100, 5) for k in range(10)]))
    with pytest.raises(InputError, match="outside"):
        A.read_monuseg(img, xml)


# ----------------------------------------------------------------------------- CoNSeP
def _consep_patch(tmp_path: Path, stem: str, inst: np.ndarray, types: list[int], *, img_shape=None, mat=True):
    for d in ("images", "inst", "type_mat"):
        (tmp_path / d).mkdir(exist_ok=True)
    h, w = img_shape or inst.shape
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(tmp_path / "images" / f"{stem}.jpg", quality=90)
    np.save(tmp_path / "inst" / f"{stem}.npy", inst.astype(np.int32))
    if mat:
        ids = np.unique(inst[inst > 0])
        cen = np.array([[np.mean(np.nonzero(inst == i)[1]), np.mean(np.nonzero(inst == i)[0])] for i in ids])
        savemat(tmp_path / "type_mat" / f"{stem}.mat", {"inst_type": np.array(types)[:, None].astype(float),
                                                       "inst_centroid": cen})


def test_consep_patch_classes_follow_sorted_ids(tmp_path):
    inst = np.zeros((32, 32), np.int32)
    inst[2:8, 2:8] = 907  # ids are those of the full image: not consecutive, not in raster order
    inst[20:26, 2:8] = 35
    inst[2:8, 20:26] = 311
    inst[28:32, 28:32] = 512  # a nucleus cut by the patch border
    _consep_patch(tmp_path, "train_9_000", inst, [2, 4, 1, 3])  # for ids 35, 311, 512, 907
    a = A.read_consep_patch(tmp_path / "images" / "train_9_000.jpg", tmp_path / "inst" / "train_9_000.npy",
                            tmp_path / "type_mat" / "train_9_000.mat")
    assert a.type[22, 4] == INFLAMMATORY and a.type[4, 22] == CONNECTIVE
    assert a.type[30, 30] == IGNORE and a.type[4, 4] == EPITHELIAL_ANY
    assert a.inst[4, 4] == 907 and a.organ == "Bowel" and a.um_per_px == pytest.approx(0.25)
    ids, cls = a.nucleus_classes()
    assert ids.tolist() == [35, 311, 512, 907] and cls.tolist() == [2, 3, 255, 254]


def test_consep_bad_inputs_name_the_file(tmp_path):
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 4
    _consep_patch(tmp_path, "p", inst, [2])
    savemat(tmp_path / "type_mat" / "nt.mat", {"inst_centroid": np.zeros((1, 2))})
    with pytest.raises(InputError) as e:
        A.read_consep_patch(tmp_path / "images" / "p.jpg", tmp_path / "inst" / "p.npy", tmp_path / "type_mat" / "nt.mat")
    assert "nt.mat" in str(e.value) and "inst_type" in str(e.value)
    savemat(tmp_path / "type_mat" / "two.mat", {"inst_type": np.array([[2.0], [3.0]])})
    with pytest.raises(InputError, match="lists 2 classes but the instance map has 1"):
        A.read_consep_patch(tmp_path / "images" / "p.jpg", tmp_path / "inst" / "p.npy", tmp_path / "type_mat" / "two.mat")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "images" / "q.jpg")
    with pytest.raises(InputError) as e:
        A.read_consep_patch(tmp_path / "images" / "q.jpg", tmp_path / "inst" / "p.npy", None)
    assert "q.jpg" in str(e.value) and "16x20" in str(e.value)


def test_consep_assembly_from_16_patches(tmp_path):
    rng = np.random.default_rng(0)
    full = np.zeros((1000, 1000), np.int32)
    classes = {}
    for k in range(1, 400):
        y, x = rng.integers(0, 990, 2)
        full[y:y + 9, x:x + 9] = k * 3  # non-consecutive ids
        classes[k * 3] = int(rng.integers(1, 5))
    img = rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    for d in ("images", "inst", "type_mat"):
        (tmp_path / d).mkdir()
    for k in range(16):
        y, x = A.consep_patch_origin(k)
        p = full[y:y + 256, x:x + 256]
        stem = f"train_3_{k:03d}"
        Image.fromarray(img[y:y + 256, x:x + 256]).save(tmp_path / "images" / f"{stem}.png")
        np.savez_compressed(tmp_path / "inst" / f"{stem}.npz", inst=p)
        ids = np.unique(p[p > 0])
        savemat(tmp_path / "type_mat" / f"{stem}.mat", {"inst_type": np.array([classes[i] for i in ids], float)[:, None]})
    [a] = A.read_consep_patches(tmp_path)
    assert a.name == "train_3" and a.shape == (1000, 1000)
    np.testing.assert_array_equal(a.inst, full)
    np.testing.assert_array_equal(a.image, img)
    ids, cls = a.nucleus_classes()
    expect = A.map_classes(np.array([classes[i] for i in ids]), "consep")
    np.testing.assert_array_equal(cls, expect)
    patches = A.read_consep_patches(tmp_path, assemble=False)
    assert len(patches) == 16 and patches[0].shape == (256, 256)


def test_consep_mat_with_maps_original_and_merged(tmp_path):
    inst = np.zeros((20, 20), np.int32)
    inst[1:5, 1:5] = 1
    inst[10:15, 10:15] = 2
    typ = np.zeros((20, 20), np.int32)
    typ[inst == 1] = 4  # dysplastic/malignant epithelium in CoNSeP's 7 classes
    typ[inst == 2] = 6  # muscle
    _write_img(tmp_path / "train_1.png", 20, 20)
    savemat(tmp_path / "train_1.mat", {"inst_map": inst, "type_map": typ, "inst_type": np.array([[4], [6]])})
    a = A.read_consep_mat(tmp_path / "train_1.png", tmp_path / "train_1.mat")
    assert a.type[2, 2] == NEOPLASTIC and a.type[12, 12] == CONNECTIVE
    with pytest.raises(InputError, match="class id"):
        A.read_consep_mat(tmp_path / "train_1.png", tmp_path / "train_1.mat", classes="merged")
    savemat(tmp_path / "no_inst.mat", {"type_map": typ})
    with pytest.raises(InputError, match="no 'inst_map'"):
        A.read_consep_mat(tmp_path / "train_1.png", tmp_path / "no_inst.mat")
    _write_img(tmp_path / "big.png", 30, 20)
    with pytest.raises(InputError, match="big.png"):
        A.read_consep_mat(tmp_path / "big.png", tmp_path / "train_1.mat")


# ----------------------------------------------------------------------------- PanNuke, folders, GeoJSON
def test_pannuke_through_the_one_representation(tmp_path):
    from stlib.demo.writers import write_pannuke_fold

    masks = np.zeros((2, 64, 64, 6))
    masks[0, 5:15, 5:15, 1] = 3  # inflammatory
    masks[0, 30:40, 30:40, 0] = 3  # neoplastic, same id in another channel
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    imgs = np.full((2, 64, 64, 3), 128.0)
    write_pannuke_fold(tmp_path, 1, imgs, masks, np.array(["Breast", "Colon"]))
    out = A.read_annotations(tmp_path / "pannuke", fold=1)
    assert [a.organ for a in out] == ["Breast", "Colon"] and out[0].source == "pannuke"
    assert out[0].n_nuclei == 2 and out[0].type[10, 10] == INFLAMMATORY and out[0].type[35, 35] == NEOPLASTIC


def test_instance_folders_flat_and_split(tmp_path):
    inst = np.zeros((24, 24), np.int32)
    inst[2:9, 2:9] = 300  # 16-bit ids
    inst[12:20, 12:20] = 7
    flat = tmp_path / "flat"
    flat.mkdir()
    np.savez(flat / "a.npz", inst=inst, um_per_px=0.5)
    _write_img(flat / "a.png", 24, 24)
    (flat / "tissue.csv").write_text("name,tissue\na,Liver\n")
    [a] = A.read_instance_folder(flat)
    assert a.um_per_px == 0.5 and a.organ == "Liver" and a.type is None
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    (split / "masks").mkdir()
    _write_img(split / "images" / "b.png", 24, 24)
    Image.fromarray(inst.astype(np.uint16)).save(split / "masks" / "b.png")
    with pytest.raises(InputError, match="pixel size unknown"):
        A.read_instance_folder(split)
    [b] = A.read_instance_folder(split, um_per_px=0.25)
    np.testing.assert_array_equal(b.inst, inst)
    assert A.detect_layout(split) == "folder"
    _write_img(split / "images" / "c.png", 30, 24)
    Image.fromarray(inst.astype(np.uint16)).save(split / "masks" / "c.png")
    with pytest.raises(InputError, match="c.png"):
        A.read_instance_folder(split, um_per_px=0.25)


def test_write_instance_folder_is_what_metrics_reads(tmp_path):
    from stlib.metrics import evaluate_folder

    inst = np.zeros((32, 32), np.int32)
    inst[3:10, 3:10] = 5
    typ = np.where(inst > 0, INFLAMMATORY, 0).astype(np.uint8)
    a = A.AnnotatedImage(name="t", image=np.zeros((32, 32, 3), np.uint8), inst=inst, type=typ, um_per_px=0.25,
                         organ="Bowel", source="folder")
    A.write_instance_folder([a], tmp_path / "truth")
    [b] = A.read_instance_folder(tmp_path / "truth")
    np.testing.assert_array_equal(b.inst, inst)
    np.testing.assert_array_equal(b.type, typ)
    assert b.organ == "Bowel" and b.um_per_px == 0.25
    recs, agg = evaluate_folder(tmp_path / "truth", tmp_path / "truth")
    assert agg["pq"] == pytest.approx(1.0)


def test_polygons_round_trip_through_instance_maps():
    rng = np.random.default_rng(1)
    inst = np.zeros((80, 80), np.int32)
    yy, xx = np.mgrid[:80, :80]
    for k in range(1, 12):
        cy, cx = rng.uniform(8, 72, 2)
        a, b = rng.uniform(3, 7, 2)
        inst[((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1] = k * 10
    rings = A.instance_polygons(inst)
    ids = sorted(rings)
    back, _, _ = A.rasterize_polygons([rings[i] for i in ids], inst.shape)
    lut = np.zeros(back.max() + 1, np.int32)
    lut[1:] = ids
    agree = np.mean(lut[back] == inst)
    assert agree > 0.995


def test_geojson_both_ways(tmp_path):
    from stlib.metrics import pq

    inst = np.zeros((48, 48), np.int32)
    inst[4:14, 4:14] = 1
    inst[20:30, 25:40] = 2
    typ = np.zeros_like(inst, np.uint8)
    typ[inst == 1] = INFLAMMATORY
    typ[inst == 2] = CONNECTIVE
    img_path = tmp_path / "tile.png"
    _write_img(img_path, 48, 48)
    a = A.AnnotatedImage(name="tile", image=np.asarray(Image.open(img_path)), inst=inst, type=typ, um_per_px=0.25,
                         organ=None, source="folder")
    A.write_geojson(tmp_path / "tile.geojson", a)
    doc = json.loads((tmp_path / "tile.geojson").read_text())
    names = sorted(f["properties"]["classification"]["name"] for f in doc["features"])
    assert names == ["Connective", "Inflammatory"]
    b = A.read_geojson_annotation(img_path, tmp_path / "tile.geojson", um_per_px=0.25)
    assert pq(inst, b.inst).pq > 0.95
    ids, cls = b.nucleus_classes()
    assert sorted(cls.tolist()) == [INFLAMMATORY, CONNECTIVE]
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(InputError, match="bad.geojson"):
        A.read_geojson(tmp_path / "bad.geojson")


def test_infer_geojson_uses_the_shared_writer(tmp_path):
    """stlib.infer writes its GeoJSON through stlib.io.annotations, and it reads back."""
    from stlib.infer import InferenceResult, write_outputs

    import pandas as pd

    ring = np.array([[2.0, 2.0], [12.0, 2.0], [12.0, 12.0], [2.0, 12.0], [2.0, 2.0]])
    res = InferenceResult(nuclei=pd.DataFrame({"id": [1], "x": [7.0], "y": [7.0], "area_um2": [6.25], "class": [2],
                                               "class_name": ["Inflammatory"], "probability": [0.9]}),
                          polygons=[ring], source="x.png", image_shape=(16, 16), um_per_px=0.25, model_um_per_px=0.25)
    files = write_outputs(res, tmp_path, "x")
    polys, classes, names = A.read_geojson(files["geojson"])
    assert classes.tolist() == [INFLAMMATORY] and names == ["Inflammatory"]
    np.testing.assert_allclose(polys[0], ring)


# ----------------------------------------------------------------------------- real files
def test_real_monuseg_conformance(realdata):
    root = realdata / "nuclei-monuseg"
    xmls = sorted((root / "annotations").glob("*.xml"))
    assert len(xmls) == 13
    n_regions = n_polys = 0
    mpps = {}
    for x in xmls:
        raw = x.read_text()
        n_regions += raw.count("<Region ")
        polys, um, notes = A.read_monuseg_xml(x)
        n_polys += len(polys)
        mpps[x.stem] = um
    assert n_regions == 4951
    assert n_regions - n_polys == 2  # the two regions with fewer than three vertices
    assert mpps["TCGA-NH-A8F7-01A-01-TS1"] is None
    known = [v for v in mpps.values() if v is not None]
    assert min(known) == pytest.approx(0.2456) and max(known) == pytest.approx(0.2527)
    a = A.read_monuseg(root / "images" / "TCGA-21-5784-01Z-00-DX1.tif", xmls[0])
    assert a.shape == (1000, 1000) and a.organ == "Lung" and a.um_per_px == pytest.approx(0.2527)
    # overlapping outlines exist in the real data: some regions lose pixels to a smaller neighbour
    polys, _, _ = A.read_monuseg_xml(xmls[0])
    full = [A.rasterize_polygons([p], a.shape)[0].sum() for p in polys[:150]]
    kept = [(a.inst == i + 1).sum() for i in range(150)]
    assert any(k < f for k, f in zip(kept, full))
    assert a.n_nuclei >= len(polys) - 3


def test_real_consep_conformance(realdata):
    root = realdata / "nuclei-consep"
    stems = sorted(p.stem for p in (root / "inst").glob("train_1_*.npy"))
    assert len(stems) == 16
    nonconsecutive = False
    for stem in stems[:6]:
        a = A.read_consep_patch(root / "images" / f"{stem}.jpg", root / "inst" / f"{stem}.npy",
                                root / "type_mat" / f"{stem}.mat")
        ids = np.unique(a.inst[a.inst > 0])
        nonconsecutive |= bool(ids.max() > ids.size)
        # inst_centroid is listed in sorted-id order: check it against the masks
        from scipy.io import loadmat

        cen = loadmat(root / "type_mat" / f"{stem}.mat")["inst_centroid"]
        for k in range(0, ids.size, 7):
            yy, xx = np.nonzero(a.inst == ids[k])
            assert abs(xx.mean() - cen[k, 0]) < 1.5 and abs(yy.mean() - cen[k, 1]) < 1.5
        # lossy JPEG: a real RGB image of the mask's size
        assert a.image.shape == (256, 256, 3) and a.image.dtype == np.uint8
    assert nonconsecutive
    full = A.read_consep_patches(root, images=["train_1"])[0]
    assert full.shape == (1000, 1000) and full.type is not None
    # nuclei cut by patch borders are whole again: one id spans two patches
    assert len(np.unique(full.inst[250:262, :][full.inst[250:262, :] > 0])) > 3


def test_real_consep_class_totals(realdata):
    from scipy.io import loadmat

    counts = np.zeros(5, int)
    for m in (realdata / "nuclei-consep" / "type_mat").glob("*.mat"):
        t = loadmat(m)["inst_type"].ravel().astype(int)
        counts += np.bincount(t, minlength=5)[:5]
    assert counts[1:].tolist() == [432, 4507, 6609, 6668]


def test_read_annotations_detects_real_layouts(realdata):
    assert A.detect_layout(realdata / "nuclei-monuseg") == "monuseg"
    assert A.detect_layout(realdata / "nuclei-consep") == "consep_patches"
    [a] = A.read_annotations(realdata / "nuclei-monuseg", names=["TCGA-B0-5710-01Z-00-DX1"])
    assert a.organ == "Kidney"


# ----------------------------------------------------------------------------- the shipped subset
def test_shipped_subset_is_small_licensed_and_readable(repo):
    root = repo / "realtissue"
    assert root.is_dir(), "the real-image subset ships in realtissue/"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 15 * 2**20, f"shipped real data is {size / 2**20:.1f} MB (limit 15 MB)"
    for sub in ("nuclei-monuseg", "nuclei-consep"):
        assert (root / sub / "LICENSE.md").is_file()
        assert "NonCommercial" in (root / sub / "LICENSE.md").read_text() or \
            "non-commercial" in (root / sub / "LICENSE.md").read_text().lower()
    text = (root / "README.md").read_text()
    assert "CC BY-NC-SA" in text and "Kumar" in text and "Graham" in text
    from stlib.demo.realtissue import load_source_images

    imgs = load_source_images(root)
    organs = {a.organ for a in imgs}
    assert {"Breast", "Lung", "Kidney", "Prostate", "Bowel"} <= organs
    assert {a.source for a in imgs} == {"monuseg", "consep"}


def test_shipped_subset_matches_the_originals(repo, realdata):
    root = repo / "realtissue"
    for x in sorted((root / "nuclei-monuseg" / "annotations").glob("*.xml.gz"))[:3]:
        stem = re.sub(r"\.xml\.gz$", "", x.name)
        assert gzip.decompress(x.read_bytes()) == (realdata / "nuclei-monuseg" / "annotations" / f"{stem}.xml").read_bytes()
        a = A.read_monuseg(root / "nuclei-monuseg" / "images" / f"{stem}.tif", x)
        b = A.read_monuseg(realdata / "nuclei-monuseg" / "images" / f"{stem}.tif",
                           realdata / "nuclei-monuseg" / "annotations" / f"{stem}.xml")
        np.testing.assert_array_equal(a.inst, b.inst)
        assert a.um_per_px == b.um_per_px
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 4  # JPEG tiles, quality 95: 2.1-3.5 measured
    for p in sorted((root / "nuclei-consep" / "inst").glob("*.npz"))[:4]:
        with np.load(p) as z:
            np.testing.assert_array_equal(z["inst"], np.load(realdata / "nuclei-consep" / "inst" / f"{p.stem}.npy"))


def test_bad_inputs_give_one_error_line_naming_the_file_through_the_cli(tmp_path, capsys):
    """The three bad inputs of the issue, as a user meets them: ``stlib realtissue --source DIR``
    exits 1 with one ``error`` line that names the offending file, and writes no cohort."""
    from stlib.cli import main

    mon = tmp_path / "mon"
    (mon / "images").mkdir(parents=True)
    (mon / "annotations").mkdir()
    _write_img(mon / "images" / "TCGA-A7-A13E-01Z-00-DX1.tif", 40, 40)
    (mon / "annotations" / "TCGA-A7-A13E-01Z-00-DX1.xml").write_text(
        _xml([_square(2, 2, 5), _square(20, 20, 5)], broken=True))
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 4
    con_mat, con_jpg = tmp_path / "con_mat", tmp_path / "con_jpg"
    con_mat.mkdir(), con_jpg.mkdir()
    _consep_patch(con_mat, "train_1_000", inst, [2])
    savemat(con_mat / "type_mat" / "train_1_000.mat", {"inst_centroid": np.zeros((1, 2))})  # no inst_type
    _consep_patch(con_jpg, "train_1_000", inst, [2], img_shape=(20, 16))  # JPEG 16x20, mask 16x16
    for src, name in ((mon, "TCGA-A7-A13E-01Z-00-DX1.xml"), (con_mat, "train_1_000.mat"), (con_jpg, "train_1_000.jpg")):
        out = tmp_path / f"cohort_{src.name}"
        assert main(["realtissue", "--out", str(out), "--source", str(src), "--pannuke", "none"]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("stlib realtissue: error:") and name in err[0], err
        assert not (out / "cohort.json").exists()
