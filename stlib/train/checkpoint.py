"""Checkpoints and model files: save, load, resume.

``checkpoint.pt`` (:func:`save_checkpoint`) holds everything needed to resume bit-exactly on CPU
(model, optimizer, scheduler, sampler and augmentation generators, torch/numpy/python RNG
states, step, metric history) and the content key of the tile stores trained on
(:func:`stores_key`): when they were rebuilt since, :func:`usable_checkpoint` makes training start
over. ``model.pt`` is :func:`model_file` (the format in DEVELOPING.md).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.constants import CLASS_NAMES
from stlib.model.net import HoVerNet
from stlib.train.config import ADDED_FIELD_DEFAULTS, RESUME_FREE_FIELDS, TrainConfig
from stlib.train.data import BalancedSampler
from stlib.utils import InputError, atomic_path, write_json

log = logging.getLogger("stlib.train")


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters (names and values): DDP ranks must end with the same digest."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rng_states(device: torch.device) -> dict[str, Any]:
    """The torch, numpy, python (and CUDA) random states, for a checkpoint."""
    ns = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [ns[0], ns[1].tolist(), int(ns[2]), int(ns[3]), float(ns[4])],
          "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_states(st: Mapping[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_states`."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def stores_key(stores: Sequence[Path]) -> str | None:
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


def comparable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without :data:`~stlib.train.config.RESUME_FREE_FIELDS` (what must match to resume);
    fields it lacks that were added later (:data:`~stlib.train.config.ADDED_FIELD_DEFAULTS`) at their defaults."""
    return {k: v for k, v in {**ADDED_FIELD_DEFAULTS, **cfg}.items() if k not in RESUME_FREE_FIELDS}


def write_metrics(out: Path, history: list[dict[str, Any]], extra: Mapping[str, Any]) -> None:
    """``metrics.json`` (history + ``extra``) and ``metrics.csv`` (history) in ``out``, atomically."""
    import pandas as pd

    write_json(out / "metrics.json", {"history": history, **extra})
    if history:
        with atomic_path(out / "metrics.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)


def model_file(model: HoVerNet, config: TrainConfig, data_info: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``model.pt``: config, weights, class table, ``um_per_px``, ``tile_px``, stlib version."""
    from stlib import __version__

    return {"config": config.to_dict(), "state_dict": model.state_dict(), "class_names": dict(CLASS_NAMES),
            "um_per_px": float(data_info["um_per_px"]), "tile_px": int(data_info["tile_px"]),
            "stlib_version": __version__}


#: post-processing settings a model file may carry (:func:`write_postproc`); ``mode``, ``marker_h`` and
#: ``hv_weight`` (``marker_dist``: mode "peaks") choose and tune the marker mode of
#: :func:`stlib.model.postproc.hovernet_postprocess`
POSTPROC_KEYS = ("np_thresh", "marker_thresh", "min_size", "mode", "marker_h", "hv_weight", "marker_dist")


def postproc_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Post-processing settings with the types a model file stores (``min_size`` int, ``mode`` str, the
    rest float), so that equal settings compare and serialise equal wherever they come from."""
    return {k: (int(v) if k == "min_size" else str(v) if k == "mode" else float(v)) for k, v in settings.items()}


def write_postproc(path: str | Path, settings: Mapping[str, float | int]) -> Path:
    """Store post-processing settings in ``model.pt`` (key ``postproc``), rewriting it atomically.

    ``stlib infer`` (:func:`stlib.infer.load_inference_model`) uses them unless its options say
    otherwise, so a model travels with the thresholds chosen for it. ``settings``: some of
    :data:`POSTPROC_KEYS`; an empty mapping removes the key. Idempotent.
    """
    path = Path(path)
    bad = sorted(set(settings) - set(POSTPROC_KEYS))
    if bad:
        raise InputError(f"unknown post-processing setting(s) {bad}", fix=f"known: {list(POSTPROC_KEYS)}")
    doc = torch.load(path, map_location="cpu", weights_only=True)
    from stlib.model.postproc import POSTPROC_MODES

    if "mode" in settings and settings["mode"] not in POSTPROC_MODES:
        raise InputError(f"unknown post-processing mode {settings['mode']!r}", fix=f"known: {list(POSTPROC_MODES)}")
    new = postproc_values(settings)
    if doc.get("postproc", {}) == new or (not new and "postproc" not in doc):
        return path
    if new:
        doc["postproc"] = new
    else:
        doc.pop("postproc", None)
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)
    return path


def usable_checkpoint(config: TrainConfig, ckpt_path: Path, data_key: str | None,
                      is_main: bool = True) -> dict[str, Any] | None:
    """The checkpoint to resume from: None when absent or written for other tile stores; an
    error when written with another config."""
    if not ckpt_path.is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("data_key") != data_key:
        # the tile stores were rebuilt (other labels, other refinement, other tiles) since
        # this checkpoint: neither resuming nor skipping would train on the current data
        if is_main:
            log.warning("%s: the tile stores changed since checkpoint step %s; training starts over",
                        ckpt_path.parent, ckpt.get("step"))
        return None
    if comparable_config(ckpt["config"]) != comparable_config(config.to_dict()):
        diff = sorted(k for k in comparable_config(config.to_dict())
                      if ckpt["config"].get(k) != config.to_dict().get(k))
        raise InputError(f"checkpoint was written with a different config (fields {diff})", path=ckpt_path,
                         fix="rerun with the same config, use --resume never, or choose another out_dir")
    return ckpt


def save_checkpoint(ckpt_path: Path, *, model: torch.nn.Module, config: TrainConfig, data_info: Mapping[str, Any],
                    opt: torch.optim.Optimizer, sched: Any, sampler_state: Mapping[str, Any],
                    aug_gen: torch.Generator, device: torch.device, step: int, history: list[dict[str, Any]],
                    data_key: str | None) -> None:
    """Write ``checkpoint.pt`` (atomically) with everything needed to resume bit-exactly after
    ``step``, and the metrics so far (``metrics.json``, ``metrics.csv``) beside it.

    ``sampler_state`` is the sampler's state after the draw of this step's batch (the batch
    reader draws ahead); ``data_key`` is :func:`stores_key` of the tile stores trained on.
    """
    state = {**model_file(model, config, data_info), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "sampler": sampler_state,
             "aug_rng": aug_gen.get_state(), "rng": rng_states(device), "step": step,
             "history": history, "data_key": data_key}
    with atomic_path(ckpt_path) as tmp:
        torch.save(state, tmp)
    write_metrics(ckpt_path.parent, history, {"config": config.to_dict(), "step": step})


def restore_checkpoint(ckpt: Mapping[str, Any], *, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                       sampler: BalancedSampler, aug_gen: torch.Generator,
                       device: torch.device) -> tuple[list[dict[str, Any]], int]:
    """Load a checkpoint of :func:`save_checkpoint` into a freshly built run (in place); returns
    the metric history and the step to continue from."""
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    sampler.load_state_dict(ckpt["sampler"])
    aug_gen.set_state(ckpt["aug_rng"])
    set_rng_states(ckpt["rng"], device)
    return list(ckpt["history"]), int(ckpt["step"])


def final_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last value of every numeric column of the metric history."""
    final: dict[str, float] = {}
    for row in history:  # last value of every column
        final.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return final
