"""The study's training runs: named runs (:data:`VARIANTS`) x seeds from a profile's recipe
(``params/{profile}.yaml``, block ``03_training``), and their record ``models/study_runs.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stlib.layout import STUDY_RUNS_FILE, model_subdir  # file (under run_dir) of the study's training runs
from stlib.train.config import TrainConfig, as_train_params
from stlib.train.loop import TrainResult, train
from stlib.utils import InputError, write_json

log = logging.getLogger("stlib.train")

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
    return model_subdir(variant, seed_index)


def variant_config(params: Any, variant: str, *, seed_index: int = 0, **overrides: Any) -> TrainConfig:
    """The config of one run of the study: profile recipe (``params``) + named run + seed.

    Parameters
    ----------
    params
        :class:`stlib.config.TrainParams` (a profile's ``03_training`` block), or a mapping of
        its fields (checked and completed by :func:`stlib.train.config.as_train_params`; anything
        else raises :class:`~stlib.utils.InputError`).
    variant
        ``st``, ``pannuke``, ``pannuke_noheldout`` or ``st__<labeler>``.
    seed_index
        Which of the profile's ``n_seeds`` training seeds (seed ``params.seed + 1000 k``; output
        :func:`variant_dir`).
    """
    params = as_train_params(params)
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


def train_study(params: Any, variants: Sequence[str], *, log_line: Any = None,
                workers: int | None = 1) -> dict[str, dict[int, TrainResult]]:
    """Train every run of ``variants`` x ``params.n_seeds`` seeds (finished runs are reused).

    Records the runs and the recipe in ``{run_dir}/models/study_runs.json`` (:func:`read_study_runs`),
    so the evaluation chapters find every seed and the ablation retrains with the same recipe.
    ``workers`` > 1 (or ``None``: one per CPU) trains that many runs at a time in single-thread
    processes (:func:`stlib.utils.map_processes`; CPU runs of a small network).
    """
    from stlib.utils import map_processes

    params = as_train_params(params)
    n = int(getattr(params, "n_seeds", 1))
    if n < 1:
        raise InputError(f"n_seeds must be >= 1, got {n}")
    jobs = [(variant, k) for variant in variants for k in range(n)]
    done = map_processes(train_or_reuse, [variant_config(params, v, seed_index=k) for v, k in jobs], workers=workers)
    results: dict[str, dict[int, TrainResult]] = {}
    for (variant, k), res in zip(jobs, done):
        results.setdefault(variant, {})[k] = res
        if log_line is not None:
            log_line(f"{variant} seed {k}: " + ("reused" if res.skipped else f"{res.steps} steps in {res.wall_s:.0f} s"))
    record_study_runs(params, results)
    return results


def record_study_runs(params: Any, results: Mapping[str, Mapping[int, TrainResult]]) -> Path:
    """Write ``models/study_runs.json``: the recipe (``params``) and each run's model per seed."""
    from stlib.config import to_papermill

    params = as_train_params(params)
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
