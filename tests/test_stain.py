"""Per-image stain normalisation (stlib.model.stain): the transform, training tiles, model files and
`stlib infer`; and the "peaks" marker mode of the post-processing (the classical baseline's rule)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from stlib.model import postproc as P
from stlib.model.stain import REF_MAX_CONC, REF_VECTORS, STAIN_NORMS, apply_stain, fit_stain, normalise_image
from stlib.utils import InputError

torch.set_num_threads(1)


def _tissue(seed: int = 0, shape: tuple[int, int] = (160, 160)) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration fields of one piece of 'tissue': dark disks (nuclei) on
    an eosin-rich stroma with a strip of glass; noise added. Concentrations only: the colours come
    from :func:`_render` with a given stain matrix."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    h = np.full(shape, 0.15)
    e = np.full(shape, 0.6)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(4, 9)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        h[m], e[m] = rng.uniform(1.0, 1.6), 0.2
    h[:, :20] = e[:, :20] = 0.0  # glass
    return h + rng.normal(0, 0.02, shape).clip(0), e + rng.normal(0, 0.02, shape).clip(0)


def _render(h: np.ndarray, e: np.ndarray, vectors: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """RGB by Beer-Lambert from two stain OD vectors (rows, any length) and per-stain scales."""
    od = (h * scale[0])[..., None] * vectors[0] + (e * scale[1])[..., None] * vectors[1]
    return np.clip(np.rint(255 * np.exp(-od)), 0, 255).astype(np.uint8)


# two stainings of the same tissue: other hues (neither is the reference) and other strengths
_STAIN_A = np.array([(0.55, 0.75, 0.37), (0.12, 0.90, 0.42)])
_STAIN_B = np.array([(0.75, 0.60, 0.28), (0.30, 0.95, 0.08)])


def test_normalisation_removes_a_change_of_stain_colour_and_strength():
    h, e = _tissue()
    a = _render(h, e, _STAIN_A / np.linalg.norm(_STAIN_A, axis=1, keepdims=True), (1.0, 1.0))
    b = _render(h, e, _STAIN_B / np.linalg.norm(_STAIN_B, axis=1, keepdims=True), (1.6, 0.6))
    raw = np.abs(a.astype(float) - b.astype(float)).mean()
    na, nb = normalise_image(a, "macenko"), normalise_image(b, "macenko")
    after = np.abs(na.astype(float) - nb.astype(float)).mean()
    assert raw > 20 and after < raw / 4, (raw, after)
    # the estimated vectors are the generating ones (H first), up to the quantile's bias
    st = fit_stain(b, "macenko")
    true = _STAIN_B / np.linalg.norm(_STAIN_B, axis=1, keepdims=True)
    assert (np.sum(st.matrix * true, axis=1) > 0.97).all(), st.matrix
    # "hed" (fixed vectors) removes a change of strength alone when the stains are the reference ones
    a2, c = (_render(h, e, REF_VECTORS, s) for s in ((1.0, 1.0), (1.6, 0.6)))
    raw2 = np.abs(a2.astype(float) - c.astype(float)).mean()
    after2 = np.abs(normalise_image(a2, "hed").astype(float) - normalise_image(c, "hed").astype(float)).mean()
    assert after2 < raw2 / 2, (raw2, after2)


def test_normalised_image_has_the_reference_stain_maxima():
    h, e = _tissue(1)
    img = _render(h, e, _STAIN_B / np.linalg.norm(_STAIN_B, axis=1, keepdims=True), (1.3, 0.8))
    out = normalise_image(img, "macenko")
    st = fit_stain(out, "hed")  # the output is made of the reference vectors
    np.testing.assert_allclose(st.max_conc, REF_MAX_CONC, rtol=0.08)
    np.testing.assert_allclose(fit_stain(out, "macenko").matrix, REF_VECTORS, atol=0.06)


def test_none_blank_and_bad_modes():
    h, e = _tissue(2)
    img = _render(h, e, _STAIN_A, (1.0, 1.0))
    assert fit_stain(img, "none") is None
    assert apply_stain(img, None) is img
    assert normalise_image(img, "none") is img
    white = np.full((64, 64, 3), 250, np.uint8)  # no tissue: the reference stats, no crash, stays light
    st = fit_stain(white, "macenko")
    np.testing.assert_array_equal(st.matrix, REF_VECTORS)
    assert normalise_image(white, "macenko").min() >= 240
    with pytest.raises(InputError, match="stain normalisation"):
        fit_stain(img, "reinhard")
    assert set(STAIN_NORMS) == {"none", "hed", "macenko"}


# --------------------------------------------------------------------------- training tiles
def test_training_tiles_are_normalised_per_sample(tmp_path):
    from stlib.train import TileData, TrainConfig
    from tests.test_train import make_store

    store = make_store(tmp_path / "tiles" / "st", n=8, tile=64)
    data = TileData([store])
    idx = np.arange(len(data))
    raw = data.get(idx)["images"]
    data.fit_stain(idx, "macenko")
    got = data.get(idx[:3])["images"]
    want = apply_stain(raw[:3], fit_stain(raw, "macenko"))  # one sample: stats of all its tiles
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, raw[:3])
    data.fit_stain(idx, "none")
    np.testing.assert_array_equal(data.get(idx)["images"], raw)
    with pytest.raises(InputError, match="stain_norm"):
        TrainConfig(stain_norm="reinhard")


def test_model_file_carries_the_stain_norm_and_old_configs_still_resume(tmp_path):
    from stlib.infer import load_inference_model
    from stlib.train import train
    from stlib.train.checkpoint import comparable_config
    from tests.test_train import make_store, tiny_config

    make_store(tmp_path / "tiles" / "st", n=8, tile=64)
    res = train(tiny_config(tmp_path, steps=2, val_every=2, ckpt_every=2, stain_norm="macenko", out_dir="m"))
    assert torch.load(res.model_path, weights_only=True)["config"]["stain_norm"] == "macenko"
    assert load_inference_model(res.model_path).stain_norm == "macenko"
    new = tiny_config(tmp_path).to_dict()
    old = {k: v for k, v in new.items() if k != "stain_norm"}  # written before the field existed
    assert comparable_config(old) == comparable_config(new)
    assert comparable_config({**new, "stain_norm": "hed"}) != comparable_config(old)


# --------------------------------------------------------------------------- stlib infer
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The same tiny network saved without the stain field (an older model file) and with it."""
    from stlib.constants import CLASS_NAMES
    from stlib.model.net import build_model

    torch.manual_seed(0)
    model = build_model({"encoder": "small"})
    d = tmp_path_factory.mktemp("stain_models")
    doc = {"config": {"encoder": "small", "n_types": 6}, "state_dict": model.state_dict(),
           "class_names": dict(CLASS_NAMES), "um_per_px": 0.25, "tile_px": 256, "stlib_version": "test"}
    torch.save(doc, d / "old.pt")
    torch.save({**doc, "config": {**doc["config"], "stain_norm": "macenko"}}, d / "macenko.pt")
    return d / "old.pt", d / "macenko.pt"


def test_infer_applies_the_model_files_stain_norm_and_old_files_behave_as_before(model_files, monkeypatch):
    from stlib.bench import synthetic_slide
    from stlib.infer import infer_image, load_inference_model, slide

    old, mac = model_files
    assert load_inference_model(old).stain_norm == "none"
    img, _, _ = synthetic_slide(256, seed=4)
    seen: list[np.ndarray] = []
    real_forward = slide.run_pipeline

    def spy(model, batches, *a, **k):
        def grab():
            for keys, imgs in batches:
                seen.append(imgs.copy())
                yield keys, imgs
        return real_forward(model, grab(), *a, **k)

    monkeypatch.setattr(slide, "run_pipeline", spy)
    kw = dict(um_per_px=0.25, device="cpu", workers=0, tissue_detection=False, tile_px=256, overlap=0)
    r_old = infer_image(old, img, **kw)
    tiles_old = np.concatenate(seen)
    np.testing.assert_array_equal(tiles_old[0], img)  # an older model file: the image as it is
    assert r_old.stats["stain_norm"] == "none"
    seen.clear()
    r_mac = infer_image(mac, img, **kw)
    np.testing.assert_array_equal(np.concatenate(seen)[0], normalise_image(img, "macenko"))
    assert r_mac.stats["stain_norm"] == "macenko"
    # the same network, other input: the old file's result did not change by the new field's existence
    monkeypatch.setattr(slide, "run_pipeline", real_forward)
    np.testing.assert_array_equal(infer_image(old, img, **kw).inst, r_old.inst)


# --------------------------------------------------------------------------- "peaks" marker mode
def _disks(shape, centres, radii):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return out


def test_peaks_mode_is_the_classical_marker_rule_on_the_np_mask():
    """Two overlapping disks: markers at distance-transform maxima >= marker_dist apart split them;
    a marker distance larger than the centres' distance keeps one nucleus; flat HV maps unused."""
    truth = _disks((48, 70), [(24, 24), (24, 42)], [10, 10])
    blob = (truth > 0).astype(float)
    flat = np.zeros((2, *truth.shape))
    split = P.hovernet_postprocess(blob, flat, mode="peaks", marker_dist=8, min_size=10)[0]
    merged = P.hovernet_postprocess(blob, flat, mode="peaks", marker_dist=30, min_size=10)[0]
    assert split.max() == 2 and merged.max() == 1
    for k in (1, 2):  # each found nucleus is mostly one true disk
        m = split == k
        assert np.bincount(truth[m]).max() / m.sum() > 0.85
    with pytest.raises(ValueError, match="marker_dist"):
        P.hovernet_postprocess(blob, flat, mode="peaks", marker_dist=0.5)


def test_peaks_mode_travels_in_the_model_file(model_files, tmp_path):
    from stlib.train.checkpoint import write_postproc

    p = tmp_path / "m.pt"
    shutil.copy(model_files[0], p)
    write_postproc(p, {"mode": "peaks", "marker_dist": 12, "np_thresh": 0.3, "min_size": 50})
    from stlib.infer import load_inference_model

    assert load_inference_model(p).postproc == {"mode": "peaks", "marker_dist": 12.0, "np_thresh": 0.3,
                                                "min_size": 50}
