"""The training loop: :func:`train` (one entry point for a laptop CPU, one GPU and ``torchrun``
DDP), the optimiser step, validation and the run's schedule.

* bf16 autocast + channels_last on CUDA, the same code in fp32 on CPU (channels_last there with
  ``channels_last_cpu``); optional
  ``torch.compile``; gradient clipping; cosine, step or constant LR schedule with warm-up;
* each step augments on the device (:mod:`stlib.train.augment`) and computes HV targets from
  the augmented instance map (:func:`stlib.train.data.hv_from_inst`);
* validates every ``val_every`` steps on the held-out tiles (``val`` split) of the training
  organs: losses, NP Dice, binary PQ (post-processing + :mod:`stlib.metrics`);
* checkpoints every ``ckpt_every`` steps (:mod:`stlib.train.checkpoint`); rerunning the same
  command resumes, a finished run is skipped;
* under DDP every rank draws the same global batch and augmentation parameters and keeps its
  stride; the loss terms are averaged over the ranks.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.config import resolve_device
from stlib.model.losses import hovernet_loss
from stlib.model.net import HoVerNet, build_model, count_params
from stlib.train.augment import augment_batch, draw_augment_params, shard_params
from stlib.train.checkpoint import (final_metrics, model_file, param_digest, restore_checkpoint, save_checkpoint,
                                    stores_key, usable_checkpoint, write_metrics)
from stlib.train.config import TrainConfig
from stlib.train.data import BalancedSampler, Batches, TileData, hv_from_inst, to_device, training_data
from stlib.utils import InputError, StlibError, atomic_path, progress, write_json

log = logging.getLogger("stlib.train")


class TrainingInterrupted(StlibError):
    """Raised by :func:`train` when ``interrupt_after`` is reached (used to test resumption)."""


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


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/Adam of ``config``; weight decay on weight matrices and kernels only (not on biases and norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=tuple(config.betas))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU (which trains in fp32)."""
    import contextlib

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
            t = to_device(b, device, None)
            t["hv"] = hv_from_inst(t["inst"])
            x = t["image"].contiguous(memory_format=torch.channels_last) if _use_cl(config, device) else t["image"]
            with autocast(device, config.amp):
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
    return config.channels_last and (device.type == "cuda" or (device.type == "cpu" and config.channels_last_cpu))


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
    data_key = stores_key(config.store_paths())
    ckpt = usable_checkpoint(config, ckpt_path, data_key, dist.is_main) if resume == "auto" else None
    if ckpt is not None and int(ckpt["step"]) >= config.steps and model_path.is_file():
        if dist.is_main:
            log.info("%s: finished run found (step %d); skipping", out, ckpt["step"])
        hist = list(ckpt["history"])
        return TrainResult(out, model_path, int(ckpt["step"]), final_metrics(hist), hist,
                           resumed_from=int(ckpt["step"]), skipped=True)
    if config.batch_size % dist.world_size:
        raise InputError(f"batch_size {config.batch_size} is not divisible by {dist.world_size} processes")
    data, train_idx, val_idx, weights = training_data(config)
    run = _Run.build(config, device, dist, weights, ckpt, out)
    _loop(run, config, device, dist, data, train_idx, val_idx, data_key=data_key, ckpt_path=ckpt_path,
          t_start=t_start, interrupt_after=interrupt_after)
    final = _save_final(run, config, device, dist, data, out, model_path)
    return TrainResult(out, model_path, config.steps, final, run.history, resumed_from=run.start or None,
                       wall_s=time.time() - t_start)


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
        opt = make_optimizer(model, config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        sampler = BalancedSampler(weights, seed=config.seed + 1, rank=dist.rank, world_size=dist.world_size)
        aug_gen = torch.Generator().manual_seed(config.seed + 2)
        history: list[dict[str, Any]] = []
        start = 0
        if ckpt is not None:
            history, start = restore_checkpoint(ckpt, model=model, opt=opt, sched=sched, sampler=sampler,
                                                aug_gen=aug_gen, device=device)
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
    t = to_device(b, device, b.get("hv"))
    p = shard_params(draw_augment_params(run.aug_gen, config.batch_size, config), dist.rank, dist.world_size)
    t = augment_batch(t, p)
    if config.hv_source == "device":
        t["hv"] = hv_from_inst(t["inst"])
    x = t["image"].contiguous(memory_format=torch.channels_last) if _use_cl(config, device) else t["image"]
    with autocast(device, config.amp):
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
    batches = Batches(data, train_idx, run.sampler, config.batch_size, config.steps - run.start,
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
                    save_checkpoint(ckpt_path, model=run.raw_model, config=config, data_info=data_info, opt=run.opt,
                                    sched=run.sched, sampler_state=sampler_state, aug_gen=run.aug_gen, device=device,
                                    step=step, history=run.history, data_key=data_key)
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
        torch.distributed.all_gather_object(digests, param_digest(run.raw_model))
        if len(set(digests)) > 1 and dist.is_main:
            log.warning("DDP ranks ended with different weights: %s", digests)
    final = final_metrics(run.history)
    if dist.is_main:
        data_info = {"um_per_px": data.um_per_px, "tile_px": data.tile_px}
        with atomic_path(model_path) as tmp:
            torch.save(model_file(run.raw_model, config, data_info), tmp)
        write_json(out / "config.json", config.to_dict())
        extra: dict[str, Any] = {"config": config.to_dict(), "step": config.steps, "final": final,
                                 "device": str(device), "world_size": dist.world_size,
                                 "n_params": count_params(run.raw_model), "param_digest": param_digest(run.raw_model)}
        if digests is not None:
            extra["ddp_param_digests"] = digests
        write_metrics(out, run.history, extra)
    return final
