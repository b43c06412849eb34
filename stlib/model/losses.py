"""HoVer-Net losses with ignore masks and optional label-confidence weighting.

Terms (Graham et al. 2019; each has its own weight in :class:`LossWeights`):

* NP: cross-entropy + soft Dice on the nucleus / background logits;
* HV: mean squared error of the HV maps + mean squared error of their gradients (MSGE),
  the gradient of the horizontal map along x and of the vertical map along y taken with
  a 5x5 Sobel kernel, averaged over nucleus pixels only;
* NT: cross-entropy + soft Dice over the ``n_types`` classes.

Which pixels count:

* ``ignore == 1``: the pixel counts for no term. For the MSGE this means every pixel
  whose 5x5 Sobel window touches an ignored pixel is left out too, so predictions in an
  ignored region cannot leak into the loss through the gradient filter.
* ``type == 255`` (nucleus of unknown class) or ``254`` (epithelial, neoplastic or not: a class the
  five-class head cannot be taught): counts for NP and HV, not for NT.
* With ``weights.nt_confidence`` the NT terms weight each nucleus pixel by its label
  confidence (``conf`` in [0, 1]); background pixels keep weight 1. The NT cross-entropy is
  then a weighted mean, ``sum(w * ce) / sum(w)``. The paper trains on hard labels; this
  option lets uncertain ST labels count less.
* With ``weights.boundary_ignore_px = r > 0``, every pixel within ``r`` pixels (a square window)
  of an instance boundary (nucleus/background or nucleus/nucleus) counts for no NP or HV term:
  the outline of an ST-derived nucleus (DAPI outline, registration residual, refinement) is
  uncertain by about that much, so the network is taught only where the label is sure. The NT
  terms are unchanged. Off (0) by default.

Dice follows HoVer-Net: ``1 - 2 sum(p t) / (sum(p) + sum(t))`` per channel, pooled over
the batch, **summed** over channels (eps = 1e-3 in numerator and denominator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stlib.constants import EPITHELIAL_ANY, IGNORE

_DICE_EPS = 1e-3


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term (HoVer-Net uses 1 for all) and the NT confidence switch."""

    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    nt_ce: float = 1.0
    nt_dice: float = 1.0
    #: weight NT pixels by the label confidence (conf / 255 in the tile store)
    nt_confidence: bool = False
    #: half-width (px) of a band around every instance boundary left out of the NP and HV terms
    #: (outline uncertainty of ST-derived masks); 0 = off (the default). Tried on the real-tissue
    #: development split only (ST network, chapter 07's 150-step recipe, train MoNuSeg Breast + Lung,
    #: score its 2 Prostate images; benchmarks/realtissue_label_options.csv): 2 px (0.5 µm at 0.25
    #: µm/px) gave mean bPQ 0.163 / 0.188 (seeds 0 / 1) against 0.222 / 0.196 without, so it stays off
    boundary_ignore_px: float = 0.0

    def __post_init__(self) -> None:
        if not self.boundary_ignore_px >= 0:
            raise ValueError(f"LossWeights.boundary_ignore_px must be >= 0, got {self.boundary_ignore_px}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def sobel_kernels(size: int = 5, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel-like derivative kernels ``(kx, ky)`` of odd ``size``, shape ``(size, size)``.

    ``kx[i, j] = x / (x^2 + y^2)`` with ``x, y`` the offsets from the centre (0 at the
    centre); ``ky`` is its transpose. ``kx`` responds positively to values increasing along
    x (columns).
    """
    if size % 2 != 1 or size < 3:
        raise ValueError(f"size must be odd and >= 3, got {size}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    d = x * x + y * y
    d[size // 2, size // 2] = 1.0
    kx = (x / d).to(dtype=dtype, device=device)
    return kx, kx.T.contiguous()


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` -> ``(B, 2, H, W)``: d(h)/dx and d(v)/dy with a 5x5 Sobel kernel."""
    kx, ky = sobel_kernels(5, device=hv.device, dtype=hv.dtype)
    gh = F.conv2d(hv[:, :1], kx[None, None], padding=2)
    gv = F.conv2d(hv[:, 1:2], ky[None, None], padding=2)
    return torch.cat([gh, gv], dim=1)


def boundary_band(inst: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, H, W)`` bool: pixels whose ``(2 radius + 1)`` square window holds more than one label.

    That is, pixels within ``radius`` of a boundary between two instances or an instance and the
    background (computed as max-pool != min-pool; the map's own edge is no boundary).
    """
    if radius <= 0:
        return torch.zeros(inst.shape, dtype=torch.bool, device=inst.device)
    x = inst.float()[:, None]
    k = 2 * int(radius) + 1
    hi = F.max_pool2d(x, k, stride=1, padding=int(radius))
    lo = -F.max_pool2d(-x, k, stride=1, padding=int(radius))
    return (hi != lo)[:, 0]


def _dice(prob: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """HoVer-Net soft Dice loss summed over channels; ``w`` (B,1,H,W) masks pixels."""
    inter = (prob * onehot * w).sum(dim=(0, 2, 3))
    denom = (prob * w).sum(dim=(0, 2, 3)) + (onehot * w).sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + _DICE_EPS) / (denom + _DICE_EPS)).sum()


def _wmean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (values * w).sum() / w.sum().clamp_min(1e-8)


def hovernet_loss(outputs: dict[str, torch.Tensor], *, inst: torch.Tensor, hv: torch.Tensor,
                  type_map: torch.Tensor, ignore: torch.Tensor | None = None,
                  conf: torch.Tensor | None = None,
                  weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total HoVer-Net loss and its terms.

    Parameters
    ----------
    outputs
        Model outputs: ``"np"`` (B,2,H,W) logits, ``"hv"`` (B,2,H,W), ``"nt"`` (B,C,H,W) logits.
    inst
        (B,H,W) instance ids (0 = background); nucleus pixels are ``inst > 0``.
    hv
        (B,2,H,W) HV targets (channel 0 horizontal, 1 vertical).
    type_map
        (B,H,W) class ids 0..C-1, 255 = nucleus of unknown class.
    ignore
        (B,H,W), nonzero = pixel counts for nothing. ``None`` = no ignored pixels.
    conf
        (B,H,W) label confidence in [0, 1] (float) or 0..255 (uint8); used only with
        ``weights.nt_confidence``.
    weights
        Term weights.

    Returns
    -------
    ``(total, terms)`` with ``terms`` keys ``np_ce, np_dice, hv_mse, hv_msge, nt_ce, nt_dice``
    (unweighted, detached) and ``total`` the weighted sum (with grad). Terms with no
    counting pixel are 0.
    """
    np_logits = outputs["np"].float()
    hv_pred = outputs["hv"].float()
    nt_logits = outputs["nt"].float()
    b, c, h, w = nt_logits.shape
    if inst.shape != (b, h, w) or type_map.shape != (b, h, w) or hv.shape != (b, 2, h, w):
        raise ValueError(f"target shapes inst {tuple(inst.shape)}, type {tuple(type_map.shape)}, "
                         f"hv {tuple(hv.shape)} do not fit outputs {(b, c, h, w)}")
    if ignore is None:
        valid = torch.ones((b, 1, h, w), dtype=torch.float32, device=np_logits.device)
    else:
        valid = (ignore == 0).float()[:, None]
    fg = (inst > 0).long()
    hv_t = hv.float()
    valid_nt = valid
    r = int(round(weights.boundary_ignore_px))
    if r > 0:  # the uncertain outline band counts for no NP / HV term (NT keeps ``valid_nt``)
        valid = valid * (~boundary_band(inst, r)).float()[:, None]

    # NP
    ce = F.cross_entropy(np_logits, fg, reduction="none")[:, None]
    np_ce = _wmean(ce, valid)
    np_prob = np_logits.softmax(dim=1)
    np_dice = _dice(np_prob, F.one_hot(fg, 2).permute(0, 3, 1, 2).float(), valid)

    # HV
    hv_mse = _wmean((hv_pred - hv_t).pow(2), valid.expand(-1, 2, -1, -1))
    if ignore is None and r <= 0:
        valid_grad = valid
    else:  # a pixel's 5x5 window must not touch an ignored pixel
        valid_grad = 1.0 - F.max_pool2d(1.0 - valid, kernel_size=5, stride=1, padding=2)
    focus = (fg[:, None].float() * valid_grad).expand(-1, 2, -1, -1)
    hv_msge = _wmean((hv_gradients(hv_pred) - hv_gradients(hv_t)).pow(2), focus)

    # NT
    t = type_map.long()
    known = (t != IGNORE) & (t != EPITHELIAL_ANY)  # nuclei of unknown (or merged) class: NP/HV only
    if bool(((t < 0) | ((t >= c) & known)).any()):
        raise ValueError(f"type_map has ids outside 0..{c - 1} (and {EPITHELIAL_ANY}, {IGNORE})")
    t_safe = torch.where(known, t, torch.zeros_like(t))
    w_nt = valid_nt * known[:, None].float()
    if weights.nt_confidence:
        if conf is None:
            raise ValueError("weights.nt_confidence is set but no conf was given")
        cf = conf.float()
        if conf.dtype == torch.uint8:
            cf = cf / 255.0
        w_nt = w_nt * torch.where((t_safe > 0)[:, None], cf[:, None], torch.ones_like(cf[:, None]))
    nt_ce = _wmean(F.cross_entropy(nt_logits, t_safe, reduction="none")[:, None], w_nt)
    nt_dice = _dice(nt_logits.softmax(dim=1), F.one_hot(t_safe, c).permute(0, 3, 1, 2).float(), w_nt)

    terms = {"np_ce": np_ce, "np_dice": np_dice, "hv_mse": hv_mse, "hv_msge": hv_msge,
             "nt_ce": nt_ce, "nt_dice": nt_dice}
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}


__all__ = ["LossWeights", "boundary_band", "hovernet_loss", "hv_gradients", "sobel_kernels"]
