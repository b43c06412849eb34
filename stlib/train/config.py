"""The training run's configuration: :class:`TrainConfig` (one run, saved as ``config.json``) and
``key=value`` overrides (:func:`apply_overrides`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stlib.config import TrainParams, TrainRecipe, coerce_value, make_params
from stlib.constants import CLASS_NAMES, N_TYPES
from stlib.model.losses import LossWeights
from stlib.model.net import ENCODERS
from stlib.utils import InputError, atomic_path

RECIPES = ("st", "pannuke", "manual")  # manual: manual masks of the real-tissue cohort (stlib.realtissue)
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adamw", "adam")
HV_SOURCES = ("device", "masks")
#: config fields that may change between a run and its resumption (they do not change the result)
RESUME_FREE_FIELDS = frozenset({"device", "num_workers", "compile", "log_every", "run_dir"})
#: fields added after checkpoints were written: a saved config without one compares at this value
#: (:func:`stlib.train.checkpoint.comparable_config`), so older runs still resume or are skipped
ADDED_FIELD_DEFAULTS: dict[str, object] = {"channels_last_cpu": False, "stain_norm": "none"}


#: the profile-level part of a run's defaults (encoder, steps, batch, LR schedule, validation, seed, ...)
#: is :class:`stlib.config.TrainRecipe`'s, the one place a training recipe's default lives
_RECIPE = TrainRecipe()


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` beside the weights.

    Its recipe fields (the ones a profile's ``03_training`` block sets) default to
    :class:`stlib.config.TrainRecipe`'s values; the rest is fixed per run (stores, splits) or a tested
    constant of the method (optimizer, loss weights, augmentation, sampling).

    Paths (``stores``, ``out_dir``) are relative to ``run_dir`` unless absolute.
    ``batch_size`` is the global batch: under DDP each of the ``W`` ranks takes
    ``batch_size / W`` tiles, so the budget does not depend on the number of GPUs.
    """

    #: "st" (ST-derived labels), "pannuke" (store converted from PanNuke folds) or "manual" (manual
    #: masks of real annotated H&E, the comparison of the real-tissue chapter)
    recipe: str = "st"
    run_dir: str = "."
    stores: tuple[str, ...] = ("tiles/st",)
    #: output folder; "" = models/{recipe}
    out_dir: str = ""
    train_splits: tuple[str, ...] = ("train",)
    val_splits: tuple[str, ...] = ("val",)
    #: restrict to these organs (empty = all organs of the store)
    organs: tuple[str, ...] = ()
    exclude_organs: tuple[str, ...] = ()
    # model
    encoder: str = _RECIPE.encoder
    n_types: int = N_TYPES
    #: local encoder weight file (never downloaded); "" = random init
    weights: str = _RECIPE.weights
    # optimisation
    steps: int = _RECIPE.steps
    batch_size: int = _RECIPE.batch_size
    optimizer: str = "adamw"
    lr: float = _RECIPE.lr
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-4
    schedule: str = _RECIPE.schedule
    warmup_steps: int = _RECIPE.warmup_steps
    #: step schedule: milestones as fractions of ``steps``; LR x ``step_gamma`` at each
    step_milestones: tuple[float, ...] = (0.5,)
    step_gamma: float = 0.1
    #: cosine schedule: final LR / initial LR
    min_lr_ratio: float = 0.01
    #: max gradient norm; 0 = no clipping
    grad_clip: float = 5.0
    loss: LossWeights = field(default_factory=LossWeights)
    # sampling
    balance_organ: bool = True
    balance_class: bool = True
    #: cap of the per-tile class boost (and 1/cap its floor)
    max_class_boost: float = 10.0
    # augmentation (on the device)
    aug_flip: bool = True
    aug_rot90: bool = True
    #: max relative zoom (0.1 = 0.9x..1.1x); 0 = off
    aug_scale: float = 0.1
    #: HED jitter: stain scale in 1 +- s, shift in +- s/2 (optical density); 0 = off
    aug_hed: float = 0.05
    #: probability of a Gaussian blur (sigma 0.3..1.2 px)
    aug_blur: float = 0.2
    #: per-image stain normalisation of the input (:mod:`stlib.model.stain`: "none", "hed", "macenko"),
    #: fitted on all tiles of each training sample; stored in ``model.pt`` and applied by ``stlib infer``
    #: to each image (fitted on its thumbnail) before tiling
    stain_norm: str = "none"
    #: train on random ``crop_px`` x ``crop_px`` crops of the tiles (0 = whole tiles); a CPU
    #: demo trains ~4x faster on 128 px crops of 256 px tiles, validation uses whole tiles
    crop_px: int = _RECIPE.crop_px
    #: "device" = HV from the augmented instance map with :func:`hv_from_inst`;
    #: "masks" = :func:`stlib.labels.masks.hv_maps` on CPU, then transformed with the tile
    hv_source: str = "device"
    # hardware
    amp: bool = True
    channels_last: bool = True
    #: channels_last on the CPU too (``channels_last`` alone acts on CUDA only). The demo's small
    #: network, batch 8 x 128 px crops, one thread: 25% less CPU per step (benchmarks/realtissue_time.json).
    #: oneDNN then sums in another order, so the weights differ from a default-layout run in the last
    #: bits after one step and, after many steps, as much as a rerun on another machine would: off by
    #: default, so existing results stay bit-for-bit reproducible.
    channels_last_cpu: bool = False
    compile: bool = _RECIPE.compile
    device: str = "auto"
    #: background threads reading batches from the store (0 = read in the training loop)
    num_workers: int = 2
    # bookkeeping
    val_every: int = _RECIPE.val_every
    #: at most this many validation tiles (the first ones of the split, fixed)
    val_max_tiles: int = _RECIPE.val_max_tiles
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = _RECIPE.seed

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InputError(f"train config: {msg}")

        if self.recipe not in RECIPES:
            bad(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.stain_norm not in ("none", "hed", "macenko"):  # stlib.model.stain.STAIN_NORMS
            bad(f"stain_norm must be one of none, hed, macenko, got {self.stain_norm!r}")
        if self.encoder not in ENCODERS:
            bad(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.hv_source not in HV_SOURCES:
            bad(f"hv_source must be one of {HV_SOURCES}, got {self.hv_source!r}")
        if not self.stores:
            bad("stores is empty")
        for name in ("steps", "batch_size", "val_every", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.aug_scale < 0.5:
            bad(f"aug_scale must be in [0, 0.5), got {self.aug_scale}")
        if not 0 <= self.aug_blur <= 1:
            bad(f"aug_blur is a probability, got {self.aug_blur}")
        if len(self.betas) != 2:
            bad(f"betas needs two values, got {self.betas}")
        if self.n_types != len(CLASS_NAMES):
            bad(f"n_types={self.n_types} but the class table has {len(CLASS_NAMES)} classes")

    # -- paths
    def run_path(self) -> Path:
        """``run_dir`` as a Path."""
        return Path(self.run_dir)

    def store_paths(self) -> list[Path]:
        """Tile store folders (resolved against ``run_dir``)."""
        return [self._resolve(s) for s in self.stores]

    def out_path(self) -> Path:
        """The output folder (resolved against ``run_dir``)."""
        return self._resolve(self.out_dir or f"models/{self.recipe}")

    def _resolve(self, p: str) -> Path:
        pp = Path(p)
        return pp if pp.is_absolute() else self.run_path() / pp

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (lists for tuples, nested ``loss``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LossWeights):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "<config>") -> TrainConfig:
        """Build from a dict, rejecting unknown keys and coercing lists to tuples."""
        names = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise InputError(f"unknown train config key(s) {sorted(unknown)}", path=source,
                             fix=f"known keys: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for key, val in values.items():
            default = cls.__dataclass_fields__[key].default
            if key == "loss":
                if isinstance(val, LossWeights):
                    kwargs[key] = val
                    continue
                if not isinstance(val, Mapping):
                    raise InputError(f"'loss' must be a mapping, got {val!r}", path=source)
                lw_names = {f.name for f in fields(LossWeights)}
                bad = set(val) - lw_names
                if bad:
                    raise InputError(f"unknown loss key(s) {sorted(bad)}", path=source,
                                     fix=f"known: {sorted(lw_names)}")
                kwargs[key] = LossWeights(**{k: (bool(v) if k == "nt_confidence" else float(v))
                                             for k, v in val.items()})
                continue
            kwargs[key] = coerce_value(key, val, default, source)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, overrides: Sequence[str] = ()) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides (``loss.nt_ce=0.5`` for nested keys)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InputError("train config not found", path=path, fix="use --profile demo, or the config.json of a model")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"not valid YAML: {e}", path=path) from e
        if not isinstance(raw, dict):
            raise InputError("expected a mapping of train config keys", path=path)
        return cls.from_dict(apply_overrides(raw, overrides), source=str(path))

    @classmethod
    def from_train_params(cls, params: Any, recipe: str = "st", **overrides: Any) -> TrainConfig:
        """Config of one recipe from the notebook parameters (:class:`stlib.config.TrainParams`).

        ``params/{profile}.yaml`` (block ``03_training``) is the one source of each profile's
        recipe: ``run_dir``, ``seed``, ``device``, ``encoder``, ``weights``, ``steps``,
        ``batch_size``, ``lr``, ``schedule``, ``warmup_steps``, ``val_every``, ``val_max_tiles``,
        ``compile``, ``crop_px`` and ``nt_confidence`` come from ``params``; the store is ``tiles/{recipe}`` and the
        output ``models/{recipe}``; ``overrides`` win over both. See :func:`variant_config` for
        the study's named runs.
        """
        params = as_train_params(params)
        values: dict[str, Any] = {"recipe": recipe, "stores": (f"tiles/{recipe}",)}
        for name in _FROM_PARAMS:
            if hasattr(params, name):
                values[name] = getattr(params, name)
        values["ckpt_every"] = values.get("val_every", cls.ckpt_every)
        if getattr(params, "nt_confidence", False):
            values["loss"] = {"nt_confidence": True}
        values.update(overrides)
        return cls.from_dict(values, source="TrainParams")

    def to_yaml(self, path: str | os.PathLike) -> Path:
        """Write the config as YAML (atomically)."""
        import yaml

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def as_train_params(params: Any) -> Any:
    """``params`` as :class:`stlib.config.TrainParams` (a profile's ``03_training`` block).

    A mapping (e.g. the block as read from YAML) is checked and completed like the notebook's
    parameters (:func:`stlib.config.make_params`: unknown keys and wrong types raise, absent keys
    take the ``TrainParams`` defaults); a ``TrainParams`` is returned as it is.

    Raises
    ------
    InputError
        Anything else (another notebook's parameters, ``None``, ...), which would otherwise
        silently train with the defaults.
    """
    if isinstance(params, TrainParams):
        return params
    if isinstance(params, Mapping):
        return make_params("03_training", dict(params), source="training parameters (a mapping)")
    raise InputError(f"training parameters must be a stlib.config.TrainParams or a mapping of its fields, "
                     f"got {type(params).__name__}",
                     fix="pass make_params('03_training', {...}) or a dict of 03_training keys")


#: fields of :class:`TrainConfig` that a profile's ``03_training`` block sets
_FROM_PARAMS = ("run_dir", "seed", "device", "encoder", "weights", "steps", "batch_size", "lr", "schedule",
                "warmup_steps", "val_every", "val_max_tiles", "compile", "crop_px")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML; ``a.b=v`` sets a nested key)."""
    import yaml

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} is not key=value", fix="e.g. --set steps=100")
        key, text = item.split("=", 1)
        val = yaml.safe_load(text)
        if "." in key:
            outer, inner = key.split(".", 1)
            sub = dict(out.get(outer) or {})
            sub[inner] = val
            out[outer] = sub
        else:
            out[key.strip()] = val
    return out
