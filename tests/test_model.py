"""Tests of stlib.model.net and stlib.model.losses (tiny tensors, CPU, one thread)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from stlib.constants import CLASS_NAMES, IGNORE
from stlib.model.losses import LossWeights, boundary_band, hovernet_loss, hv_gradients, sobel_kernels
from stlib.model.net import (HoVerNet, NetConfig, build_model, count_params, load_model, model_flops,
                             to_input)
from stlib.utils import InputError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small() -> HoVerNet:
    torch.manual_seed(0)
    return HoVerNet("small")


# ----------------------------------------------------------------------------- net


def test_small_shapes_and_size(small):
    assert count_params(small) < 1_000_000
    out = small(torch.rand(2, 3, 70, 45))  # not a multiple of 32: padded inside, cropped back
    assert set(out) == {"np", "hv", "nt"}
    assert out["np"].shape == (2, 2, 70, 45)
    assert out["hv"].shape == (2, 2, 70, 45)
    assert out["nt"].shape == (2, len(CLASS_NAMES), 70, 45)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        small(torch.rand(2, 1, 32, 32))


def test_resnet50_encoder_is_resnet50_sized():
    m = HoVerNet("resnet50")
    n_enc = count_params(m.encoder)
    assert 23_000_000 < n_enc < 26_000_000  # ResNet-50 without its classifier: 23.5M
    assert 30_000_000 < count_params(m) < 50_000_000  # HoVer-Net itself has ~37M


def test_model_flops_scale_with_area(small):
    f32, f64 = model_flops(small, 32), model_flops(small, 64)
    assert f32 > 1e6
    assert 3.8 < f64 / f32 < 4.2
    assert small.training  # restored


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="stlib.model"):
        HoVerNet("small")
    assert "random init" in caplog.text


def test_pretrained_encoder_loaded_from_local_file(tmp_path, small):
    path = tmp_path / "enc.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in small.encoder.state_dict().items()}}, path)
    torch.manual_seed(123)
    m = build_model(NetConfig(encoder="small", pretrained_path=str(path)))
    for k, v in small.encoder.state_dict().items():
        assert torch.equal(m.encoder.state_dict()[k], v), k
    bad = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="no tensor"):
        HoVerNet("small", pretrained_path=bad)
    with pytest.raises(InputError, match="not found"):
        HoVerNet("small", pretrained_path=tmp_path / "missing.pt")


def test_load_model_round_trip_and_class_check(tmp_path, small):
    small.eval()
    path = tmp_path / "model.pt"
    cfg = {"encoder": "small", "n_types": 6, "weights": ""}
    torch.save({"config": cfg, "state_dict": small.state_dict(), "class_names": dict(CLASS_NAMES),
                "um_per_px": 0.25, "tile_px": 64, "stlib_version": "0"}, path)
    m, c = load_model(path, map_location="cpu")
    assert c["encoder"] == "small" and not m.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x)["nt"], small(x)["nt"])
    other = {**CLASS_NAMES, 4: "Necrotic"}
    with pytest.raises(InputError, match="trained for classes"):
        load_model(path, map_location="cpu", class_names=other)
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nope.pt")
    small.train()


def test_to_input():
    x = torch.full((1, 4, 5, 3), 255, dtype=torch.uint8)
    y = to_input(x)
    assert y.shape == (1, 3, 4, 5) and float(y.max()) == 1.0


# ----------------------------------------------------------------------------- losses


def _targets(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = torch.zeros(b, h, w, dtype=torch.long)
    inst[:, 3:8, 3:9] = 1
    inst[:, 10:14, 8:13] = 2
    typ = torch.zeros(b, h, w, dtype=torch.uint8)
    typ[inst == 1] = 2
    typ[inst == 2] = 5
    hv = (torch.rand(b, 2, h, w, generator=g) * 2 - 1) * (inst > 0)[:, None]
    conf = torch.where(inst > 0, 200, 0).to(torch.uint8)
    return inst, typ, hv, conf


def _outputs(b=2, h=16, w=16, c=6, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {"np": torch.randn(b, 2, h, w, generator=g), "hv": torch.randn(b, 2, h, w, generator=g),
           "nt": torch.randn(b, c, h, w, generator=g)}
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def test_loss_known_values_zero_logits():
    b, h, w = 1, 8, 8
    inst = torch.zeros(b, h, w, dtype=torch.long)
    inst[0, 2:4, 2:6] = 1  # 8 nucleus pixels of 64
    typ = (inst > 0).to(torch.uint8) * 3
    hv = torch.zeros(b, 2, h, w)
    hv[0, 0][inst[0] > 0] = 0.5
    out = {"np": torch.zeros(b, 2, h, w), "hv": torch.zeros(b, 2, h, w), "nt": torch.zeros(b, 6, h, w)}
    _, t = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    assert math.isclose(float(t["np_ce"]), math.log(2), rel_tol=1e-5)
    assert math.isclose(float(t["nt_ce"]), math.log(6), rel_tol=1e-5)
    # HV MSE: 8 pixels of channel 0 with error 0.25 over 2*64 values
    assert math.isclose(float(t["hv_mse"]), 8 * 0.25 / 128, rel_tol=1e-5)
    eps = 1e-3

    def dice(p, n_true, n):  # constant prob p, n_true target pixels among n
        return 1 - (2 * p * n_true + eps) / (p * n + n_true + eps)

    assert math.isclose(float(t["np_dice"]), dice(0.5, 56, 64) + dice(0.5, 8, 64), rel_tol=1e-5)
    expect_nt = dice(1 / 6, 56, 64) + dice(1 / 6, 8, 64) + 4 * dice(1 / 6, 0, 64)
    assert math.isclose(float(t["nt_dice"]), expect_nt, rel_tol=1e-5)
    # a perfect prediction has (near) zero loss on every term
    perfect = {"np": F.one_hot((inst > 0).long(), 2).permute(0, 3, 1, 2).float() * 40,
               "hv": hv.clone(), "nt": F.one_hot(typ.long(), 6).permute(0, 3, 1, 2).float() * 40}
    total, t = hovernet_loss(perfect, inst=inst, hv=hv, type_map=typ)
    assert float(t["hv_mse"]) == 0 and float(t["hv_msge"]) == 0
    assert float(total) < 1e-3


def test_loss_weights_scale_terms():
    inst, typ, hv, conf = _targets()
    out = _outputs()
    total, t = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    w = LossWeights(np_ce=2.0, hv_msge=0.0, nt_dice=0.5)
    total_w, _ = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, weights=w)
    expect = float(total) + float(t["np_ce"]) - float(t["hv_msge"]) - 0.5 * float(t["nt_dice"])
    assert math.isclose(float(total_w), expect, rel_tol=1e-5)


def test_ignored_pixels_do_not_change_the_loss():
    inst, typ, hv, conf = _targets()
    ignore = torch.zeros_like(typ)
    ignore[:, :, 10:] = 1  # cuts through nucleus 2: its left part still counts
    out = _outputs()
    total, terms = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, ignore=ignore, conf=conf)
    g = torch.Generator().manual_seed(7)
    m = ignore.bool()
    out2 = {k: torch.where(m[:, None], torch.randn(v.shape, generator=g) * 10, v) for k, v in out.items()}
    inst2 = torch.where(m, torch.full_like(inst, 9), inst)  # targets changed there too
    hv2 = torch.where(m[:, None], torch.ones_like(hv), hv)
    total2, terms2 = hovernet_loss(out2, inst=inst2, hv=hv2, type_map=typ, ignore=ignore, conf=conf)
    for k in terms:
        assert torch.allclose(terms[k], terms2[k], atol=1e-6), k
    # and the same perturbation without the ignore mask does change every term
    _, terms3 = hovernet_loss(out2, inst=inst2, hv=hv2, type_map=typ, conf=conf)
    _, terms4 = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, conf=conf)
    for k in terms:
        assert not torch.allclose(terms3[k], terms4[k]), k


def test_nt_ignores_unknown_class_pixels_but_np_hv_use_them():
    inst, typ, hv, conf = _targets()
    typ[inst == 2] = IGNORE
    out = _outputs()
    _, t1 = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    m = (inst == 2)[:, None]
    out2 = {k: torch.where(m, v + 3.0 * torch.sign(torch.randn_like(v)), v) for k, v in out.items()}
    _, t2 = hovernet_loss(out2, inst=inst, hv=hv, type_map=typ)
    assert torch.allclose(t1["nt_ce"], t2["nt_ce"]) and torch.allclose(t1["nt_dice"], t2["nt_dice"])
    for k in ("np_ce", "np_dice", "hv_mse", "hv_msge"):
        assert not torch.allclose(t1[k], t2[k]), k


def test_confidence_weighting_of_nt():
    inst, typ, hv, conf = _targets()
    out = _outputs()
    w = LossWeights(nt_confidence=True)
    _, plain = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    full = torch.where(inst > 0, 255, 0).to(torch.uint8)
    _, t_full = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, conf=full, weights=w)
    assert torch.allclose(plain["nt_ce"], t_full["nt_ce"]) and torch.allclose(plain["nt_dice"], t_full["nt_dice"])
    # confidence 0 on nucleus 2 == nucleus 2 of unknown class
    zero2 = torch.where(inst == 2, 0, full).to(torch.uint8)
    _, t_zero = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, conf=zero2, weights=w)
    typ_u = torch.where(inst == 2, torch.full_like(typ, IGNORE), typ)
    _, t_unk = hovernet_loss(out, inst=inst, hv=hv, type_map=typ_u)
    assert torch.allclose(t_zero["nt_ce"], t_unk["nt_ce"]) and torch.allclose(t_zero["nt_dice"], t_unk["nt_dice"])
    # half confidence: a weighted mean of per-pixel CE, by hand
    half = torch.where(inst == 2, 0.5, torch.where(inst > 0, 1.0, 0.0))
    _, t_half = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, conf=half, weights=w)
    ce = F.cross_entropy(out["nt"], typ.long(), reduction="none")
    wpix = torch.where(inst == 2, 0.5, 1.0)
    assert torch.allclose(t_half["nt_ce"], (ce * wpix).sum() / wpix.sum(), atol=1e-6)
    # NP/HV never depend on confidence
    for k in ("np_ce", "np_dice", "hv_mse", "hv_msge"):
        assert torch.equal(t_half[k], plain[k])
    with pytest.raises(ValueError, match="conf"):
        hovernet_loss(out, inst=inst, hv=hv, type_map=typ, weights=w)


def test_boundary_band_marks_pixels_near_a_label_change():
    inst = torch.zeros(1, 9, 9, dtype=torch.long)
    inst[0, 2:7, 2:5] = 1
    inst[0, 2:7, 5:7] = 2
    band = boundary_band(inst, 1)[0]
    # by hand: a pixel is in the band when its 3x3 window (clipped at the map's edge) holds two labels
    expect = torch.zeros(9, 9, dtype=torch.bool)
    for y in range(9):
        for x in range(9):
            win = inst[0, max(0, y - 1):y + 2, max(0, x - 1):x + 2]
            expect[y, x] = bool((win != win[0, 0]).any())
    assert torch.equal(band, expect)
    assert not band[0, 0] and band[1, 1] and band[4, 4] and band[4, 5] and not band[4, 3]
    assert not boundary_band(inst, 0).any()
    assert not boundary_band(torch.ones(1, 5, 5, dtype=torch.long), 2).any()  # the map's edge is no boundary


def test_boundary_ignore_is_the_band_as_ignore_for_np_hv_only():
    inst, typ, hv, conf = _targets()
    out = _outputs()
    _, plain = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    _, banded = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, weights=LossWeights(boundary_ignore_px=1))
    _, as_ignore = hovernet_loss(out, inst=inst, hv=hv, type_map=typ, ignore=boundary_band(inst, 1).to(torch.uint8))
    for k in ("np_ce", "np_dice", "hv_mse", "hv_msge"):
        assert torch.allclose(banded[k], as_ignore[k]), k
        assert not torch.allclose(banded[k], plain[k]), k
    for k in ("nt_ce", "nt_dice"):  # NT keeps every pixel
        assert torch.equal(banded[k], plain[k]), k
    with pytest.raises(ValueError, match="boundary_ignore_px"):
        LossWeights(boundary_ignore_px=-1)


def test_gradients_flow_through_the_model(small):
    inst, typ, hv, conf = _targets(b=2, h=32, w=32)
    small.zero_grad()
    out = small(torch.rand(2, 3, 32, 32))
    total, _ = hovernet_loss(out, inst=inst, hv=hv, type_map=typ)
    total.backward()
    for name in ("decoders.np.head.weight", "decoders.hv.head.weight", "decoders.nt.head.weight",
                 "encoder.conv1.weight", "full.0.weight"):
        g = dict(small.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0, name


def test_sobel_and_hv_gradients():
    kx, ky = sobel_kernels(5)
    assert torch.equal(kx.T, ky) and float(kx[2, 2]) == 0 and float(kx[2, 4]) > 0
    ramp = torch.arange(12.0).view(1, 1, 12).expand(1, 12, 12)
    hv = torch.stack([ramp[0], ramp[0].T])[None]
    g = hv_gradients(hv)[0, :, 4:8, 4:8]  # interior: both gradients equal the same positive constant
    assert torch.allclose(g, g[0, 0, 0].expand_as(g)) and float(g[0, 0, 0]) > 0


def test_loss_rejects_bad_shapes_and_classes():
    inst, typ, hv, conf = _targets()
    out = _outputs()
    with pytest.raises(ValueError, match="shapes"):
        hovernet_loss(out, inst=inst[:, :8], hv=hv, type_map=typ)
    bad = typ.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match="outside"):
        hovernet_loss(out, inst=inst, hv=hv, type_map=bad)


def test_small_gn_encoder_has_no_batch_statistics(tmp_path):
    """The "small-gn" network: the small one with GroupNorm, so a tile's output in training mode
    does not depend on the other tiles of its batch (BatchNorm's does), same parameter count order."""
    torch.manual_seed(0)
    gn, bn = HoVerNet(encoder="small-gn"), HoVerNet(encoder="small")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    assert abs(count_params(gn) - count_params(bn)) / count_params(bn) < 0.01
    # float64: in float32 a batch of 1 and a batch of 3 may take different convolution kernels (their
    # choice depends on the batch and on the torch thread count), whose rounding alone reached 1e-5
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    for net, independent in ((gn, True), (bn, False)):
        net.double().train()
        alone, batched = net(x[:1])["np"], net(x)["np"][:1]
        assert torch.allclose(alone, batched, atol=1e-5) is independent
    gn.float()
    # the encoder name travels through the model file like any other
    path = tmp_path / "model.pt"
    torch.save({"config": {"encoder": "small-gn"}, "state_dict": gn.state_dict(), "class_names": dict(CLASS_NAMES)},
               path)
    loaded, cfg = load_model(path)
    assert cfg["encoder"] == "small-gn" and any(isinstance(m, torch.nn.GroupNorm) for m in loaded.modules())
    gn.eval()
    assert torch.allclose(loaded(x.float())["hv"], gn(x.float())["hv"])
