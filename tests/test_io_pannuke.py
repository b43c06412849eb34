"""Unit tests of stlib.io.pannuke on a tiny fold in the official layout."""

from __future__ import annotations

import numpy as np
import pytest

from stlib.constants import CONNECTIVE, EPITHELIAL, INFLAMMATORY, NEOPLASTIC, PANNUKE_CHANNEL_TO_CLASS
from stlib.io.pannuke import images_uint8, list_folds, masks_to_inst_type, read_fold
from stlib.utils import InputError


def _masks():
    m = np.zeros((2, 8, 8, 6), np.float64)
    # image 0: id 1 in Neoplastic and id 1 in Inflammatory (same id, different nuclei), id 3 Connective
    m[0, 0:2, 0:2, 0] = 1
    m[0, 4:6, 4:6, 1] = 1
    m[0, 6:8, 0:2, 2] = 3
    # image 1: two Epithelial nuclei, ids 5 and 9
    m[1, 0:3, 0:3, 4] = 5
    m[1, 5:8, 5:8, 4] = 9
    m[..., 5] = (m[..., :5].sum(-1) == 0)
    return m


def _write_fold(root, k=1, n=2, *, masks=None):
    img_dir = root / f"Fold {k}" / "images" / f"fold{k}"
    mask_dir = root / f"Fold {k}" / "masks" / f"fold{k}"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    rng = np.random.default_rng(k)
    np.save(img_dir / "images.npy", rng.uniform(0, 255, (n, 8, 8, 3)))
    np.save(img_dir / "types.npy", np.array(["Breast", "Colon"][:n] + ["Breast"] * max(0, n - 2)))
    np.save(mask_dir / "masks.npy", _masks()[:n] if masks is None else masks)


def test_masks_to_inst_type_unique_per_image():
    inst, typ = masks_to_inst_type(_masks())
    assert inst.dtype == np.int32 and typ.dtype == np.uint8 and inst.shape == (2, 8, 8)
    # image 0: the two "id 1" nuclei get different ids; 3 instances, ids 1..3
    assert sorted(np.unique(inst[0])) == [0, 1, 2, 3]
    assert inst[0, 0, 0] != inst[0, 4, 4]
    assert typ[0, 0, 0] == NEOPLASTIC and typ[0, 4, 4] == INFLAMMATORY and typ[0, 7, 0] == CONNECTIVE
    assert sorted(np.unique(inst[1])) == [0, 1, 2] and set(np.unique(typ[1])) == {0, EPITHELIAL}
    assert ((inst > 0) == (typ > 0)).all()
    # the per-image relabelling gives the same result whatever the chunking
    inst1, typ1 = masks_to_inst_type(_masks(), chunk=1)
    np.testing.assert_array_equal(inst, inst1)
    np.testing.assert_array_equal(typ, typ1)
    single_inst, _ = masks_to_inst_type(_masks()[1])
    np.testing.assert_array_equal(single_inst, inst[1])
    with pytest.raises(ValueError):
        masks_to_inst_type(np.zeros((8, 8)))


def _paint_in_channel_order(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke's rule, written out: every (channel, id) nucleus painted over what came before."""
    inst = np.zeros(m.shape[:2], np.int64)
    typ = np.zeros(m.shape[:2], np.uint8)
    k = 0
    for ch in range(5):
        for v in np.unique(m[..., ch]):
            if v > 0:
                k += 1
                inst[m[..., ch] == v] = k
                typ[m[..., ch] == v] = PANNUKE_CHANNEL_TO_CLASS[ch]
    return inst, typ


def test_overlapping_channels_the_later_channel_wins():
    """Where two class channels claim a pixel, PanNuke's evaluation (its ``binarize``) keeps the
    later channel; the tile store and the metrics use this one converter."""
    rng = np.random.default_rng(0)
    m = np.zeros((3, 16, 16, 6))
    for i in range(3):
        for ch in range(5):
            for v in (1, 2):
                y, x = rng.integers(0, 12, 2)
                m[i, y:y + 5, x:x + 5, ch] = v  # overlaps within and across channels on purpose
    inst, typ = masks_to_inst_type(m)
    for i in range(3):
        ref_inst, ref_typ = _paint_in_channel_order(m[i])
        np.testing.assert_array_equal(typ[i], ref_typ)
        # the same partition of pixels into nuclei (ids may be numbered differently)
        pairs = {(int(a), int(b)) for a, b in zip(inst[i].ravel(), ref_inst.ravel())}
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    # a pixel of Neoplastic (channel 0) under a Connective nucleus (channel 2): Connective
    two = np.zeros((4, 4, 6))
    two[0:3, 0:3, 0] = 1
    two[1:4, 1:4, 2] = 1
    i2, t2 = masks_to_inst_type(two)
    assert t2[1, 1] == CONNECTIVE and t2[0, 0] == NEOPLASTIC and i2[1, 1] == i2[3, 3] != i2[0, 0]


def test_metrics_read_pannuke_masks_with_the_same_converter():
    from stlib import metrics

    two = np.zeros((8, 8, 6))
    two[0:5, 0:5, 0] = 1
    two[2:7, 2:7, 2] = 1
    inst, _ = masks_to_inst_type(two)
    assert metrics.pannuke_bpq(two, inst) == pytest.approx(1.0)


def test_read_fold_official_layout(tmp_path):
    _write_fold(tmp_path, 2)
    f = read_fold(tmp_path, 2)
    assert len(f) == 2 and isinstance(f.images, np.memmap)
    assert f.types.tolist() == ["Breast", "Colon"]
    assert f.tissues().to_dict() == {"Breast": 1, "Colon": 1}
    assert f.indices("Colon").tolist() == [1]
    inst, typ = f.inst_type(slice(0, 2))
    assert inst.max() == 3
    u8 = f.image_uint8(0)
    assert u8.dtype == np.uint8 and u8.shape == (8, 8, 3)
    np.testing.assert_array_equal(u8, np.clip(np.rint(np.asarray(f.images[0])), 0, 255).astype(np.uint8))
    assert list_folds(tmp_path) == [2]


def test_read_fold_errors(tmp_path):
    with pytest.raises(InputError, match="fold 1 not found"):
        read_fold(tmp_path, 1)
    with pytest.raises(InputError, match="PanNuke folder not found"):
        read_fold(tmp_path / "none", 1)
    _write_fold(tmp_path, 3, masks=np.zeros((2, 8, 9, 6)))
    with pytest.raises(InputError, match="masks.npy has shape"):
        read_fold(tmp_path, 3)


def test_images_uint8_scaling():
    a = np.array([[[[0.0, 0.5, 1.0]]]])
    np.testing.assert_array_equal(images_uint8(a), [[[[0, 128, 255]]]])
    b = np.array([[[[0.0, 127.6, 300.0]]]])
    np.testing.assert_array_equal(images_uint8(b), [[[[0, 128, 255]]]])
    c = np.zeros((1, 1, 1, 3), np.uint8)
    assert images_uint8(c) is not None and images_uint8(c).dtype == np.uint8


def test_pannuke_to_store_round_trip(tmp_path):
    from stlib.io.pannuke import masks_to_inst_type, pannuke_to_store, read_fold
    from stlib.io.tiles import TileStore

    _write_fold(tmp_path / "pn", k=1, n=2)
    _write_fold(tmp_path / "pn", k=2, n=2)
    out = pannuke_to_store(tmp_path / "pn", tmp_path / "store")
    store = TileStore(out)
    assert len(store) == 4
    assert store.meta["split"].tolist() == ["fold1"] * 2 + ["fold2"] * 2
    fold2 = read_fold(tmp_path / "pn", 2)
    inst, typ = masks_to_inst_type(np.asarray(fold2.masks))
    b = store.get_batch([3])
    np.testing.assert_array_equal(b["inst"][0], inst[1])
    np.testing.assert_array_equal(b["type"][0], typ[1])
    assert set(np.unique(b["conf"][0])) <= {0, 255}
    assert ((b["conf"][0] == 255) == (inst[1] > 0)).all()
    assert store.meta["organ"].iloc[3] == str(fold2.types[1])
    # idempotent: a second call keeps the existing store
    mtime = (out / "store.json").stat().st_mtime_ns
    pannuke_to_store(tmp_path / "pn", tmp_path / "store")
    assert (out / "store.json").stat().st_mtime_ns == mtime


def test_restricted_store_holds_no_tile_of_an_excluded_tissue(tmp_path):
    from stlib.io.pannuke import pannuke_to_store
    from stlib.io.tiles import TileStore
    from stlib.utils import read_json

    for k in (1, 2, 3):
        _write_fold(tmp_path / "pn", k=k, n=2)  # each fold: one Breast, one Colon image
    full = TileStore(pannuke_to_store(tmp_path / "pn", tmp_path / "all"))
    out = pannuke_to_store(tmp_path / "pn", tmp_path / "restricted", exclude_tissues=["Colon"])
    restricted = TileStore(out)
    assert set(full.meta["organ"]) == {"Breast", "Colon"}
    assert set(restricted.meta["organ"]) == {"Breast"} and len(restricted) == 3
    # a tile keeps the id of its PanNuke image, so it is the same image as in the full store
    assert set(restricted.meta["tile_id"]) == set(full.meta.loc[full.meta.organ == "Breast", "tile_id"])
    info = read_json(out / "store.json")
    assert info["exclude_tissues"] == ["Colon"] and info["tissues"] == ["Breast"]
    # the exclusion is part of the build key: another exclusion rebuilds the store
    again = TileStore(pannuke_to_store(tmp_path / "pn", tmp_path / "restricted", exclude_tissues=["Breast"]))
    assert set(again.meta["organ"]) == {"Colon"}
    with pytest.raises(InputError, match="Kolon"):
        pannuke_to_store(tmp_path / "pn", tmp_path / "x", exclude_tissues=["Kolon"])
