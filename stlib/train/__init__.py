"""Train the HoVer-Net-style network on a tile store: ``stlib train --config FILE``.

One entry point serves a laptop CPU, one GPU and ``torchrun`` (DDP). The stage in steps, one
module each:

* :mod:`stlib.train.config` - :class:`TrainConfig`, everything a run depends on (saved as
  ``config.json`` beside the weights), and ``key=value`` overrides;
* :mod:`stlib.train.data` - reads one or more tile stores (:mod:`stlib.io.tiles` format) and
  splits them by the ``split`` column (never by overlapping patches); draws training tiles with
  a **balanced sampler** (each organ the same total weight, tiles rich in rare classes
  up-weighted) from its own ``torch.Generator``; under DDP every rank draws the same global
  batch and keeps its own stride of it; HV targets from instance maps (:func:`hv_from_inst`);
* :mod:`stlib.train.augment` - augments **on the device** (flips, 90-degree rotations, scale,
  HED stain jitter, Gaussian blur); HV targets are computed from the augmented instance map,
  so they always agree with the pixels;
* :mod:`stlib.train.loop` - :func:`train`: bf16 autocast + channels_last on CUDA, the same code
  in fp32 on CPU (in channels_last there with ``channels_last_cpu``); optional ``torch.compile``;
  gradient clipping; cosine or step LR schedule;
  validates every ``val_every`` steps on the held-out tiles (``val`` split) of the training
  organs: losses, NP Dice, binary PQ (post-processing + :mod:`stlib.metrics`);
* :mod:`stlib.train.checkpoint` - writes ``checkpoint.pt`` atomically every ``ckpt_every`` steps
  with everything needed to resume bit-exactly on CPU (model, optimizer, scheduler, sampler and
  augmentation generators, torch/numpy/python RNG states, step, metric history); rerunning the
  same command resumes; a finished run is skipped. The checkpoint remembers the content of the
  tile stores it trained on: when they were rebuilt since, training starts over; at the end
  ``model.pt``, ``config.json``, ``metrics.csv`` and ``metrics.json`` (and TensorBoard events
  when ``tensorboard`` is importable);
* :mod:`stlib.train.study` - the study's named runs (:data:`VARIANTS`) and seeds from a
  profile's recipe, recorded in ``models/study_runs.json``;
* :mod:`stlib.train.cli` - ``stlib train`` (and ``torchrun -m stlib.train``).

``stlib bench train`` (:func:`stlib.bench.bench_train_main`) measures training throughput.
Every public name of these modules is importable from ``stlib.train``.
"""

from __future__ import annotations

from stlib.train.augment import augment_batch, draw_augment_params, hed_to_rgb, rgb_to_hed, shard_params
from stlib.train.cli import cli_main
from stlib.train.config import (HV_SOURCES, OPTIMIZERS, RECIPES, RESUME_FREE_FIELDS, SCHEDULES, TrainConfig,
                                apply_overrides, as_train_params)
from stlib.train.data import BalancedSampler, TileData, hv_from_inst, tile_weights
from stlib.train.loop import DistInfo, TrainingInterrupted, TrainResult, train
from stlib.train.study import (SEED_STRIDE, STUDY_RUNS_FILE, VARIANTS, read_study_runs, record_study_runs,
                               train_or_reuse, train_study, variant_config, variant_dir, variant_spec)

__all__ = [
    "VARIANTS", "SEED_STRIDE", "variant_spec", "variant_dir", "variant_config", "train_or_reuse", "train_study",
    "record_study_runs", "read_study_runs", "STUDY_RUNS_FILE",
    "TrainConfig", "TrainResult", "TrainingInterrupted", "train", "cli_main", "TileData",
    "BalancedSampler", "tile_weights", "hv_from_inst", "augment_batch", "draw_augment_params", "shard_params",
    "rgb_to_hed", "hed_to_rgb", "apply_overrides", "DistInfo",
    "RECIPES", "SCHEDULES", "OPTIMIZERS", "HV_SOURCES", "RESUME_FREE_FIELDS", "as_train_params",
]
