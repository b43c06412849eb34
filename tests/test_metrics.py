"""Tests of stlib.metrics: hand-computed cases, empty cases, a slow reference, stardist."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from stlib import metrics as M
from stlib.constants import PANNUKE_CHANNEL_TO_CLASS
from stlib.utils import InputError


# --------------------------------------------------------------------------- fixtures
def two_squares():
    """Truth: two 3x3 squares (ids 5, 9). Pred: A shifted by one column (IoU 6/12 = 0.5
    exactly, not a PQ match), B cut to 3x2 (IoU 6/9)."""
    t = np.zeros((10, 10), np.int32)
    t[1:4, 1:4] = 5
    t[6:9, 6:9] = 9
    p = np.zeros((10, 10), np.int32)
    p[1:4, 2:5] = 3
    p[6:9, 6:8] = 2
    return t, p


def random_instances(rng, shape=(96, 96), n=40):
    """Ellipse-ish blobs painted in random order (later ones occlude): touching nuclei."""
    inst = np.zeros(shape, np.int32)
    rr, cc = np.indices(shape)
    for i in range(1, n + 1):
        r0, c0 = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b, th = rng.uniform(3, 8), rng.uniform(3, 8), rng.uniform(0, np.pi)
        y, x = rr - r0, cc - c0
        u = x * np.cos(th) + y * np.sin(th)
        v = -x * np.sin(th) + y * np.cos(th)
        inst[(u / a) ** 2 + (v / b) ** 2 <= 1] = i
    return inst


def perturb(rng, inst):
    """A 'prediction': shift, erode/dilate some, split some, merge neighbours, drop, add."""
    pred = np.roll(inst, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).copy()
    ids = np.unique(pred)[1:]
    nxt = int(ids.max(initial=0)) + 1
    for i in ids:
        m = pred == i
        if not m.any():  # merged away earlier
            continue
        action = rng.integers(0, 6)
        if action == 0:  # erode
            pred[m & ~ndi.binary_erosion(m)] = 0
        elif action == 1:  # dilate into background
            pred[ndi.binary_dilation(m) & (pred == 0)] = i
        elif action == 2:  # split along a random line through the centroid
            r, c = np.nonzero(m)
            th = rng.uniform(0, np.pi)
            side = (c - c.mean()) * np.cos(th) + (r - r.mean()) * np.sin(th) > 0
            pred[r[side], c[side]] = nxt
            nxt += 1
        elif action == 3:  # merge with a touching neighbour
            nb = np.unique(pred[ndi.binary_dilation(m) & ~m])
            nb = nb[(nb != 0) & (nb != i)]
            if nb.size:
                pred[pred == nb[0]] = i
        elif action == 4:  # drop
            if rng.random() < 0.5:
                pred[m] = 0
    for _ in range(3):  # false positives
        r, c = rng.integers(0, pred.shape[0] - 5, 2)
        pred[r:r + 4, c:c + 4] = nxt
        nxt += 1
    return pred


def slow_reference(true, pred):
    """Obviously-correct per-instance implementation of the definitions."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [j for j in np.unique(pred) if j]
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros_like(inter)
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            ti, pj = true == i, pred == j
            inter[a, b] = np.sum(ti & pj)
            union[a, b] = np.sum(ti | pj)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    t_area = [np.sum(true == i) for i in t_ids]
    p_area = [np.sum(pred == j) for j in p_ids]
    # AJI
    I = U = 0.0
    used = set()
    for a in range(len(t_ids)):
        if len(p_ids) and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            I += inter[a, b]
            U += union[a, b]
            used.add(b)
        else:
            U += t_area[a]
    U += sum(p_area[b] for b in range(len(p_ids)) if b not in used)
    aji = I / U
    # AJI+
    ra, cb = linear_sum_assignment(-iou) if iou.size else (np.zeros(0, int), np.zeros(0, int))
    keep = iou[ra, cb] > 0
    ra, cb = ra[keep], cb[keep]
    I = inter[ra, cb].sum()
    U = union[ra, cb].sum() + sum(t_area[a] for a in range(len(t_ids)) if a not in set(ra)) \
        + sum(p_area[b] for b in range(len(p_ids)) if b not in set(cb))
    aji_plus = I / U
    # PQ
    match = iou > 0.5
    tp = int(match.sum())
    fp, fn = len(p_ids) - tp, len(t_ids) - tp
    sq = iou[match].sum() / tp if tp else 0.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    dice = 2 * np.sum((true > 0) & (pred > 0)) / (np.sum(true > 0) + np.sum(pred > 0))
    return dict(aji=aji, aji_plus=aji_plus, tp=tp, fp=fp, fn=fn, dq=dq, sq=sq, pq=dq * sq, dice=dice,
                sum_iou=iou[match].sum(), iou=iou)


# --------------------------------------------------------------------------- hand-computed
def test_hand_computed_two_squares():
    t, p = two_squares()
    r = M.pq(t, p)
    assert (r.tp, r.fp, r.fn) == (1, 1, 1)
    assert r.sum_iou == pytest.approx(2 / 3, abs=1e-15)
    assert r.dq == 0.5 and r.sq == pytest.approx(2 / 3) and r.pq == pytest.approx(1 / 3)
    assert r.paired_true.tolist() == [9] and r.paired_pred.tolist() == [2]
    assert M.dice(t, p) == pytest.approx(24 / 33)
    assert M.aji(t, p) == pytest.approx(12 / 21)  # (6 + 6) / (12 + 9)
    assert M.aji_plus(t, p) == pytest.approx(12 / 21)
    # below 0.5 the Hungarian pairs count: the IoU-0.5 pair now matches
    r3 = M.pq(t, p, match_iou=0.3)
    assert (r3.tp, r3.fp, r3.fn) == (2, 0, 0)
    assert r3.sum_iou == pytest.approx(0.5 + 2 / 3)


def test_aji_reuses_predictions_aji_plus_does_not():
    t = np.zeros((2, 4), np.int32)
    t[:, :2], t[:, 2:] = 1, 2
    p = np.full((2, 4), 7, np.int32)  # one prediction over both
    assert M.aji(t, p) == pytest.approx(8 / 16)  # both pairs use 7: I=4+4, U=8+8
    assert M.aji_plus(t, p) == pytest.approx(4 / 12)  # one pair (I=4, U=8) + unpaired true (4)


def test_aji_unpaired_prediction_adds_its_area():
    t = np.zeros((8, 8), np.int32)
    t[0:2, 0:2] = 1
    p = np.zeros_like(t)
    p[0:2, 0:2] = 4
    p[5:7, 5:7] = 8
    assert M.aji(t, p) == pytest.approx(4 / 8)
    assert M.aji_plus(t, p) == pytest.approx(4 / 8)


def test_empty_cases():
    z = np.zeros((5, 5), np.int32)
    one = z.copy()
    one[1:3, 1:3] = 3
    assert M.dice(z, z) == 1.0 and M.aji(z, z) == 1.0 and M.aji_plus(z, z) == 1.0
    r = M.pq(z, z)
    assert math.isnan(r.dq) and math.isnan(r.sq) and math.isnan(r.pq) and (r.tp, r.fp, r.fn) == (0, 0, 0)
    for t, p, fp, fn in ((z, one, 1, 0), (one, z, 0, 1)):
        r = M.pq(t, p)
        assert (r.dq, r.sq, r.pq, r.fp, r.fn) == (0.0, 0.0, 0.0, fp, fn)
        assert M.dice(t, p) == 0.0 and M.aji(t, p) == 0.0 and M.aji_plus(t, p) == 0.0
    assert math.isnan(M.pannuke_bpq(z, one)) and M.pannuke_bpq(one, z) == 0.0


def test_bad_arguments():
    t, p = two_squares()
    with pytest.raises(ValueError, match="match_iou"):
        M.pq(t, p, match_iou=1.0)
    with pytest.raises(ValueError, match="shapes"):
        M.pq(t, p[:5])
    with pytest.raises(ValueError, match="negative"):
        M.aji(t - 1, p)
    with pytest.raises(ValueError, match="integer"):
        M.dice(t + 0.5, p)
    with pytest.raises(ValueError, match="radius"):
        M.pair_coordinates(np.zeros((1, 2)), np.zeros((1, 2)), 0)


# --------------------------------------------------------------------------- vs slow reference / stardist
@pytest.mark.parametrize("seed", range(6))
def test_fast_matches_slow_reference_and_ids_do_not_matter(seed):
    rng = np.random.default_rng(seed)
    t = random_instances(rng)
    p = perturb(rng, t)
    ref = slow_reference(t, p)
    r = M.pq(t, p)
    assert (r.tp, r.fp, r.fn) == (ref["tp"], ref["fp"], ref["fn"])
    for key, val in (("dq", r.dq), ("sq", r.sq), ("pq", r.pq), ("sum_iou", r.sum_iou)):
        assert val == pytest.approx(ref[key], abs=1e-12), key
    assert M.aji(t, p) == pytest.approx(ref["aji"], abs=1e-12)
    assert M.aji_plus(t, p) == pytest.approx(ref["aji_plus"], abs=1e-12)
    assert M.dice(t, p) == pytest.approx(ref["dice"], abs=1e-12)
    # non-contiguous, huge ids (forces the np.unique path) give identical numbers
    t_ids = np.unique(t)[1:]
    big = np.zeros(t.max() + 1, np.int64)
    big[t_ids] = rng.permutation(t_ids.size) * 1_000_003 + 2**40
    t2 = big[t]
    p2 = np.where(p > 0, p * 7 + 11, 0)
    ev1, ev2 = M.evaluate_pair(t, p), M.evaluate_pair(t2, p2)
    ev3 = M.evaluate_pair(M.remap_label(t2), M.remap_label(p2))
    for k in ev1:
        np.testing.assert_allclose(ev2[k], ev1[k], rtol=0, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(ev3[k], ev1[k], rtol=0, atol=1e-12, err_msg=k)


def test_agrees_with_stardist_matching():
    """tp/fp/fn and PQ equal stardist's at thresh 0.5 where '>' and '>=' cannot differ."""
    from stardist.matching import matching

    used = 0
    for seed in range(100, 130):
        rng = np.random.default_rng(seed)
        t = random_instances(rng)
        p = perturb(rng, t)
        if np.any(slow_reference(t, p)["iou"] == 0.5):
            continue  # IoU exactly 0.5: stardist matches (>=), PQ does not (>)
        s = matching(t, p, thresh=0.5)
        r = M.pq(t, p)
        assert (r.tp, r.fp, r.fn) == (s.tp, s.fp, s.fn)
        assert r.pq == pytest.approx(s.panoptic_quality, rel=1e-6)
        used += 1
        if used == 4:
            break
    assert used == 4


def test_remap_label():
    x = np.array([[0, 40, 40], [7, 7, 7], [0, 0, 99]])
    assert M.remap_label(x).tolist() == [[0, 2, 2], [1, 1, 1], [0, 0, 3]]
    assert M.remap_label(x, by_size=True).tolist() == [[0, 2, 2], [1, 1, 1], [0, 0, 3]]
    y = np.array([[5, 0, 9, 9, 9]])
    assert M.remap_label(y, by_size=True).tolist() == [[2, 0, 1, 1, 1]]


def test_centroids_and_instance_types():
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:4] = 12  # rows 0-1, cols 0-3 -> (x, y) = (1.5, 0.5)
    inst[4:6, 4:6] = 3
    ids, xy = M.centroids(inst)
    assert ids.tolist() == [3, 12]
    np.testing.assert_allclose(xy, [[4.5, 4.5], [1.5, 0.5]])
    typ = np.zeros_like(inst)
    typ[0, 0:4] = 2
    typ[1, 0:1] = 1  # 12: 2 x4, 1 x1, 0 x3 -> 2
    typ[4, 4] = 5  # 3: background wins (3 px) -> second most common, 5
    _, types = M.instance_types(inst, typ)
    assert types.tolist() == [5, 2]


# --------------------------------------------------------------------------- PanNuke
def _pannuke_example():
    t_inst = np.zeros((20, 20), np.int32)
    t_type = np.zeros((20, 20), np.uint8)
    t_inst[1:5, 1:5], t_type[1:5, 1:5] = 1, 1
    t_inst[10:14, 10:14], t_type[10:14, 10:14] = 2, 2
    p_inst, p_type = t_inst.copy(), t_type.copy()
    p_inst[10:14, 10:12] = 0  # class-2 prediction: IoU 8/16 = 0.5 -> not matched
    p_type[10:14, 10:12] = 0
    p_inst[15:19, 15:19], p_type[15:19, 15:19] = 7, 3  # class 3 absent in truth: not penalised
    return t_inst, t_type, p_inst, p_type


def test_pannuke_mpq_skips_absent_classes():
    t_inst, t_type, p_inst, p_type = _pannuke_example()
    r = M.pannuke_mpq(t_inst, t_type, p_inst, p_type)
    assert r.pq[1] == 1.0 and r.pq[2] == 0.0
    assert all(math.isnan(r.pq[c]) for c in (3, 4, 5))
    assert r.mpq == 0.5
    # the class-3 false positive does count for bPQ: TP 1, FP 2, FN 1 -> DQ 0.5, SQ 1
    assert M.pannuke_bpq(t_inst, p_inst) == pytest.approx(1 / (1 + 1.5))
    # same numbers from PanNuke (H, W, 6) masks
    def to_masks(inst, typ):
        m = np.zeros(inst.shape + (6,), np.int32)
        for ch, c in PANNUKE_CHANNEL_TO_CLASS.items():
            m[..., ch] = np.where(typ == c, inst, 0)
        m[..., 5] = inst == 0
        return m
    tm, pm = to_masks(t_inst, t_type), to_masks(p_inst, p_type)
    r2 = M.pannuke_mpq(tm, None, pm, None)
    assert r2.mpq == 0.5 and r2.pq[1] == 1.0
    assert M.pannuke_bpq(tm, pm) == pytest.approx(1 / 2.5)
    from stlib.io.pannuke import masks_to_inst_type

    inst, typ = masks_to_inst_type(tm)
    assert len(np.unique(inst)) == 3 and set(np.unique(typ)) == {0, 1, 2}


def test_pannuke_mpq_unknown_truth_class_is_not_a_false_positive():
    t_inst, t_type, p_inst, p_type = _pannuke_example()
    t_type[1:5, 1:5] = 255  # nucleus 1: class unknown
    p_type[1:5, 1:5] = 4  # predicted 'dead': matches the unknown nucleus -> not an FP of class 4
    r = M.pannuke_mpq(t_inst, t_type, p_inst, p_type)
    assert math.isnan(r.pq[4]) and math.isnan(r.pq[1]) and r.pq[2] == 0.0


def test_pannuke_summary_tissue_vs_image_average():
    recs = [{"mpq": 0.2, "bpq": 0.5}, {"mpq": 0.4, "bpq": math.nan}, {"mpq": 1.0, "bpq": 0.8}]
    s = M.pannuke_summary(recs, ["A", "A", "B"])
    assert s.mpq == pytest.approx((0.3 + 1.0) / 2)
    assert s.mpq_image_avg == pytest.approx(1.6 / 3)
    assert s.bpq == pytest.approx((0.5 + 0.8) / 2) and s.per_tissue["A"]["n_images"] == 2
    assert M.pannuke_summary(recs).mpq == pytest.approx(1.6 / 3)


# --------------------------------------------------------------------------- detection / type
def test_pair_coordinates_radius_and_unconstrained_assignment():
    a = np.array([[0.0, 0.0]])
    assert len(M.pair_coordinates(a, np.array([[12.0, 0.0]]), 12).paired) == 1
    assert len(M.pair_coordinates(a, np.array([[12.01, 0.0]]), 12).paired) == 0
    assert M.radius_px(0.25) == 12.0 and M.radius_px(0.5) == 6.0
    # global assignment on all distances: a0-b0 (9) + a1-b1 (20) = 29 beats a0-b1 + a1-b0 = 31,
    # then a1-b1 (20 > 12) is dropped: a1 stays unpaired although b0 is 1 px away from it.
    a = np.array([[0.0, 0.0], [10.0, 0.0]])
    b = np.array([[9.0, 0.0], [30.0, 0.0]])
    m = M.pair_coordinates(a, b, 12)
    assert m.paired.tolist() == [[0, 0]] and m.unpaired_a.tolist() == [1] and m.unpaired_b.tolist() == [1]
    # the sparse (per component) path gives the same pairs on separated groups
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 2000, (300, 2))
    q = pts + rng.normal(0, 3, pts.shape)
    d = M.pair_coordinates(pts, q, 12)
    s = M.pair_coordinates(pts, q, 12, max_dense=1)
    assert d.paired.tolist() == s.paired.tolist()


def test_type_f1_hand_computed():
    t = np.array([[0, 0], [50, 0], [100, 0], [150, 0]], float)
    tt = np.array([1, 1, 2, 3])
    p = np.array([[1, 0], [51, 0], [101, 0], [300, 0]], float)
    pt = np.array([1, 2, 2, 1])
    r = M.type_f1(t, tt, p, pt, radius=12)
    assert r.f_d == pytest.approx(6 / 8) and r.accuracy == pytest.approx(2 / 3)
    assert r.counts[1] == M.TypeCounts(1, 0, 1, 1, 0) and r.f_c[1] == pytest.approx(2 / 5)
    assert r.counts[2] == M.TypeCounts(1, 1, 0, 0, 0) and r.f_c[2] == pytest.approx(2 / 4)
    assert r.f_c[3] == 0.0 and math.isnan(r.f_c[4])
    # pooled over two images = the counts added
    r2 = M.type_f1([t, t], [tt, tt], [p, p], [pt, pt], radius=12)
    assert r2.counts[1] == M.TypeCounts(2, 0, 2, 2, 0) and r2.f_c[1] == pytest.approx(2 / 5)
    d = M.detection_f1([t, t[:0]], [p, p], radius=12)
    assert (d.tp, d.fp, d.fn) == (3, 5, 1)


# --------------------------------------------------------------------------- folder / CLI
def _write(d, name, inst, typ=None):
    d.mkdir(exist_ok=True)
    arrays = {"inst": inst} if typ is None else {"inst": inst, "type": typ}
    np.savez(d / f"{name}.npz", **arrays)


def test_cli_writes_json(tmp_path):
    t_inst, t_type, p_inst, p_type = _pannuke_example()
    a, b = two_squares()
    _write(tmp_path / "true", "img1", t_inst, t_type)
    _write(tmp_path / "pred", "img1", p_inst, p_type)
    _write(tmp_path / "true", "img2", a, (a > 0).astype(np.uint8))
    _write(tmp_path / "pred", "img2", b, (b > 0).astype(np.uint8))
    (tmp_path / "tissue.csv").write_text("name,tissue\nimg1,Breast\nimg2,Colon\n")
    out = tmp_path / "m.json"
    rc = M.cli_main(["--true", str(tmp_path / "true"), "--pred", str(tmp_path / "pred"), "--json", str(out),
                     "--tissue-map", str(tmp_path / "tissue.csv")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"per_image", "aggregate", "definitions"}
    assert doc["per_image"]["img2"]["pq"] == pytest.approx(1 / 3)
    assert doc["per_image"]["img1"]["pq_connective"] is None  # NaN -> null
    agg = doc["aggregate"]
    assert agg["n_images"] == 2
    assert agg["mpq"] == pytest.approx((0.5 + 1 / 3) / 2)  # img2: class 1 only, PQ 1/3
    assert agg["pq"] == pytest.approx((doc["per_image"]["img1"]["pq"] + 1 / 3) / 2)
    assert set(agg["per_tissue"]) == {"Breast", "Colon"}


def test_folder_errors_name_the_file(tmp_path):
    a, b = two_squares()
    _write(tmp_path / "true", "x", a)
    _write(tmp_path / "true", "y", a)
    _write(tmp_path / "pred", "x", b)
    with pytest.raises(InputError, match=r"y\.npz"):
        M.evaluate_folder(tmp_path / "true", tmp_path / "pred")
    _write(tmp_path / "pred", "y", b[:5])
    with pytest.raises(InputError, match=r"y\.npz.*shape"):
        M.evaluate_folder(tmp_path / "true", tmp_path / "pred")


def test_mpq_without_dead():
    """ST labels ignore Dead by default: mPQ is also reported over the four other classes."""
    from stlib.metrics import CLASSES_NO_DEAD, aggregate, evaluate_pair, pannuke_mpq

    inst = np.zeros((40, 40), np.int32)
    inst[2:10, 2:10], inst[20:30, 20:30] = 1, 2
    typ = np.zeros_like(inst, dtype=np.uint8)
    typ[inst == 1], typ[inst == 2] = 1, 4  # a neoplastic and a dead nucleus
    pred_typ = typ.copy()
    pred_typ[inst == 2] = 2  # the dead one predicted inflammatory
    full = pannuke_mpq(inst, typ, inst, pred_typ)
    four = pannuke_mpq(inst, typ, inst, pred_typ, classes=CLASSES_NO_DEAD)
    assert full.mpq == pytest.approx(0.5) and four.mpq == pytest.approx(1.0)
    assert 4 not in four.pq and set(four.pq) == set(CLASSES_NO_DEAD)
    r = evaluate_pair(inst, inst, typ, pred_typ)
    assert r["mpq"] == pytest.approx(0.5) and r["mpq_no_dead"] == pytest.approx(1.0)
    agg = aggregate([r, r], tissues=["a", "b"])
    assert agg["mpq_no_dead"] == pytest.approx(1.0) and agg["mpq"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="classes"):
        pannuke_mpq(inst, typ, inst, pred_typ, classes=(9,))


def test_segmentation_errors_split_every_unmatched_nucleus():
    from stlib.metrics import error_summary, evaluate_pair, segmentation_errors

    t = np.zeros((40, 60), np.int32)
    p = np.zeros_like(t)
    t[2:10, 2:10] = 1
    p[2:10, 2:10] = 1  # matched, IoU 1
    t[2:10, 20:28], t[2:10, 29:37] = 2, 3
    p[2:10, 20:37] = 2  # one prediction over two true nuclei: merged (2 fn) and fp_merged
    t[20:30, 20:30] = 5  # missed
    p[20:30, 40:50] = 4  # extra
    t[32:40, 40:56] = 6
    p[32:40, 40:47], p[32:40, 48:56] = 5, 6  # two predictions in one true nucleus: split (2 fp) and fn_split
    t[32:40, 2:10] = 7
    ign = np.zeros(t.shape, bool)
    ign[32:40, 2:10] = True  # ignored in the prediction's map
    t[20:30, 2:10] = 8
    p[21:29, 3:9] = 7  # one prediction inside, IoU 48/80 = 0.6: matched
    t[12:18, 40:50] = 9
    p[12:18, 42:56] = 8  # IoU 48/96 = 0.5, not above, no other nucleus: outline (fn and fp)
    e = segmentation_errors(t, p, pred_ignore=ign)
    assert (e["tp"], e["fp"], e["fn"]) == (2, 5, 6)
    assert e["fn_missed"] == 1 and e["fn_ignored"] == 1 and e["fn_merged"] == 2 and e["fn_split"] == 1
    assert e["fn_outline"] == 1
    assert e["fp_extra"] == 1 and e["fp_split"] == 2 and e["fp_merged"] == 1 and e["fp_outline"] == 1
    assert e["matched_true_px"] == 64 + 80 and e["matched_pred_px"] == 64 + 48
    s = error_summary(e)
    assert s["bpq"] == pytest.approx(evaluate_pair(t, np.where(ign, 0, p))["bpq"])
    assert s["sq"] == pytest.approx((1 + 0.6) / 2)
    # each gain is the bPQ with that error's nuclei no longer counted as errors
    assert s["gain_missed"] == pytest.approx(2 / (2 + 2.5 + 2.5) * s["sq"] - s["bpq"])
    assert s["gain_merged_split"] == pytest.approx(2 / (2 + 1 + 1.5) * s["sq"] - s["bpq"])
    assert s["gain_sq"] == pytest.approx(s["bpq"] / s["sq"] - s["bpq"])
    # summed counts of two tiles give the pooled summary
    both = {k: 2 * v for k, v in e.items()}
    assert error_summary(both)["bpq"] == pytest.approx(s["bpq"])
