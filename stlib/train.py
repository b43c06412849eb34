"""Train the HoVer-Net-style network on a tile store: ``stlib train --config FILE``.

One entry point serves a laptop CPU, one GPU and ``torchrun`` (DDP). What it does:

* reads one or more tile stores (:mod:`stlib.io.tiles` format) and splits them by the
  ``split`` column (never by overlapping patches);
* draws training tiles with a **balanced sampler** (each organ the same total weight, tiles
  rich in rare classes up-weighted) from its own ``torch.Generator``; under DDP every rank
  draws the same global batch and keeps its own stride of it;
* augments **on the device** (flips, 90-degree rotations, scale, HED stain jitter, Gaussian
  blur), then computes HV targets from the augmented instance map on the device
  (:func:`hv_from_inst`), so targets always agree with the pixels;
* bf16 autocast + channels_last on CUDA, the same code in fp32 on CPU; optional
  ``torch.compile``; gradient clipping; cosine or step LR schedule;
* validates every ``val_every`` steps on the held-out tiles (``val`` split) of the training
  organs: losses, NP Dice, binary PQ (post-processing + :mod:`stlib.metrics`);
* writes ``checkpoint.pt`` atomically every ``ckpt_every`` steps with everything needed to
  resume bit-exactly on CPU (model, optimizer, scheduler, sampler and augmentation
  generators, torch/numpy/python RNG states, step, metric history); rerunning the same
  command resumes; a finished run is skipped. The checkpoint remembers the content of the tile
  stores it trained on: when they were rebuilt since, training starts over instead;
* writes ``model.pt``, ``config.json``, ``metrics.csv`` and ``metrics.json`` (and TensorBoard
  events when ``tensorboard`` is importable).

``bench_main`` measures training throughput (``stlib bench train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stlib.config import coerce_value, resolve_device
from stlib.constants import CLASS_NAMES, N_TYPES
from stlib.model.losses import LossWeights, hovernet_loss
from stlib.model.net import ENCODERS, HoVerNet, build_model, count_params
from stlib.utils import InputError, StlibError, atomic_path, progress, write_json

log = logging.getLogger("stlib.train")

RECIPES = ("st", "pannuke", "manual")  # manual: manual masks of the real-tissue cohort (stlib.realtissue)
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adamw", "adam")
HV_SOURCES = ("device", "masks")
#: config fields that may change between a run and its resumption (they do not change the result)
RESUME_FREE_FIELDS = frozenset({"device", "num_workers", "compile", "log_every", "run_dir"})


class TrainingInterrupted(StlibError):
    """Raised by :func:`train` when ``interrupt_after`` is reached (used to test resumption)."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` beside the weights.

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
    encoder: str = "small"
    n_types: int = N_TYPES
    #: local encoder weight file (never downloaded); "" = random init
    weights: str = ""
    # optimisation
    steps: int = 300
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
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
    #: train on random ``crop_px`` x ``crop_px`` crops of the tiles (0 = whole tiles); a CPU
    #: demo trains ~4x faster on 128 px crops of 256 px tiles, validation uses whole tiles
    crop_px: int = 0
    #: "device" = HV from the augmented instance map with :func:`hv_from_inst`;
    #: "masks" = :func:`stlib.labels.masks.hv_maps` on CPU, then transformed with the tile
    hv_source: str = "device"
    # hardware
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    #: background threads reading batches from the store (0 = read in the training loop)
    num_workers: int = 2
    # bookkeeping
    val_every: int = 100
    #: at most this many validation tiles (the first ones of the split, fixed)
    val_max_tiles: int = 64
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InputError(f"train config: {msg}")

        if self.recipe not in RECIPES:
            bad(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
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


#: fields of :class:`TrainConfig` that a profile's ``03_training`` block sets
_FROM_PARAMS = ("run_dir", "seed", "device", "encoder", "weights", "steps", "batch_size", "lr", "schedule",
                "warmup_steps", "val_every", "val_max_tiles", "compile", "crop_px")

#: The study's training runs by name: the label source (recipe), its tile store and splits.
#: Every run of a profile shares that profile's recipe and budget (``params/{profile}.yaml``).
#: ``pannuke`` trains on every PanNuke tissue (as published), ``pannuke_noheldout`` on the
#: store without the held-out organs' tissues; both train on folds 1-2, so fold 3 is unseen.
#: ``st__<labeler>`` (ablation) trains on the ST tiles labelled by another labeler.
VARIANTS: dict[str, dict[str, Any]] = {
    "st": {"recipe": "st", "stores": ("tiles/st",), "train_splits": ("train",), "val_splits": ("val",)},
    "pannuke": {"recipe": "pannuke", "stores": ("tiles/pannuke",), "train_splits": ("fold1", "fold2"),
                "val_splits": ("fold3",)},
    "pannuke_noheldout": {"recipe": "pannuke", "stores": ("tiles/pannuke_noheldout",),
                          "train_splits": ("fold1", "fold2"), "val_splits": ("fold3",)},
}
#: seeds of the runs of one variant: ``params.seed + SEED_STRIDE * k`` for k = 0 .. n_seeds - 1
SEED_STRIDE = 1000


def variant_spec(variant: str) -> dict[str, Any]:
    """Recipe, stores and splits of a named run (:data:`VARIANTS`, or ``st__<labeler>``)."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    if variant.startswith("st__") and len(variant) > 4:
        return {**VARIANTS["st"], "stores": (f"tiles/{variant}",)}
    raise InputError(f"unknown training run {variant!r}",
                     fix=f"one of {sorted(VARIANTS)} or st__<labeler> (e.g. st__flat)")


def variant_dir(variant: str, seed_index: int = 0) -> str:
    """Output folder (relative to ``run_dir``): ``models/{variant}``, then ``models/{variant}__seed{k}``."""
    if seed_index < 0:
        raise ValueError(f"seed_index must be >= 0, got {seed_index}")
    return f"models/{variant}" if seed_index == 0 else f"models/{variant}__seed{seed_index}"


def variant_config(params: Any, variant: str, *, seed_index: int = 0, **overrides: Any) -> TrainConfig:
    """The config of one run of the study: profile recipe (``params``) + named run + seed.

    Parameters
    ----------
    params
        :class:`stlib.config.TrainParams` (a profile's ``03_training`` block).
    variant
        ``st``, ``pannuke``, ``pannuke_noheldout`` or ``st__<labeler>``.
    seed_index
        Which of the profile's ``n_seeds`` training seeds (seed ``params.seed + 1000 k``; output
        :func:`variant_dir`).
    """
    spec = variant_spec(variant)
    seed = int(getattr(params, "seed", 0)) + SEED_STRIDE * int(seed_index)
    values = {**spec, "seed": seed, "out_dir": variant_dir(variant, seed_index), **overrides}
    return TrainConfig.from_train_params(params, values.pop("recipe"), **values)


def train_or_reuse(config: TrainConfig) -> TrainResult:
    """:func:`train` that starts over when a finished or partial run used another config.

    A notebook rerun with changed parameters must retrain, not fail on the old checkpoint;
    an identical finished run is reused (skipped), an identical interrupted one resumed.
    """
    try:
        return train(config)
    except InputError as e:
        if "different config" not in str(e):
            raise
        log.info("%s: parameters changed since the last run; training starts over", config.out_path())
        return train(config, resume="never")


#: file (under ``run_dir``) where notebook 03 records the study's training runs
STUDY_RUNS_FILE = "models/study_runs.json"


def train_study(params: Any, variants: Sequence[str], *, log_line: Any = None) -> dict[str, dict[int, TrainResult]]:
    """Train every run of ``variants`` x ``params.n_seeds`` seeds (finished runs are reused).

    Records the runs and the recipe in ``{run_dir}/models/study_runs.json`` (:func:`read_study_runs`),
    so the evaluation chapters find every seed and the ablation retrains with the same recipe.
    """
    n = int(getattr(params, "n_seeds", 1))
    if n < 1:
        raise InputError(f"n_seeds must be >= 1, got {n}")
    results: dict[str, dict[int, TrainResult]] = {}
    for variant in variants:
        for k in range(n):
            res = train_or_reuse(variant_config(params, variant, seed_index=k))
            results.setdefault(variant, {})[k] = res
            if log_line is not None:
                log_line(f"{variant} seed {k}: " + ("reused" if res.skipped else f"{res.steps} steps in {res.wall_s:.0f} s"))
    record_study_runs(params, results)
    return results


def record_study_runs(params: Any, results: Mapping[str, Mapping[int, TrainResult]]) -> Path:
    """Write ``models/study_runs.json``: the recipe (``params``) and each run's model per seed."""
    from stlib.config import to_papermill

    run = Path(params.run_dir)
    path = run / STUDY_RUNS_FILE
    old = _read_json_or_empty(path)
    runs = dict(old.get("runs", {}))
    for variant, seeds in results.items():
        runs[variant] = {str(k): os.path.relpath(r.model_path, run) for k, r in sorted(seeds.items())}
    return write_json(path, {"params": to_papermill(params), "runs": runs})


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON file's content, or ``{}`` when it does not exist."""
    from stlib.utils import read_json

    return read_json(path) if Path(path).is_file() else {}


def read_study_runs(run_dir: str | os.PathLike) -> tuple[Any, dict[str, dict[int, Path]]]:
    """The recipe (:class:`stlib.config.TrainParams`) and ``{run: {seed index: model.pt}}`` of a run.

    Raises :class:`InputError` when notebook 03 / :func:`train_study` has not run.
    """
    from stlib.config import make_params

    path = Path(run_dir) / STUDY_RUNS_FILE
    if not path.is_file():
        raise InputError("no record of the training runs", path=path, fix="run notebook 03_training first")
    data = _read_json_or_empty(path)
    params = make_params("03_training", data["params"], source=str(path))
    runs = {v: {int(k): Path(run_dir) / p for k, p in seeds.items()} for v, seeds in data.get("runs", {}).items()}
    missing = [str(p) for seeds in runs.values() for p in seeds.values() if not p.is_file()]
    if missing:
        raise InputError(f"model file(s) of recorded runs missing: {missing[:3]}", path=path,
                         fix="rerun notebook 03_training")
    return params, runs


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


# ----------------------------------------------------------------------------- data


def _open_store(path: Path) -> Any:
    if not (path / "store.json").is_file():
        raise InputError("tile store not found (no store.json)", path=path,
                         fix="build it with `stlib labels ... --tiles` or notebook 02 (or check run_dir / "
                             "stores in the train config)")
    from stlib.io.tiles import TileStore

    return TileStore(path)


class TileData:
    """One or more tile stores seen as a single indexable set of tiles.

    Attributes
    ----------
    meta
        Concatenated ``meta`` with extra columns ``store`` (index into ``paths``) and ``row``.
    tile_px, um_per_px
        From the stores' ``store.json`` (all stores must agree on both).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        import pandas as pd

        self.paths = [Path(p) for p in paths]
        self.stores = [_open_store(p) for p in self.paths]
        infos = [json.loads((p / "store.json").read_text()) for p in self.paths]
        tps = {int(i["tile_px"]) for i in infos}
        ums = {round(float(i["um_per_px"]), 4) for i in infos}
        if len(tps) != 1 or len(ums) != 1:
            raise InputError(f"tile stores disagree on tile_px {sorted(tps)} / um_per_px {sorted(ums)}",
                             path=self.paths[0], fix="build all stores with the same tile size and resolution")
        self.tile_px = tps.pop()
        self.um_per_px = float(infos[0]["um_per_px"])
        metas = []
        for i, s in enumerate(self.stores):
            m = s.meta.reset_index(drop=True).copy()
            for col in ("organ", "split"):
                if col not in m.columns:
                    raise InputError(f"meta.parquet has no {col!r} column", path=self.paths[i])
            m["store"] = i
            m["row"] = np.arange(len(m))
            metas.append(m)
        self.meta = pd.concat(metas, ignore_index=True)

    def __len__(self) -> int:
        return len(self.meta)

    def select(self, splits: Sequence[str], organs: Sequence[str] = (), exclude: Sequence[str] = ()) -> np.ndarray:
        """Global indices of tiles in ``splits`` (and ``organs``, minus ``exclude``), sorted."""
        m = self.meta
        keep = m["split"].astype(str).isin(list(splits)).to_numpy()
        if organs:
            keep &= m["organ"].astype(str).isin(list(organs)).to_numpy()
        if exclude:
            keep &= ~m["organ"].astype(str).isin(list(exclude)).to_numpy()
        return np.flatnonzero(keep)

    def get(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the tiles ``idx`` (global indices, any order, repeats allowed).

        Keys ``images`` (B,T,T,3) uint8, ``inst``, ``type``, ``ignore``, ``conf`` (B,T,T).
        """
        idx = np.asarray(idx, dtype=np.int64)
        st = self.meta["store"].to_numpy()[idx]
        rows = self.meta["row"].to_numpy()[idx]
        parts: dict[str, list] = {}
        order = []
        for s in np.unique(st):
            sel = np.flatnonzero(st == s)
            r = rows[sel]
            uniq, inv = np.unique(r, return_inverse=True)  # sorted reads from the memmap
            b = self.stores[s].get_batch(uniq)
            if "images" not in b:  # stlib.io.tiles.TileStore names the RGB array "image"
                b = {**b, "images": b["image"]}
            for k in ("images", "inst", "type", "ignore", "conf"):
                parts.setdefault(k, []).append(np.asarray(b[k])[inv])
            order.append(sel)
        back = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate(v)[back] for k, v in parts.items()}

    def class_counts(self, idx: np.ndarray, n_types: int = N_TYPES, *, chunk: int = 256) -> np.ndarray:
        """Pixels per class (0..n_types-1) of each tile in ``idx``: ``(len(idx), n_types)``."""
        out = np.zeros((len(idx), n_types), dtype=np.int64)
        for s, path in enumerate(self.paths):
            sel = np.flatnonzero(self.meta["store"].to_numpy()[idx] == s)
            if not len(sel):
                continue
            tmap = np.load(path / "type.npy", mmap_mode="r")
            rows = self.meta["row"].to_numpy()[idx[sel]]
            for a in range(0, len(sel), chunk):
                t = np.asarray(tmap[np.sort(rows[a:a + chunk])])
                order = np.argsort(rows[a:a + chunk], kind="stable")
                flat = t.reshape(len(t), -1).astype(np.int64)
                flat = np.where(flat < n_types, flat, n_types)  # 255 -> overflow bin
                cnt = np.stack([np.bincount(f, minlength=n_types + 1)[:n_types] for f in flat])
                out[sel[a:a + chunk][order]] = cnt
        return out


def tile_weights(organs: Sequence[str], class_counts: np.ndarray | None = None, *,
                 by_organ: bool = True, by_class: bool = True, max_boost: float = 10.0) -> np.ndarray:
    """Sampling weight of each tile, summing to 1.

    Parameters
    ----------
    organs
        Organ of each tile.
    class_counts
        ``(n_tiles, n_types)`` pixels per class (column 0 = background, ignored).
    by_organ
        Every organ gets the same total weight (weight of a tile = 1 / tiles of its organ).
    by_class
        Multiply by a rarity boost: with ``f_c`` the class fractions over all tiles and
        ``p_ic`` the class fractions of tile ``i``, ``boost_i = sum_c p_ic / (K f_c)``
        (``K`` = classes present), so a tile with the average class mix gets 1 and a tile of
        the rarest class the most; clipped to ``[1/max_boost, max_boost]``. Tiles with no
        classified nucleus get 1.
    max_boost
        Clip of the boost.
    """
    organs = np.asarray(organs, dtype=object)
    n = len(organs)
    if n == 0:
        raise InputError("no training tiles", fix="check train_splits / organs in the train config")
    w = np.ones(n, dtype=np.float64)
    if by_organ:
        uniq, inv, cnt = np.unique(organs.astype(str), return_inverse=True, return_counts=True)
        w /= cnt[inv]
    if by_class and class_counts is not None:
        cc = np.asarray(class_counts, dtype=np.float64)[:, 1:]
        tot = cc.sum(axis=0)
        present = tot > 0
        if present.sum() > 1:
            freq = tot / tot.sum()
            inv_f = np.where(present, 1.0 / np.where(present, freq, 1.0), 0.0) / present.sum()
            rows = cc.sum(axis=1)
            frac = cc / np.maximum(rows, 1)[:, None]
            boost = np.where(rows > 0, frac @ inv_f, 1.0)
            w *= np.clip(boost, 1.0 / max_boost, max_boost)
    return w / w.sum()


class BalancedSampler:
    """Weighted sampling with replacement from a private ``torch.Generator``, DDP-sharded.

    Every rank holds the same generator and draws the same global batch; rank ``r`` of
    ``W`` keeps positions ``r, r + W, ...``. The state (generator + draw count) goes into
    checkpoints, so a resumed run draws exactly the same tiles.
    """

    def __init__(self, weights: np.ndarray, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.ndim != 1 or len(w) == 0 or not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError("weights must be a non-empty 1-D array of non-negative numbers with a positive sum")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.weights = w
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self.draws = 0

    def draw(self, global_batch: int) -> np.ndarray:
        """Positions (into ``weights``) of this rank's share of the next global batch."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} not divisible by world size {self.world_size}")
        idx = torch.multinomial(self.weights, global_batch, replacement=True, generator=self.generator)
        self.draws += 1
        return idx[self.rank::self.world_size].numpy()

    def state_dict(self) -> dict[str, Any]:
        """Generator state and number of draws."""
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


# ----------------------------------------------------------------------------- HV targets


def hv_from_inst(inst: torch.Tensor) -> torch.Tensor:
    """HoVer-Net HV maps of a batch of instance maps, vectorised (CPU or GPU).

    For each nucleus, the horizontal (x, along the width) and vertical (y, along the height)
    offsets of its pixels from its centroid (mean pixel position); negative and positive
    offsets are scaled separately by their largest magnitude, so each side spans [-1, 0] or
    [0, 1]. Background is 0.

    Parameters
    ----------
    inst
        ``(B, H, W)`` integer instance ids, 0 = background (ids are per tile).

    Returns
    -------
    ``(B, 2, H, W)`` float32: channel 0 horizontal, channel 1 vertical.
    """
    if inst.ndim != 3:
        raise ValueError(f"inst must be (B, H, W), got {tuple(inst.shape)}")
    b, h, w = inst.shape
    dev = inst.device
    inst = inst.long()
    fg = inst > 0
    out = torch.zeros((b, 2, h, w), dtype=torch.float32, device=dev)
    if not bool(fg.any()):
        return out
    key = inst + torch.arange(b, device=dev).view(b, 1, 1) * (int(inst.max()) + 1)
    _, lab = torch.unique(key[fg], return_inverse=True)
    n = int(lab.max()) + 1
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64),
                            torch.arange(w, device=dev, dtype=torch.float64), indexing="ij")
    ys = ys.expand(b, h, w)[fg]
    xs = xs.expand(b, h, w)[fg]
    cnt = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lab, torch.ones_like(xs))
    for ch, coord in ((0, xs), (1, ys)):
        c = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lab, coord) / cnt
        d = coord - c[lab]
        pos = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce_(0, lab, d.clamp(min=0), "amax")
        neg = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce_(0, lab, (-d).clamp(min=0), "amax")
        scale = torch.where(d > 0, pos[lab], neg[lab])
        val = torch.where(scale > 0, d / scale.clamp(min=1e-12), torch.zeros_like(d))
        plane = out[:, ch]
        plane[fg] = val.float()
    return out


def _hv_from_masks(inst: np.ndarray) -> np.ndarray:
    from stlib.labels.masks import hv_maps

    return np.stack([np.asarray(hv_maps(t), dtype=np.float32) for t in inst])


# ----------------------------------------------------------------------------- augmentation

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


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """Rank layout from the ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read the torchrun variables (absent = single process)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that logs and writes)."""
        return self.rank == 0


def _resolve_train_device(config: TrainConfig, dist: DistInfo) -> torch.device:
    dev = resolve_device(config.device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {dev!r} requested but CUDA is not available", fix="use --set device=cpu")
        if dist.enabled:
            torch.cuda.set_device(dist.local_rank)
            return torch.device("cuda", dist.local_rank)
    return torch.device(dev)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: Path
    model_path: Path
    steps: int
    final: dict[str, float]
    history: list[dict[str, Any]]
    resumed_from: int | None = None
    skipped: bool = False
    wall_s: float = 0.0


def _lr_lambda(config: TrainConfig):
    steps, warm = config.steps, config.warmup_steps
    miles = sorted(int(round(f * steps)) for f in config.step_milestones)

    def f(i: int) -> float:  # i = number of scheduler steps taken so far
        if warm and i < warm:
            return (i + 1) / warm
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "step":
            return config.step_gamma ** sum(i >= m for m in miles)
        t = min(1.0, (i - warm) / max(1, steps - warm))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=tuple(config.betas))


def _to_device(b: Mapping[str, np.ndarray], device: torch.device, hv: np.ndarray | None) -> dict[str, torch.Tensor]:
    nb = device.type == "cuda"

    def t(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a))
        return (x.pin_memory() if nb else x).to(device, non_blocking=nb)

    out = {"image": t(b["images"]).permute(0, 3, 1, 2).float().div_(255.0),
           "inst": t(b["inst"]).long(), "type": t(b["type"]), "ignore": t(b["ignore"]), "conf": t(b["conf"])}
    if hv is not None:
        out["hv"] = t(hv)
    return out


def _autocast(device: torch.device, enabled: bool):
    import contextlib

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_states(device: torch.device) -> dict[str, Any]:
    ns = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [ns[0], ns[1].tolist(), int(ns[2]), int(ns[3]), float(ns[4])],
          "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_states(st: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _data_key(stores: Sequence[Path]) -> str | None:
    """Content key of the tile stores a run trains on.

    ``store.json`` and ``meta.parquet`` are hashed whole; each array file by its size and 16
    chunks of 64 KiB spread over it (a fingerprint: hashing gigabytes of tiles on every start
    would cost more than it protects). A checkpoint remembers the key, so a rebuilt store (new
    labels, new refinement, new splits) is not mistaken for the data a finished or interrupted
    run was trained on. ``None`` when a store is missing (the data loader then reports it).
    """
    h = hashlib.sha256()
    for p in stores:
        p = Path(p)
        for name in ("store.json", "meta.parquet"):
            f = p / name
            if not f.is_file():
                return None
            h.update(name.encode())
            h.update(f.read_bytes())
        for f in sorted(p.glob("*.npy")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for k in range(16):
                    fh.seek(size * k // 16)
                    h.update(fh.read(1 << 16))
    return h.hexdigest()


def _comparable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE_FIELDS}


def _write_metrics(out: Path, history: list[dict[str, Any]], extra: Mapping[str, Any]) -> None:
    import pandas as pd

    write_json(out / "metrics.json", {"history": history, **extra})
    if history:
        with atomic_path(out / "metrics.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)


class _Batches:
    """Ordered batch reader: indices drawn in step order, arrays read by a thread pool."""

    def __init__(self, data: TileData, train_idx: np.ndarray, sampler: BalancedSampler, batch: int,
                 n_steps: int, workers: int, hv_masks: bool) -> None:
        self.data, self.train_idx, self.sampler = data, train_idx, sampler
        self.batch, self.remaining, self.hv_masks = batch, n_steps, hv_masks
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.queue: deque[tuple[dict[str, Any], Future | dict]] = deque()
        self.depth = max(1, workers + 1)

    def _read(self, idx: np.ndarray) -> dict[str, Any]:
        b = self.data.get(self.train_idx[idx])
        b["hv"] = _hv_from_masks(b["inst"]) if self.hv_masks else None
        return b

    def _fill(self) -> None:
        while self.remaining > 0 and len(self.queue) < self.depth:
            idx = self.sampler.draw(self.batch)
            state = self.sampler.state_dict()
            self.remaining -= 1
            job = self.pool.submit(self._read, idx) if self.pool else self._read(idx)
            self.queue.append((state, job))

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        while True:
            self._fill()
            if not self.queue:
                return
            state, job = self.queue.popleft()
            yield state, (job.result() if isinstance(job, Future) else job)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _validate(model: HoVerNet, data: TileData, val_idx: np.ndarray, device: torch.device,
              config: TrainConfig) -> dict[str, float]:
    """Validation on fixed tiles, no augmentation: mean loss terms (``val_<term>``, ``val_loss``),
    binary Dice of NP >= 0.5 pooled over pixels (``val_dice``) and mean binary PQ per tile after
    post-processing (``val_bpq``; ignored pixels are removed from truth and prediction)."""
    try:
        from stlib.metrics import pq
        from stlib.model.postproc import hovernet_postprocess
    except ImportError as e:  # pragma: no cover - present in the finished package
        log.warning("validation PQ skipped: %s", e)
        pq = hovernet_postprocess = None
    model.eval()
    sums: dict[str, float] = {}
    n_batches = 0
    inter = denom = 0.0
    pqs: list[float] = []
    bs = max(1, config.batch_size)
    with torch.no_grad():
        for a in range(0, len(val_idx), bs):
            b = data.get(val_idx[a:a + bs])
            t = _to_device(b, device, None)
            t["hv"] = hv_from_inst(t["inst"])
            x = t["image"].contiguous(memory_format=torch.channels_last) if _use_cl(config, device) else t["image"]
            with _autocast(device, config.amp):
                out = model(x)
            _, terms = hovernet_loss(out, inst=t["inst"], hv=t["hv"], type_map=t["type"], ignore=t["ignore"],
                                     conf=t["conf"], weights=config.loss)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            prob = out["np"].float().softmax(1)[:, 1]
            valid = t["ignore"] == 0
            pred = (prob >= 0.5) & valid
            true = (t["inst"] > 0) & valid
            inter += float((pred & true).sum())
            denom += float(pred.sum() + true.sum())
            if pq is not None:
                prob_np = (prob * valid).cpu().numpy()
                hv_np = out["hv"].float().cpu().numpy()
                inst_true = b["inst"] * (b["ignore"] == 0)
                for i in range(len(prob_np)):
                    pred_inst = hovernet_postprocess(prob_np[i], hv_np[i])[0]
                    pqs.append(float(pq(inst_true[i], pred_inst).pq))
    model.train()
    res = {f"val_{k}": v / max(1, n_batches) for k, v in sums.items()}
    res["val_loss"] = sum(getattr(config.loss, k) * res[f"val_{k}"] for k in sums)
    res["val_dice"] = 2 * inter / denom if denom > 0 else float("nan")
    res["val_bpq"] = float(np.nanmean(pqs)) if pqs else float("nan")
    return res


def _use_cl(config: TrainConfig, device: torch.device) -> bool:
    return config.channels_last and device.type == "cuda"


def _model_file(model: HoVerNet, config: TrainConfig, data_info: Mapping[str, Any]) -> dict[str, Any]:
    from stlib import __version__

    return {"config": config.to_dict(), "state_dict": model.state_dict(), "class_names": dict(CLASS_NAMES),
            "um_per_px": float(data_info["um_per_px"]), "tile_px": int(data_info["tile_px"]),
            "stlib_version": __version__}


def train(config: TrainConfig, *, resume: str = "auto", interrupt_after: int | None = None) -> TrainResult:
    """Train (or resume, or skip a finished run) as described in the module docstring.

    Parameters
    ----------
    config
        The run's configuration.
    resume
        ``"auto"``: continue from ``checkpoint.pt`` in the output folder when present (its
        config must match, except :data:`RESUME_FREE_FIELDS`); a finished run is skipped.
        ``"never"``: start from scratch, overwriting the output folder's files.
    interrupt_after
        Testing hook: raise :class:`TrainingInterrupted` right after this step (after its
        checkpoint, if one is due), as if the process had been killed.

    Returns
    -------
    :class:`TrainResult`; ``final`` holds the last training-loss terms and validation metrics.
    """
    if resume not in ("auto", "never"):
        raise InputError(f"resume must be 'auto' or 'never', got {resume!r}")
    dist = DistInfo.from_env()
    device = _resolve_train_device(config, dist)
    started_pg = False
    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        started_pg = True
    try:
        return _train(config, device, dist, resume, interrupt_after)
    finally:
        if started_pg:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, dist: DistInfo, resume: str,
           interrupt_after: int | None) -> TrainResult:
    """The steps of :func:`train`: checkpoint, data, model (:class:`_Run`), loop, final model."""
    t_start = time.time()
    out = config.out_path()
    ckpt_path, model_path = out / "checkpoint.pt", out / "model.pt"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data_key = _data_key(config.store_paths())
    ckpt = _usable_checkpoint(config, ckpt_path, data_key, dist) if resume == "auto" else None
    if ckpt is not None and int(ckpt["step"]) >= config.steps and model_path.is_file():
        if dist.is_main:
            log.info("%s: finished run found (step %d); skipping", out, ckpt["step"])
        hist = list(ckpt["history"])
        return TrainResult(out, model_path, int(ckpt["step"]), _final(hist), hist,
                           resumed_from=int(ckpt["step"]), skipped=True)
    if config.batch_size % dist.world_size:
        raise InputError(f"batch_size {config.batch_size} is not divisible by {dist.world_size} processes")
    data, train_idx, val_idx, weights = _training_data(config)
    run = _Run.build(config, device, dist, weights, ckpt, out)
    _loop(run, config, device, dist, data, train_idx, val_idx, data_key=data_key, ckpt_path=ckpt_path,
          t_start=t_start, interrupt_after=interrupt_after)
    final = _save_final(run, config, device, dist, data, out, model_path)
    return TrainResult(out, model_path, config.steps, final, run.history, resumed_from=run.start or None,
                       wall_s=time.time() - t_start)


def _usable_checkpoint(config: TrainConfig, ckpt_path: Path, data_key: str | None,
                       dist: DistInfo) -> dict[str, Any] | None:
    """The checkpoint to resume from: None when absent or written for other tile stores; an
    error when written with another config."""
    if not ckpt_path.is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("data_key") != data_key:
        # the tile stores were rebuilt (other labels, other refinement, other tiles) since
        # this checkpoint: neither resuming nor skipping would train on the current data
        if dist.is_main:
            log.warning("%s: the tile stores changed since checkpoint step %s; training starts over",
                        ckpt_path.parent, ckpt.get("step"))
        return None
    if _comparable(ckpt["config"]) != _comparable(config.to_dict()):
        diff = sorted(k for k in _comparable(config.to_dict())
                      if ckpt["config"].get(k) != config.to_dict().get(k))
        raise InputError(f"checkpoint was written with a different config (fields {diff})", path=ckpt_path,
                         fix="rerun with the same config, use --resume never, or choose another out_dir")
    return ckpt


def _training_data(config: TrainConfig) -> tuple[TileData, np.ndarray, np.ndarray, np.ndarray]:
    """The tile stores, the training and validation tiles and the sampling weight of each training tile."""
    data = TileData(config.store_paths())
    train_idx = data.select(config.train_splits, config.organs, config.exclude_organs)
    val_idx = data.select(config.val_splits, config.organs, config.exclude_organs)[: config.val_max_tiles]
    if not len(train_idx):
        raise InputError(f"no tiles in splits {list(config.train_splits)} (organs {list(config.organs) or 'all'})",
                         path=data.paths[0], fix="check train_splits / organs against meta.parquet")
    counts = data.class_counts(train_idx, config.n_types) if config.balance_class else None
    weights = tile_weights(data.meta["organ"].to_numpy()[train_idx], counts, by_organ=config.balance_organ,
                           by_class=config.balance_class, max_boost=config.max_class_boost)
    if config.hv_source == "masks":
        import stlib.labels.masks  # noqa: F401  (fail early when missing)
    return data, train_idx, val_idx, weights


@dataclass
class _Run:
    """The state of a training run: model (and its DDP / compiled forward), optimiser, schedule,
    sampler, augmentation generator, history and the step it starts from."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    fwd: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    sampler: BalancedSampler
    aug_gen: torch.Generator
    history: list[dict[str, Any]]
    start: int

    @classmethod
    def build(cls, config: TrainConfig, device: torch.device, dist: DistInfo, weights: np.ndarray,
              ckpt: Mapping[str, Any] | None, out: Path) -> _Run:
        """Seeded model, optimiser, schedule and sampler, restored from ``ckpt`` when given."""
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        model = build_model(config).to(device)
        if _use_cl(config, device):
            model = model.to(memory_format=torch.channels_last)
        opt = _make_optimizer(model, config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        sampler = BalancedSampler(weights, seed=config.seed + 1, rank=dist.rank, world_size=dist.world_size)
        aug_gen = torch.Generator().manual_seed(config.seed + 2)
        history: list[dict[str, Any]] = []
        start = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            sampler.load_state_dict(ckpt["sampler"])
            aug_gen.set_state(ckpt["aug_rng"])
            _set_rng_states(ckpt["rng"], device)
            history = list(ckpt["history"])
            start = int(ckpt["step"])
            if dist.is_main:
                log.info("resuming %s from step %d", out, start)
        raw_model = model
        fwd: torch.nn.Module = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if device.type == "cuda":
                # the conversion keeps the same Parameter objects, so the optimizer stays valid
                raw_model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                fwd = DDP(model, device_ids=[device.index])
            else:
                fwd = DDP(model)
        if config.compile:
            fwd = torch.compile(fwd)
        return cls(model, raw_model, fwd, opt, sched, sampler, aug_gen, history, start)


def _summary_writer(out: Path, dist: DistInfo) -> Any:
    """TensorBoard writer of the main process (None elsewhere or without tensorboard)."""
    if not dist.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except ImportError:
        return None


def _step(run: _Run, b: Mapping[str, Any], config: TrainConfig, device: torch.device, dist: DistInfo,
          step: int) -> dict[str, float]:
    """One optimiser step on batch ``b``; the loss and its terms, averaged over the ranks."""
    t = _to_device(b, device, b.get("hv"))
    p = shard_params(draw_augment_params(run.aug_gen, config.batch_size, config), dist.rank, dist.world_size)
    t = augment_batch(t, p)
    if config.hv_source == "device":
        t["hv"] = hv_from_inst(t["inst"])
    x = t["image"].contiguous(memory_format=torch.channels_last) if _use_cl(config, device) else t["image"]
    with _autocast(device, config.amp):
        outputs = run.fwd(x)
    loss, terms = hovernet_loss(outputs, inst=t["inst"], hv=t["hv"], type_map=t["type"],
                                ignore=t["ignore"], conf=t["conf"], weights=config.loss)
    if not torch.isfinite(loss):
        raise StlibError(f"step {step}: loss is {float(loss)}; lower lr or check the tile store")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.opt.step()
    run.sched.step()
    vec = torch.stack([loss.detach(), *terms.values()]).float()
    if dist.enabled:
        torch.distributed.all_reduce(vec)
        vec /= dist.world_size
    return dict(zip(["loss", *terms], vec.tolist()))


def _loop(run: _Run, config: TrainConfig, device: torch.device, dist: DistInfo, data: TileData,
          train_idx: np.ndarray, val_idx: np.ndarray, *, data_key: str | None, ckpt_path: Path, t_start: float,
          interrupt_after: int | None) -> None:
    """Steps ``start + 1 .. steps``: logging every ``log_every``, validation every ``val_every`` and a
    resumable checkpoint every ``ckpt_every`` steps (and at the last)."""
    out = ckpt_path.parent
    writer = _summary_writer(out, dist)
    data_info = {"um_per_px": data.um_per_px, "tile_px": data.tile_px}
    batches = _Batches(data, train_idx, run.sampler, config.batch_size, config.steps - run.start,
                       config.num_workers, config.hv_source == "masks")
    acc: dict[str, float] = {}
    n_acc = 0
    run.model.train()
    bar = progress(range(run.start + 1, config.steps + 1), desc=f"train {config.recipe}",
                   total=config.steps - run.start, disable=None if dist.is_main else True)
    try:
        for step, (sampler_state, b) in zip(bar, batches):
            for k, v in _step(run, b, config, device, dist, step).items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            row: dict[str, Any] | None = None
            if step % config.log_every == 0 or step % config.val_every == 0 or step == config.steps:
                row = {"step": step, "lr": run.opt.param_groups[0]["lr"], **{k: v / n_acc for k, v in acc.items()}}
                acc, n_acc = {}, 0
            if step % config.val_every == 0 or step == config.steps:
                if dist.is_main and len(val_idx):
                    row = {**(row or {"step": step}), **_validate(run.raw_model, data, val_idx, device, config)}
                if dist.enabled:
                    torch.distributed.barrier()
            if row is not None and dist.is_main:
                row["elapsed_s"] = round(time.time() - t_start, 3)
                run.history.append(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
                if writer is not None:
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, step)
            if step % config.ckpt_every == 0 or step == config.steps:
                if dist.is_main:
                    state = {**_model_file(run.raw_model, config, data_info), "optimizer": run.opt.state_dict(),
                             "scheduler": run.sched.state_dict(), "sampler": sampler_state,
                             "aug_rng": run.aug_gen.get_state(), "rng": _rng_states(device), "step": step,
                             "history": run.history, "data_key": data_key}
                    with atomic_path(ckpt_path) as tmp:
                        torch.save(state, tmp)
                    _write_metrics(out, run.history, {"config": config.to_dict(), "step": step})
                if dist.enabled:
                    torch.distributed.barrier()
            if interrupt_after is not None and step == interrupt_after:
                raise TrainingInterrupted(f"interrupted after step {step} (test hook)")
    finally:
        batches.close()
        if writer is not None:
            writer.close()


def _save_final(run: _Run, config: TrainConfig, device: torch.device, dist: DistInfo, data: TileData, out: Path,
                model_path: Path) -> dict[str, float]:
    """``model.pt``, ``config.json`` and the final metrics (with the ranks' weight digests under DDP)."""
    digests = None
    if dist.enabled:
        digests = [None] * dist.world_size
        torch.distributed.all_gather_object(digests, _param_digest(run.raw_model))
        if len(set(digests)) > 1 and dist.is_main:
            log.warning("DDP ranks ended with different weights: %s", digests)
    final = _final(run.history)
    if dist.is_main:
        data_info = {"um_per_px": data.um_per_px, "tile_px": data.tile_px}
        with atomic_path(model_path) as tmp:
            torch.save(_model_file(run.raw_model, config, data_info), tmp)
        write_json(out / "config.json", config.to_dict())
        extra: dict[str, Any] = {"config": config.to_dict(), "step": config.steps, "final": final,
                                 "device": str(device), "world_size": dist.world_size,
                                 "n_params": count_params(run.raw_model), "param_digest": _param_digest(run.raw_model)}
        if digests is not None:
            extra["ddp_param_digests"] = digests
        _write_metrics(out, run.history, extra)
    return final


def _final(history: list[dict[str, Any]]) -> dict[str, float]:
    final: dict[str, float] = {}
    for row in history:  # last value of every column
        final.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return final


# ----------------------------------------------------------------------------- CLI


def cli_main(argv: list[str]) -> int:
    """``stlib train (--profile P [--run NAME] [--seed-index K] | --config FILE) [--set key=value ...]``."""
    p = argparse.ArgumentParser(
        prog="stlib train",
        description="Train the HoVer-Net-style network on a tile store. The recipe of a profile comes from "
                    "params/{profile}.yaml (block 03_training), its one source; --config takes a TrainConfig "
                    "YAML/JSON instead (e.g. the config.json of a trained model). Under torchrun "
                    "(WORLD_SIZE > 1) it runs data-parallel.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="demo | workshop | paper | a params YAML: its 03_training recipe")
    src.add_argument("--config", help="a YAML/JSON file of TrainConfig keys (e.g. models/st/config.json)")
    p.add_argument("--run", default="st", metavar="NAME",
                   help=f"with --profile: the training run, one of {sorted(VARIANTS)} or st__<labeler> (default st)")
    p.add_argument("--seed-index", type=int, default=0, help="with --profile: which training seed (0 = the first)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; loss.nt_ce=0.5 for nested keys); repeatable")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from checkpoint.pt / skip a finished run (default); never: start over")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.profile:
        from stlib.config import load_params, make_params

        params = make_params("03_training", load_params(args.profile, "03_training"))
        base = variant_config(params, args.run, seed_index=args.seed_index).to_dict()
        config = TrainConfig.from_dict(apply_overrides(base, args.overrides), source=f"profile {args.profile}")
    else:
        config = TrainConfig.from_yaml(args.config, overrides=args.overrides)
    res = train(config, resume=args.resume)
    if DistInfo.from_env().is_main:
        keys = ("loss", "val_loss", "val_dice", "val_bpq")
        summary = ", ".join(f"{k}={res.final[k]:.4f}" for k in keys if k in res.final)
        state = "already finished" if res.skipped else f"{res.steps} steps in {res.wall_s:.1f}s"
        print(f"stlib train: {state}; {summary}; model: {res.model_path}")
    return 0


__all__ = [
    "VARIANTS", "SEED_STRIDE", "variant_spec", "variant_dir", "variant_config", "train_or_reuse", "train_study",
    "record_study_runs", "read_study_runs", "STUDY_RUNS_FILE",
    "TrainConfig", "TrainResult", "TrainingInterrupted", "train", "cli_main", "TileData",
    "BalancedSampler", "tile_weights", "hv_from_inst", "augment_batch", "draw_augment_params", "shard_params",
    "rgb_to_hed", "hed_to_rgb", "apply_overrides", "DistInfo",
]

if __name__ == "__main__":  # torchrun -m stlib.train --profile paper --run st
    sys.exit(cli_main(sys.argv[1:]))
