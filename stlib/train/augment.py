"""Augmentation on the device: flips, 90-degree rotations, zoom, random crops, HED stain jitter and
Gaussian blur. Parameters are drawn on CPU from one generator (:func:`draw_augment_params`), so
runs are reproducible, resumable and identical across DDP ranks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from stlib.train.config import TrainConfig

#: Stain optical-density vectors (rows: haematoxylin, eosin, DAB) of Ruifrok & Johnston (2001).
_HED_VECTORS = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_OD_EPS = 1e-6


def _stain_matrix(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m = torch.tensor(_HED_VECTORS, dtype=torch.float64)
    m = m / m.norm(dim=1, keepdim=True)
    return m.to(device=device, dtype=dtype)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> stain concentrations (H, E, D) by colour deconvolution."""
    m = _stain_matrix(rgb.device)
    od = -torch.log(rgb.float().clamp(min=_OD_EPS))
    return torch.einsum("bchw,cs->bshw", od, torch.linalg.inv(m))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (Beer-Lambert), clipped to [0, 1]."""
    m = _stain_matrix(hed.device)
    od = torch.einsum("bshw,sc->bchw", hed.float(), m)
    return torch.exp(-od).clamp(0.0, 1.0)


def draw_augment_params(generator: torch.Generator, n: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Random augmentation parameters of ``n`` tiles, drawn on CPU from ``generator``.

    Drawing on CPU from one generator keeps runs reproducible, resumable and identical
    across DDP ranks (each rank takes its stride of the global batch's parameters).
    """
    g = generator
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    hflip, vflip, k = u(n) < 0.5, u(n) < 0.5, torch.randint(0, 4, (n,), generator=g)
    zoom = 1.0 + (2 * u(n) - 1) * config.aug_scale
    alpha = 1.0 + (2 * u(n, 3) - 1) * config.aug_hed
    beta = (2 * u(n, 3) - 1) * config.aug_hed / 2
    sigma = torch.where(u(n) < config.aug_blur, 0.3 + 0.9 * u(n), torch.zeros(n, dtype=torch.float64))
    out = {}
    if config.crop_px > 0:  # drawn only when used, so runs without crops keep their random stream
        out["crop_y"], out["crop_x"] = u(n), u(n)
        out["crop_px"] = torch.full((n,), int(config.crop_px), dtype=torch.int64)
    return out | {
        "hflip": hflip & config.aug_flip, "vflip": vflip & config.aug_flip,
        "rot90": k if config.aug_rot90 else torch.zeros_like(k),
        "zoom": zoom if config.aug_scale > 0 else torch.ones(n, dtype=torch.float64),
        "hed_alpha": alpha if config.aug_hed > 0 else torch.ones(n, 3, dtype=torch.float64),
        "hed_beta": beta if config.aug_hed > 0 else torch.zeros(n, 3, dtype=torch.float64),
        "blur_sigma": sigma,
    }


def shard_params(params: Mapping[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's stride of global-batch augmentation parameters."""
    return {k: v[rank::world_size] for k, v in params.items()}


_SPATIAL = ("image", "inst", "type", "ignore", "conf", "hv")


def _geometric(x: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x


def _hv_geometric(hv: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
    """Transform one ``(2, H, W)`` HV map like its tile: flips negate, rotations swap+negate."""
    hv = _geometric(hv, hflip, vflip, k)
    h, v = hv[0], hv[1]
    if hflip:
        h = -h
    if vflip:
        v = -v
    for _ in range(k):  # rot90 (counter-clockwise as displayed): new x = old y, new y = -old x
        h, v = v, -h
    return torch.stack([h, v])


def _random_crop(batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Per-tile random crop of every spatial map (``crop_px`` / ``crop_y`` / ``crop_x`` params)."""
    if "crop_px" not in params:
        return batch
    c = int(params["crop_px"][0])
    h, w = batch["image"].shape[-2:]
    if c >= min(h, w):
        return batch
    ys = (params["crop_y"] * (h - c + 1)).long().clamp(max=h - c).tolist()
    xs = (params["crop_x"] * (w - c + 1)).long().clamp(max=w - c).tolist()
    out = dict(batch)
    for key in _SPATIAL:
        if key in batch:
            out[key] = torch.stack([batch[key][i, ..., y:y + c, x:x + c] for i, (y, x) in enumerate(zip(ys, xs))])
    return out


def augment_batch(batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply augmentations on the batch's device.

    Parameters
    ----------
    batch
        ``image`` (B,3,H,W) float in [0, 1]; ``inst``, ``type``, ``ignore``, ``conf`` (B,H,W);
        optional ``hv`` (B,2,H,W), transformed consistently (flips negate a channel,
        90-degree rotations swap the channels and negate one).
    params
        From :func:`draw_augment_params` (``B`` rows).

    Returns
    -------
    A new dict with the same keys. Geometry (flips, rotations, zoom) acts on every map
    (nearest neighbour for labels; zoom-out pixels become ``ignore``); stain jitter and blur
    act on ``image`` only.
    """
    batch = _random_crop(batch, params)
    out = dict(batch)
    img = batch["image"]
    b, _, h, w = img.shape
    dev = img.device
    hflip, vflip, rot = params["hflip"].tolist(), params["vflip"].tolist(), params["rot90"].tolist()
    if any(rot) and h != w:
        raise ValueError(f"90-degree rotations need square tiles, got {h}x{w}")
    if any(hflip) or any(vflip) or any(rot):
        for key in _SPATIAL:
            if key not in batch:
                continue
            x = batch[key]
            if key == "hv":
                items = [_hv_geometric(x[i], hflip[i], vflip[i], int(rot[i])) for i in range(b)]
            else:
                items = [_geometric(x[i], hflip[i], vflip[i], int(rot[i])) for i in range(b)]
            out[key] = torch.stack(items)
    zoom = params["zoom"]
    if bool((zoom != 1).any()):
        theta = torch.zeros(b, 2, 3, dtype=torch.float32)
        theta[:, 0, 0] = (1.0 / zoom).float()
        theta[:, 1, 1] = (1.0 / zoom).float()
        grid = F.affine_grid(theta.to(dev), [b, 1, h, w], align_corners=False)
        out["image"] = F.grid_sample(out["image"], grid, mode="bilinear", padding_mode="border", align_corners=False)
        valid = F.grid_sample((out["ignore"] == 0).float()[:, None], grid, mode="nearest",
                              padding_mode="zeros", align_corners=False)[:, 0]
        for key in ("inst", "type", "conf"):
            x = out[key]
            y = F.grid_sample(x.float()[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
            out[key] = y[:, 0].round().to(x.dtype)
        if "hv" in out:
            out["hv"] = F.grid_sample(out["hv"], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out["ignore"] = (valid < 0.5).to(out["ignore"].dtype)
    alpha, beta = params["hed_alpha"], params["hed_beta"]
    if bool((alpha != 1).any() or (beta != 0).any()):
        hed = rgb_to_hed(out["image"])
        hed = hed * alpha.float().to(dev)[:, :, None, None] + beta.float().to(dev)[:, :, None, None]
        out["image"] = hed_to_rgb(hed).to(img.dtype)
    sigma = params["blur_sigma"]
    if bool((sigma > 0).any()):
        r = torch.arange(-2, 3, dtype=torch.float64)
        s = sigma.clamp(min=1e-3)[:, None]
        g1 = torch.exp(-(r[None] ** 2) / (2 * s**2))
        g1 = torch.where((sigma > 0)[:, None], g1, (r == 0).double()[None].expand(b, -1))
        g1 = g1 / g1.sum(1, keepdim=True)
        k2 = (g1[:, :, None] * g1[:, None, :]).float().to(dev)  # (B,5,5)
        weight = k2.repeat_interleave(3, dim=0)[:, None]  # (B*3,1,5,5)
        x = F.pad(out["image"].reshape(1, b * 3, h, w), (2, 2, 2, 2), mode="reflect")
        out["image"] = F.conv2d(x, weight.to(x.dtype), groups=b * 3).reshape(b, 3, h, w)
    return out
