"""Tests of stlib.infer: tiles -> network -> post-processing -> seams -> outputs.

Most tests use an "oracle" network that reads the nuclei off the synthetic image (dark
pixels, class encoded in the red channel) and returns HoVer-Net outputs of exactly those
nuclei, so the expected nuclei are known and every error of tiling, resampling or seam
handling shows up as a missing, extra or displaced nucleus.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from stlib.constants import CLASS_COLORS, CLASS_NAMES
from stlib.bench import synthetic_slide
from stlib.infer import InferenceResult, infer_image, predict_tiles, segment_tiles, tissue_mask, write_outputs
from stlib.utils import InputError

torch.set_num_threads(1)


def _hv(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net distance maps, written independently of stlib.labels.masks."""
    hv = np.zeros((2, *inst.shape), np.float32)
    for i, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        m = inst[sl] == i
        rr, cc = np.nonzero(m)
        for ch, v in ((0, cc - cc.mean()), (1, rr - rr.mean())):
            v = v.astype(np.float32)
            if (v < 0).any():
                v[v < 0] /= -v[v < 0].min()
            if (v > 0).any():
                v[v > 0] /= v[v > 0].max()
            hv[ch][sl][m] = v
    return hv


class Oracle(torch.nn.Module):
    """Nucleus = green < 105 (pink background has ~170, nuclei 40); class = (red - 70) / 10."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = (x.detach().float().cpu().numpy() * 255.0).transpose(0, 2, 3, 1)
        nps, hvs, nts = [], [], []
        for img in a:
            inst, _ = ndi.label(img[..., 1] < 105)
            cls = np.clip(np.rint((img[..., 0] - 70) / 10), 1, 5).astype(int) * (inst > 0)
            fg = (inst > 0).astype(np.float32) * 20 - 10
            nps.append(np.stack([-fg, fg]))
            hvs.append(_hv(inst))
            nts.append(np.stack([(cls == c).astype(np.float32) * 20 for c in range(6)]))
        return {k: torch.from_numpy(np.stack(v)).to(x.device) for k, v in (("np", nps), ("hv", hvs), ("nt", nts))}


def _truth(inst: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids (x, y) in pixel-edge coordinates (centre = index + 0.5), areas (px), classes."""
    ids = np.arange(1, inst.max() + 1)
    cy, cx = np.asarray(ndi.center_of_mass(inst > 0, inst, ids)).T
    area = ndi.sum(inst > 0, inst, ids)
    return np.stack([cx + 0.5, cy + 0.5], 1), area, classes[1:]


def _match(found_xy: np.ndarray, true_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each true nucleus: index of and distance to the nearest found one."""
    d = np.hypot(*(true_xy[:, None, :] - found_xy[None, :, :]).transpose(2, 0, 1))
    return d.argmin(1), d.min(1)


def _crossing(inst: np.ndarray, origins: list[tuple[int, int]], tile: int) -> int:
    """Nuclei that are cut by at least one tile border (i.e. appear cut in some tile)."""
    n = 0
    for sl in ndi.find_objects(inst):
        if sl is None:
            continue
        for r, c in origins:
            inside_r = r < sl[0].stop and sl[0].start < r + tile
            inside_c = c < sl[1].stop and sl[1].start < c + tile
            cut = sl[0].start < r or sl[0].stop > r + tile or sl[1].start < c or sl[1].stop > c + tile
            if inside_r and inside_c and cut:
                n += 1
                break
    return n


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    from stlib.model.net import build_model

    torch.manual_seed(0)
    model = build_model({"encoder": "small"})
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"config": {"encoder": "small", "n_types": 6}, "state_dict": model.state_dict(),
                "class_names": dict(CLASS_NAMES), "um_per_px": 0.25, "tile_px": 256, "stlib_version": "test"}, path)
    return path


@pytest.fixture(scope="module")
def seam_case():
    """512 x 512 at 0.25 µm/px, 9 overlapping 256 px tiles, oracle network."""
    img, inst, classes = synthetic_slide(512, seed=3, background_fraction=0.0)
    res = infer_image(Oracle(), img, um_per_px=0.25, model_um_per_px=0.25, tile_px=256, overlap=64,
                      device="cpu", batch_size=4, workers=1, tissue_detection=False)
    return img, inst, classes, res


# ----------------------------------------------------------------------------- network
def test_predict_tiles_shapes_and_batching():
    from stlib.model.net import build_model

    torch.manual_seed(0)
    model = build_model({"encoder": "small"})
    imgs = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    out = predict_tiles(model, imgs, device="cpu", batch_size=2)
    assert out["np_prob"].shape == (3, 64, 96)
    assert out["hv"].shape == (3, 2, 64, 96)
    assert out["tp_prob"].shape == (3, 6, 64, 96)
    assert out["np_prob"].min() >= 0 and out["np_prob"].max() <= 1
    np.testing.assert_allclose(out["tp_prob"].sum(1), 1.0, atol=1e-5)
    assert not model.training
    one = predict_tiles(model, imgs, device="cpu", batch_size=3)
    np.testing.assert_allclose(one["hv"], out["hv"], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        predict_tiles(model, imgs.astype(np.float32), device="cpu")


def test_segment_tiles_oracle_and_workers():
    img, inst, classes = synthetic_slide(256, seed=1, background_fraction=0.0)
    tiles = np.stack([img[:128, :128], img[128:, 128:]])
    a = segment_tiles(Oracle(), tiles, device="cpu", batch_size=1, workers=0)
    b = segment_tiles(Oracle(), tiles, device="cpu", batch_size=1, workers=2)
    for (ia, ta), (ib, tb), sub in zip(a, b, (inst[:128, :128], inst[128:, 128:])):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ta, tb)
        assert ia.max() == len(np.unique(sub)) - 1
        assert ((ia > 0) == (sub > 0)).mean() > 0.995


# ----------------------------------------------------------------------------- whole image
def test_seams_no_duplicates_and_exact_nuclei(seam_case):
    img, inst, classes, res = seam_case
    from stlib.model.postproc import tile_origins

    origins = tile_origins((512, 512), 256, 64)
    assert len(origins) == 9 and res.stats["n_tiles_processed"] == 9
    assert _crossing(inst, origins, 256) >= 10  # the seams really cut nuclei
    true_xy, true_area, true_cls = _truth(inst, classes)
    found = res.nuclei[["x", "y"]].to_numpy()
    assert len(res) == len(true_xy)  # no duplicate, no loss
    idx, dist = _match(found, true_xy)
    assert len(set(idx.tolist())) == len(true_xy)  # one-to-one
    assert dist.max() < 0.05
    np.testing.assert_array_equal(res.nuclei["class"].to_numpy()[idx], true_cls)
    np.testing.assert_allclose(res.nuclei["area_um2"].to_numpy()[idx], true_area * 0.0625)
    # the stitched map reproduces the truth, ids = table ids
    assert res.inst.shape == (512, 512)
    np.testing.assert_array_equal(res.inst > 0, inst > 0)
    assert set(np.unique(res.inst)[1:]) == set(res.nuclei["id"])
    np.testing.assert_array_equal(res.type, classes[inst])
    assert (res.nuclei["probability"] > 0.99).all()


def test_segmentation_only_gives_the_instances_of_a_classifying_run():
    """classify=False skips the NT decoder of a HoVerNet: the same instances, every nucleus unclassified."""
    from stlib.model.net import HoVerNet

    torch.manual_seed(1)
    net = HoVerNet(encoder="small")
    with torch.no_grad():  # a head that finds blobs in the random image: bias the NP logits towards nucleus
        net.decoders["np"].head.bias.copy_(torch.tensor([0.0, 0.3]))
    img, _, _ = synthetic_slide(300, seed=6, background_fraction=0.0)
    kw = dict(um_per_px=0.25, model_um_per_px=0.25, device="cpu", workers=0, tissue_detection=False,
              postproc_kwargs={"np_thresh": 0.5, "min_size": 5})
    full = infer_image(net, img, **kw)
    seg = infer_image(net, img, classify=False, **kw)
    assert len(full) > 0 and (full.nuclei["class"] != 255).any()
    np.testing.assert_array_equal(seg.inst, full.inst)
    assert (seg.nuclei["class"] == 255).all() and seg.nuclei["probability"].isna().all()
    assert seg.stats["classify"] is False and full.stats["classify"] is True
    with torch.no_grad():  # the NT decoder is not run at all
        assert set(net.eval()(torch.zeros(1, 3, 64, 64), heads=("np", "hv"))) == {"np", "hv"}


class WhiteIsNucleus(torch.nn.Module):
    """Calls every near-white pixel one nucleus: the white padding past an image's border included."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fg = (x.min(dim=1).values > 0.98).float() * 20 - 10
        b, _, h, w = x.shape
        nt = torch.zeros(b, 6, h, w)
        nt[:, 1] = 20
        return {"np": torch.stack([-fg, fg], 1), "hv": torch.zeros(b, 2, h, w), "nt": nt}


class DiscAt(torch.nn.Module):
    """One round nucleus of radius ``r`` centred on tile pixel ``(row, col)``, whatever the input."""

    def __init__(self, row: int, col: int, r: int) -> None:
        super().__init__()
        self.rc = (row, col, r)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        row, col, r = self.rc
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        fg = (((yy - row) ** 2 + (xx - col) ** 2) <= r * r).float().expand(b, h, w) * 20 - 10
        nt = torch.zeros(b, 6, h, w)
        nt[:, 1] = 20
        return {"np": torch.stack([-fg, fg], 1), "hv": torch.zeros(b, 2, h, w), "nt": nt}


def test_an_image_that_fits_runs_as_one_tile_and_finds_the_nuclei_of_the_tiled_run():
    """Without tile_px, an image up to whole_image_px model px runs as one (padded, square) tile:
    the same nuclei as 512 px tiles with seams, nothing from the padding, outlines inside the image."""
    img, inst, classes = synthetic_slide(900, seed=5, background_fraction=0.0)
    img, inst = img[:600], inst[:600]
    kw = dict(um_per_px=0.25, model_um_per_px=0.25, device="cpu", workers=0, tissue_detection=False)
    whole = infer_image(Oracle(), img, **kw)
    tiled = infer_image(Oracle(), img, whole_image_px=0, **kw)
    assert whole.stats["n_tiles"] == 1 and whole.stats["tile_px"] == 900
    assert tiled.stats["n_tiles"] == 6 and tiled.stats["tile_px"] == 512
    assert len(whole) == len(tiled) == len(np.unique(inst)) - 1
    idx, dist = _match(whole.nuclei[["x", "y"]].to_numpy(), tiled.nuclei[["x", "y"]].to_numpy())
    assert len(set(idx.tolist())) == len(tiled) and dist.max() < 0.05
    np.testing.assert_array_equal(whole.inst > 0, inst > 0)
    # a network that sees a nucleus in the white padding below the image: dropped
    pad = infer_image(WhiteIsNucleus(), img, **kw)
    assert pad.stats["n_tiles"] == 1 and len(pad) == 0 and pad.inst.max() == 0
    # one nucleus straddling the bottom border: kept (centroid inside), outline clipped to the image
    pad2 = infer_image(DiscAt(595, 430, 20), img, **kw)
    assert len(pad2) == 1
    xs, ys = pad2.polygons[0][:, 0], pad2.polygons[0][:, 1]
    assert ys.max() <= 600 and ys.min() >= 574 and xs.min() >= 409 and xs.max() <= 451
    # larger than whole_image_px: tiled as before
    assert infer_image(Oracle(), img, whole_image_px=800, **kw).stats["n_tiles"] == 6


def test_resampling_half_resolution_input():
    """0.5 µm/px input, 0.25 µm/px model: tiles are upsampled 2x, outputs in input pixels."""
    img, inst, classes = synthetic_slide(256, seed=4, spacing=20, background_fraction=0.0)
    res = infer_image(Oracle(), img, um_per_px=0.5, model_um_per_px=0.25, tile_px=256, overlap=64,
                      device="cpu", workers=0, tissue_detection=False)
    assert res.stats["n_tiles"] == 9 and res.stats["scale_level0_per_model_px"] == 0.5
    true_xy, true_area, true_cls = _truth(inst, classes)
    assert len(res) == len(true_xy)
    idx, dist = _match(res.nuclei[["x", "y"]].to_numpy(), true_xy)
    assert len(set(idx.tolist())) == len(true_xy)
    assert dist.max() < 0.5  # level-0 (0.5 µm) pixels
    area = res.nuclei["area_um2"].to_numpy()[idx]
    np.testing.assert_allclose(area, true_area * 0.25, rtol=0.2)
    np.testing.assert_array_equal(res.nuclei["class"].to_numpy()[idx], true_cls)
    assert res.inst.shape == (256, 256)
    assert ((res.inst > 0) == (inst > 0)).mean() > 0.97
    xs = np.concatenate([p[:, 0] for p in res.polygons])
    assert xs.max() <= 256 and xs.min() >= 0


def test_pyramidal_tiff_uses_coarser_level(tmp_path):
    """1024 px at 0.125 µm/px; the model at 0.25 reads pyramid level 1 (no resampling)."""
    from stlib.io.wsi import write_pyramidal_tiff

    img, inst, classes = synthetic_slide(1024, seed=5, spacing=80, background_fraction=0.0)
    path = write_pyramidal_tiff(tmp_path / "slide.tif", img, um_per_px=0.125, compression="zlib", min_size=512)
    res = infer_image(Oracle(), path, model_um_per_px=0.25, tile_px=256, overlap=64, device="cpu", workers=0)
    assert res.um_per_px == pytest.approx(0.125) and res.stats["level"] == 1
    true_xy, _, true_cls = _truth(inst, classes)
    assert len(res) == len(true_xy)
    idx, dist = _match(res.nuclei[["x", "y"]].to_numpy(), true_xy)
    assert len(set(idx.tolist())) == len(true_xy)
    assert dist.max() < 1.5  # level-0 px; the level-1 averaging moves edges by < 1 px
    np.testing.assert_array_equal(res.nuclei["class"].to_numpy()[idx], true_cls)


def test_tissue_detection_skips_glass():
    img, inst, classes = synthetic_slide((256, 768), seed=6, background_fraction=0.4)
    res = infer_image(Oracle(), img, um_per_px=0.25, model_um_per_px=0.25, tile_px=256, overlap=64,
                      device="cpu", workers=0)
    assert res.stats["n_tiles"] == 4 and res.stats["n_tiles_skipped"] == 1
    assert len(res) == inst.max()
    mask = tissue_mask(img)
    assert mask[:, :400].mean() > 0.99 and mask[:, 480:].mean() < 0.01


def test_tissue_mask_keeps_tile_without_background():
    img, _, _ = synthetic_slide(256, seed=7, background_fraction=0.0)
    assert tissue_mask(img).mean() > 0.99


# ----------------------------------------------------------------------------- errors
def test_missing_um_per_px(tmp_path):
    from PIL import Image

    img, _, _ = synthetic_slide(128, seed=0)
    Image.fromarray(img).save(tmp_path / "tile.png")
    with pytest.raises(InputError, match="--um-per-px") as e:
        infer_image(Oracle(), tmp_path / "tile.png", model_um_per_px=0.25, device="cpu", workers=0)
    assert "tile.png" in str(e.value)
    with pytest.raises(InputError, match="resolution"):
        infer_image(Oracle(), tmp_path / "tile.png", um_per_px=0.25, device="cpu", workers=0)


def test_unreadable_image(tmp_path, tiny_model_file):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is not a TIFF at all" * 10)
    with pytest.raises(InputError, match="broken.tif"):
        infer_image(tiny_model_file, bad, um_per_px=0.25, device="cpu", workers=0)
    with pytest.raises(InputError, match="not found"):
        infer_image(tiny_model_file, tmp_path / "missing.png", um_per_px=0.25, device="cpu", workers=0)


def test_class_set_mismatch(tmp_path, tiny_model_file):
    ck = torch.load(tiny_model_file, weights_only=True)
    ck["class_names"] = {0: "Background", 1: "Tumour", 2: "Stroma", 3: "Immune", 4: "Necrosis", 5: "Other"}
    other = tmp_path / "other_classes.pt"
    torch.save(ck, other)
    img, _, _ = synthetic_slide(64, seed=0)
    with pytest.raises(InputError, match="classes") as e:
        infer_image(other, img, um_per_px=0.25, device="cpu", workers=0)
    assert "other_classes.pt" in str(e.value)


# ----------------------------------------------------------------------------- outputs
def test_outputs_geojson_csv_npz(seam_case, tmp_path):
    import pandas as pd
    from shapely.geometry import shape

    _, _, _, res = seam_case
    paths = write_outputs(res, tmp_path / "out", "seam")
    gj = json.loads(paths["geojson"].read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(res)
    names = {v: k for k, v in CLASS_NAMES.items()}
    for f, (_, row) in zip(gj["features"], res.nuclei.iterrows()):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        geom = shape(f["geometry"])
        assert geom.is_valid and geom.area > 0
        assert geom.contains(geom.centroid)
        props = f["properties"]
        assert props["objectType"] == "detection"
        cid = names[props["classification"]["name"]]
        assert cid == row["class"]
        assert props["classification"]["color"] == list(CLASS_COLORS[cid])
        assert set(props["measurements"]) == {"id", "probability", "area_um2"}
        # polygon area (level-0 px at 0.25 µm/px) agrees with the pixel area
        assert geom.area * 0.0625 == pytest.approx(row["area_um2"], rel=0.2)
        assert abs(geom.centroid.x - row["x"]) < 1.0 and abs(geom.centroid.y - row["y"]) < 1.0
    table = pd.read_csv(paths["csv"])
    assert list(table.columns) == ["id", "x", "y", "area_um2", "class", "class_name", "probability"]
    assert len(table) == len(res)
    with np.load(paths["npz"]) as z:
        np.testing.assert_array_equal(z["inst"], res.inst)
        np.testing.assert_array_equal(z["type"], res.type)
    from PIL import Image

    ov = np.asarray(Image.open(paths["overlay"]))
    assert ov.shape == (512, 512, 3)
    assert (np.all(ov == CLASS_COLORS[1], axis=-1)).any()  # contours drawn in class colours
    assert not list((tmp_path / "out").glob(".*tmp*"))  # nothing half-written left


def test_empty_result_writes_valid_files(tmp_path):
    img = np.full((128, 128, 3), 245, np.uint8)
    res = infer_image(Oracle(), img, um_per_px=0.25, model_um_per_px=0.25, device="cpu", workers=0)
    assert isinstance(res, InferenceResult) and len(res) == 0 and res.stats["n_tiles_skipped"] == 1
    paths = write_outputs(res, tmp_path, "blank")
    assert json.loads(paths["geojson"].read_text())["features"] == []


def test_cli_end_to_end(tmp_path, tiny_model_file, capsys):
    from PIL import Image

    from stlib.cli import main

    img, _, _ = synthetic_slide(256, seed=2)
    Image.fromarray(img).save(tmp_path / "he.png")
    out = tmp_path / "out"
    rc = main(["infer", "--model", str(tiny_model_file), "--input", str(tmp_path / "he.png"),
               "--um-per-px", "0.25", "--out", str(out), "--device", "cpu", "--workers", "0", "--batch-size", "2"])
    assert rc == 0
    for f in ("he.geojson", "he_nuclei.csv", "he.npz", "he_overlay.png", "he_summary.json"):
        assert (out / f).is_file(), f
    gj = json.loads((out / "he.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    summary = json.loads((out / "he_summary.json").read_text())
    assert summary["model_um_per_px"] == 0.25 and summary["n_tiles"] == 1
    assert "nuclei" in capsys.readouterr().out
    rc = main(["infer", "--model", str(tiny_model_file), "--input", str(tmp_path / "he.png"), "--out", str(out)])
    assert rc == 1
    assert "--um-per-px" in capsys.readouterr().err


def test_cli_on_a_real_he_image_writes_valid_geojson(tiny_model_file, tmp_path):
    """A real H&E crop (stardist's bundled test image, 40x-like) through the CLI: the GeoJSON is
    a valid FeatureCollection with valid polygons inside the image, whatever the (tiny) model finds."""
    from stardist import data
    from PIL import Image
    from shapely.geometry import box, shape

    img = data.test_image_he_2d()
    Image.fromarray(img).save(tmp_path / "he.png")
    from stlib.infer import cli_main
    assert cli_main(["--model", str(tiny_model_file), "--input", str(tmp_path / "he.png"), "--um-per-px", "0.5",
                     "--out", str(tmp_path / "out")]) == 0
    gj = json.loads((tmp_path / "out" / "he.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    frame = box(0, 0, img.shape[1], img.shape[0]).buffer(1)
    for f in gj["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and frame.contains(g)
        assert f["properties"]["classification"]["name"]


def test_postprocessing_in_processes_gives_the_same_nuclei(seam_case):
    """``postproc_processes=True`` (for GPUs: more cores than the GIL allows threads) changes
    where post-processing runs, not what it finds."""
    img, inst, classes, res = seam_case
    res_p = infer_image(Oracle(), img, um_per_px=0.25, model_um_per_px=0.25, tile_px=256, overlap=64,
                        tissue_detection=False, workers=2, postproc_processes=True)
    assert res_p.stats["n_nuclei"] == res.stats["n_nuclei"]
    np.testing.assert_array_equal(res_p.nuclei.to_numpy(), res.nuclei.to_numpy())
    np.testing.assert_array_equal(res_p.inst, res.inst)


def test_postproc_settings_travel_with_the_model_and_cli_options_win(tmp_path, tiny_model_file, monkeypatch):
    """A model file's stored thresholds (write_postproc) reach hovernet_postprocess through
    `stlib infer`; --np-thresh / --marker-thresh / --min-size override them."""
    import shutil

    from PIL import Image

    from stlib.cli import main
    from stlib.model import postproc
    from stlib.train.checkpoint import write_postproc

    model = tmp_path / "model.pt"
    shutil.copy(tiny_model_file, model)
    write_postproc(model, {"np_thresh": 0.35, "marker_thresh": 0.65, "min_size": 25})
    write_postproc(model, {"np_thresh": 0.35, "marker_thresh": 0.65, "min_size": 25})  # idempotent
    assert torch.load(model, weights_only=True)["postproc"] == {"np_thresh": 0.35, "marker_thresh": 0.65,
                                                                 "min_size": 25}
    with pytest.raises(InputError, match="unknown post-processing"):
        write_postproc(model, {"np_threshold": 0.3})
    seen: list[dict] = []
    real = postproc.hovernet_postprocess

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(postproc, "hovernet_postprocess", spy)
    img, _, _ = synthetic_slide(256, seed=2)
    Image.fromarray(img).save(tmp_path / "he.png")
    base = ["infer", "--model", str(model), "--input", str(tmp_path / "he.png"), "--um-per-px", "0.25",
            "--device", "cpu", "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert seen and all(s == {"np_thresh": 0.35, "marker_thresh": 0.65, "min_size": 25} for s in seen)
    assert json.loads((tmp_path / "a" / "he_summary.json").read_text())["postproc"]["marker_thresh"] == 0.65
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "b"), "--np-thresh", "0.6", "--min-size", "5"]) == 0
    assert seen and all(s == {"np_thresh": 0.6, "marker_thresh": 0.65, "min_size": 5} for s in seen)
    seen.clear()  # a model without stored settings: HoVer-Net's defaults (no keyword passed)
    assert main(["infer", "--model", str(tiny_model_file), "--input", str(tmp_path / "he.png"), "--um-per-px",
                 "0.25", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "c")]) == 0
    assert seen and all(s == {} for s in seen)
    # the marker mode travels the same way, and --postproc-mode / --marker-h / --hv-weight override it
    write_postproc(model, {"np_thresh": 0.35, "min_size": 25, "mode": "distance", "marker_h": 1.5})
    assert torch.load(model, weights_only=True)["postproc"]["mode"] == "distance"
    with pytest.raises(InputError, match="unknown post-processing mode"):
        write_postproc(model, {"mode": "otsu"})
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "d")]) == 0
    assert seen and all(s == {"np_thresh": 0.35, "min_size": 25, "mode": "distance", "marker_h": 1.5} for s in seen)
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "e"), "--postproc-mode", "blend", "--hv-weight", "0.7",
                 "--marker-h", "3"]) == 0
    assert seen and all(s == {"np_thresh": 0.35, "min_size": 25, "mode": "blend", "marker_h": 3.0, "hv_weight": 0.7}
                        for s in seen)
    write_postproc(model, {})
    assert "postproc" not in torch.load(model, weights_only=True)
