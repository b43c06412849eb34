"""HoVer-Net-style encoder-decoder: one encoder, three decoder branches (NP, HV, NT).

The network follows the HoVer-Net design (Graham et al., Medical Image Analysis 2019):
a residual bottleneck encoder and three decoders that predict

* **NP** - nucleus pixels, 2-channel logits (background, nucleus);
* **HV** - horizontal and vertical distances of each nucleus pixel to its nucleus centre,
  normalised to [-1, 1] per nucleus (channel 0 = horizontal = along the image width,
  channel 1 = vertical = along the image height), 2 channels, no activation;
* **NT** - nucleus type, ``n_types`` logits (background + the five classes of
  :mod:`stlib.constants`).

Differences from the published HoVer-Net, on purpose:

* "same" padding everywhere: a 256 x 256 tile gives 256 x 256 outputs. HoVer-Net uses
  valid convolutions in its decoder (256 -> 164 in "fast" mode, 270 -> 80 in "original"
  mode) and so needs overlapping tiles at inference; here every output pixel has a
  prediction and tiles are stitched with a margin instead. Inputs whose side is not a
  multiple of 32 are padded (replicate) inside :meth:`HoVerNet.forward` and cropped back.
* The encoder is a standard (post-activation) ResNet-50-class bottleneck network with a
  stride-2 stem; HoVer-Net uses a pre-activation ResNet-50 whose first stage keeps full
  resolution. The decoders are U-Net-like (upsample, concatenate the encoder feature of
  the same scale, two 3x3 conv-BN-ReLU), ending at full resolution with a light
  full-resolution skip; HoVer-Net uses dense blocks and stops at 1/1 via valid crops.
* Module names of the encoder follow the common ResNet naming (``conv1``, ``bn1``,
  ``layer1`` ... ``layer4``, blocks with ``conv1..3``, ``bn1..3``, ``downsample``), so an
  ImageNet ResNet-50 state dict saved to a local file loads with ``pretrained_path``.
  Nothing is ever downloaded.

The input is a float tensor ``(B, 3, H, W)`` with RGB in [0, 1]; ImageNet mean/std
normalisation happens inside the model (see :func:`to_input`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stlib.constants import CLASS_NAMES, N_TYPES
from stlib.utils import InputError

log = logging.getLogger("stlib.model")

#: ImageNet statistics used to normalise RGB in [0, 1] (so ImageNet weights fit).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Encoder definitions: blocks per stage, bottleneck width of stage 1, stem width,
#: decoder widths at 1/16, 1/8, 1/4, 1/2, 1/1 and the full-resolution skip width.
ENCODERS: dict[str, dict[str, Any]] = {
    "resnet50": {"layers": (3, 4, 6, 3), "width": 64, "stem": 64,
                 "decoder": (256, 128, 64, 32, 32), "full": 32},
    "small": {"layers": (1, 1, 1, 1), "width": 8, "stem": 16,
              "decoder": (48, 32, 16, 16, 8), "full": 8},
    # the small network with GroupNorm (4 groups) instead of BatchNorm: no batch statistics, so the
    # same function in training and inference (BatchNorm's running means lag behind after few steps)
    "small-gn": {"layers": (1, 1, 1, 1), "width": 8, "stem": 16,
                 "decoder": (48, 32, 16, 16, 8), "full": 8, "norm": "group"},
}
#: groups of the GroupNorm layers of encoders with ``"norm": "group"``
GN_GROUPS = 4


def _norm(channels: int, kind: str = "batch") -> nn.Module:
    """The normalisation layer of an encoder spec: BatchNorm (default) or GroupNorm."""
    if kind == "group":
        return nn.GroupNorm(GN_GROUPS if channels % GN_GROUPS == 0 else 1, channels)
    return nn.BatchNorm2d(channels)
#: The input side must be a multiple of this (the encoder's output stride).
STRIDE = 32


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a :class:`HoVerNet` (the part of a training config the model needs).

    Parameters
    ----------
    encoder
        ``"resnet50"`` (~25M-parameter encoder, GPU) or ``"small"`` (< 1M parameters in
        total, CPU demos).
    n_types
        Width of the NT head: background + nucleus classes (6 for the PanNuke-like classes).
    pretrained_path
        Local file with encoder weights (a state dict, or a dict holding one under
        ``"state_dict"``/``"model"``); empty = random initialisation.
    """

    encoder: str = "small"
    n_types: int = N_TYPES
    pretrained_path: str = ""

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")
        if int(self.n_types) < 2:
            raise ValueError(f"n_types must be >= 2 (background + at least one class), got {self.n_types}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, norm: str = "batch") -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), _norm(cout, norm)]


class Bottleneck(nn.Module):
    """Residual bottleneck block: 1x1 reduce, 3x3 (carries the stride), 1x1 expand (x4).

    Parameters
    ----------
    cin
        Input channels.
    mid
        Bottleneck width; the block outputs ``4 * mid`` channels.
    stride
        Spatial stride of the 3x3 convolution (and of the projection shortcut).
    norm
        ``"batch"`` or ``"group"`` (:func:`_norm`).
    """

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _norm(mid, norm)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(mid, norm)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _norm(cout, norm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            _norm(cout, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(y + short)


class ResNetEncoder(nn.Module):
    """Bottleneck ResNet: stem (7x7/2) -> max-pool /2 -> four stages (strides 1, 2, 2, 2).

    ``forward`` returns the features at 1/2 (stem), 1/4, 1/8, 1/16 and 1/32 of the input.
    """

    def __init__(self, layers: tuple[int, ...], width: int, stem: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(stem, norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = stem
        self.channels: list[int] = [stem]
        for i, n in enumerate(layers):
            mid = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, mid, stride=(1 if i == 0 or j > 0 else 2), norm=norm))
                cin = mid * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.channels.append(cin)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        f1 = self.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return [f1, f2, f3, f4, f5]


class _Decoder(nn.Module):
    """U-Net-like decoder branch from the 1/32 feature back to full resolution."""

    def __init__(self, enc_ch: list[int], full_ch: int, widths: tuple[int, ...], out_ch: int,
                 norm: str = "batch") -> None:
        super().__init__()
        self.bottom = nn.Sequential(*_conv_bn(enc_ch[4], widths[0], 1, norm=norm), nn.ReLU(inplace=True))
        skips = [enc_ch[3], enc_ch[2], enc_ch[1], enc_ch[0], full_ch]
        stages = []
        prev = widths[0]
        for skip, w in zip(skips, widths):
            stages.append(nn.Sequential(*_conv_bn(prev + skip, w, 3, norm=norm), nn.ReLU(inplace=True),
                                        *_conv_bn(w, w, 3, norm=norm), nn.ReLU(inplace=True)))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(prev, out_ch, 1)

    def forward(self, feats: list[torch.Tensor], full: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.bottom(feats[4])
        for stage, skip in zip(self.stages, [feats[3], feats[2], feats[1], feats[0], full]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)


class HoVerNet(nn.Module):
    """HoVer-Net-style network with NP, HV and NT branches and same-size outputs.

    Parameters
    ----------
    encoder
        ``"resnet50"`` or ``"small"`` (see :data:`ENCODERS`).
    n_types
        NT head width (background + classes).
    pretrained_path
        Optional local encoder weight file; ``None``/``""`` = random init (logged).

    Notes
    -----
    ``forward(x)`` takes ``(B, 3, H, W)`` float RGB in [0, 1] and returns a dict with
    ``"np"`` ``(B, 2, H, W)`` logits, ``"hv"`` ``(B, 2, H, W)`` and ``"nt"``
    ``(B, n_types, H, W)`` logits.
    """

    def __init__(self, encoder: str = "resnet50", n_types: int = N_TYPES,
                 pretrained_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net_config = NetConfig(encoder=encoder, n_types=int(n_types),
                                    pretrained_path=str(pretrained_path or ""))
        spec = ENCODERS[encoder]
        norm = spec.get("norm", "batch")
        self.encoder = ResNetEncoder(spec["layers"], spec["width"], spec["stem"], norm=norm)
        full = spec["full"]
        self.full = nn.Sequential(*_conv_bn(3, full, 3, norm=norm), nn.ReLU(inplace=True))
        enc_ch = self.encoder.channels
        self.decoders = nn.ModuleDict({
            "np": _Decoder(enc_ch, full, spec["decoder"], 2, norm=norm),
            "hv": _Decoder(enc_ch, full, spec["decoder"], 2, norm=norm),
            "nt": _Decoder(enc_ch, full, spec["decoder"], int(n_types), norm=norm),
        })
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()
        if pretrained_path:
            load_encoder_weights(self, pretrained_path)
        else:
            log.info("encoder weights: random init (no --weights given)")

    @property
    def n_types(self) -> int:
        """Width of the NT head."""
        return self.net_config.n_types

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.encoder.modules():  # residual branches start near identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor, heads: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The branches' outputs for ``x``; ``heads`` = the branches to run (default all three:
        segmentation alone needs ``("np", "hv")`` and skips the NT decoder's compute)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % STRIDE, (-w) % STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.encoder(x)
        full = self.full(x)
        out = {k: dec(feats, full) for k, dec in self.decoders.items() if heads is None or k in heads}
        if ph or pw:
            out = {k: v[..., :h, :w] for k, v in out.items()}
        return out


def to_input(images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 RGB -> ``(B, 3, H, W)`` float in [0, 1] (the model's input)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def load_encoder_weights(model: HoVerNet, path: str | os.PathLike) -> None:
    """Load a local encoder state dict into ``model.encoder`` (never downloads).

    Keys may carry a prefix ``encoder.``, ``backbone.`` or ``module.``; classifier keys
    (``fc.*``) are ignored. Raises :class:`~stlib.utils.InputError` when the file is
    missing or when no key matches the encoder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("encoder weight file not found", path=path,
                         fix="give a local state-dict file, or no weights for random initialisation")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "encoder.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("fc."):
            state[k] = v
    own = model.encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise InputError("no tensor in the file matches the encoder", path=path,
                         fix=f"expected ResNet keys such as 'layer1.0.conv1.weight' for encoder "
                             f"{model.net_config.encoder!r}")
    model.encoder.load_state_dict(usable, strict=False)
    log.info("encoder weights: %d/%d tensors loaded from %s", len(usable), len(own), path)


def _net_config_from(config: Any) -> NetConfig:
    if isinstance(config, NetConfig):
        return config
    if isinstance(config, Mapping):
        get = config.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(config, key, default)
    enc = get("encoder", None)
    if enc is None:
        raise ValueError("config has no 'encoder' field")
    weights = get("pretrained_path", None) or get("weights", None) or ""
    return NetConfig(encoder=str(enc), n_types=int(get("n_types", N_TYPES)), pretrained_path=str(weights))


def build_model(config: NetConfig | Mapping[str, Any] | Any) -> HoVerNet:
    """Build a :class:`HoVerNet` from a :class:`NetConfig`, a mapping or any config object.

    Parameters
    ----------
    config
        Anything with ``encoder`` and optionally ``n_types`` and ``pretrained_path`` (or
        ``weights``) as attributes or keys, e.g. :class:`stlib.train.TrainConfig`.
    """
    nc = _net_config_from(config)
    return HoVerNet(nc.encoder, nc.n_types, nc.pretrained_path or None)


def _norm_class_names(names: Mapping[Any, str]) -> dict[int, str]:
    return {int(k): str(v) for k, v in names.items()}


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
               class_names: Mapping[int, str] | None = None) -> tuple[HoVerNet, dict[str, Any]]:
    """Load ``model.pt`` (or a ``checkpoint.pt``) written by :mod:`stlib.train`.

    Parameters
    ----------
    path
        The model file.
    map_location
        Device to load the tensors to.
    class_names
        The class table the caller expects (default :data:`stlib.constants.CLASS_NAMES`).

    Returns
    -------
    ``(model, config)``: the model in eval mode and the training config as a dict.

    Raises
    ------
    InputError
        The file is missing or not an stlib model, or it was trained on another class set.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("model file not found", path=path, fix="train a model first (`stlib train --config ...`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / foreign file
        raise InputError(f"cannot read model file ({e})", path=path, fix="re-run training or give a model.pt") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "config" not in ckpt:
        raise InputError("not an stlib model file (needs 'config' and 'state_dict')", path=path,
                         fix="give a model.pt written by `stlib train`")
    expected = _norm_class_names(class_names if class_names is not None else CLASS_NAMES)
    got = _norm_class_names(ckpt.get("class_names") or {})
    if got != expected:
        raise InputError(f"model was trained for classes {got}, but {expected} are expected", path=path,
                         fix="use a model trained on this class set, or retrain")
    config = dict(ckpt["config"])
    model = build_model({**config, "pretrained_path": "", "weights": ""})
    if model.n_types != len(expected):
        raise InputError(f"model NT head has {model.n_types} outputs for {len(expected)} classes", path=path)
    model.load_state_dict(ckpt["state_dict"])
    model.to(map_location).eval()
    return model, config


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_flops(model: nn.Module, tile_px: int = 256) -> int:
    """Forward FLOPs of one ``tile_px`` x ``tile_px`` tile (``torch.utils.flop_counter``).

    Counts multiply-adds as 2 FLOPs (convolutions and matmuls; element-wise ops are not
    counted). A training step costs about 3x the forward FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    p = next(model.parameters())
    x = torch.zeros(1, 3, tile_px, tile_px, device=p.device, dtype=p.dtype)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return int(fc.get_total_flops())


__all__ = [
    "ENCODERS", "NetConfig", "Bottleneck", "ResNetEncoder", "HoVerNet", "to_input", "build_model",
    "load_model", "load_encoder_weights", "count_params", "model_flops",
]
