"""The run folder: every path a stage reads or writes under ``run_dir``, in one object.

Every stage and every command (``stlib align|labels|train|infer --run-dir R``) finds its inputs and
outputs through :class:`RunLayout`; no module joins ``"labels"`` or ``"alignment"`` onto a run
folder by hand. :data:`RUN_LAYOUT` is the documented list of those paths (DEVELOPING.md's
"Run folder" section is checked against it by ``tests/test_layout.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout", "RUN_LAYOUT", "STUDY_RUNS_FILE"]

#: file (relative to ``run_dir``) where notebook 03 records the study's training runs
STUDY_RUNS_FILE = "models/study_runs.json"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder.

    Parameters
    ----------
    root
        The run folder (``run_dir`` of a profile, ``--run-dir`` of a command).
    """

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- alignment ------------------------------------------------------------------------------
    @property
    def alignment_root(self) -> Path:
        """``alignment/``: one folder per sample."""
        return self.root / "alignment"

    def alignment_dir(self, sample: str) -> Path:
        """``alignment/{id}/``."""
        return self.alignment_root / sample

    def alignment_json(self, sample: str) -> Path:
        """``alignment/{id}/alignment.json``: the sample's map to H&E, scores, excluded regions."""
        return self.alignment_dir(sample) / "alignment.json"

    # -- labels ---------------------------------------------------------------------------------
    def labels_dir(self, name: str) -> Path:
        """``labels/{name}/``: one sample's labels (``name`` = the id, or ``{id}__{labeler}``)."""
        return self.root / "labels" / name

    def cells_parquet(self, name: str) -> Path:
        """``labels/{name}/cells.parquet``: one row per cell."""
        return self.labels_dir(name) / "cells.parquet"

    def nuclei_parquet(self, name: str) -> Path:
        """``labels/{name}/nuclei.parquet``: aligned nucleus polygons with their class."""
        return self.labels_dir(name) / "nuclei.parquet"

    def cells_h5ad(self, name: str) -> Path:
        """``labels/{name}/cells.h5ad``: the cells' expression and embeddings (figures)."""
        return self.labels_dir(name) / "cells.h5ad"

    def coverage_parquet(self, name: str) -> Path:
        """``labels/{name}/coverage.parquet``: the Xenium-imaged region (H&E px)."""
        return self.labels_dir(name) / "coverage.parquet"

    def label_report(self, name: str) -> Path:
        """``labels/{name}/label_report.json``: the label-quality report."""
        return self.labels_dir(name) / "label_report.json"

    # -- tiles, models, evaluation, inference ---------------------------------------------------
    def tiles_dir(self, store: str) -> Path:
        """``tiles/{store}/``: a tile store (``st``, ``st_truth``, ``pannuke``, ...)."""
        return self.root / "tiles" / store

    @property
    def models_root(self) -> Path:
        """``models/``: the folder of every training run (and of an installed model pair)."""
        return self.root / "models"

    def model_dir(self, run: str, seed_index: int = 0) -> Path:
        """``models/{run}/`` (training seed 0) or ``models/{run}__seed{k}/``."""
        return self.root / model_subdir(run, seed_index)

    def model_pt(self, run: str, seed_index: int = 0) -> Path:
        """``models/{run}/model.pt``: the final weights."""
        return self.model_dir(run, seed_index) / "model.pt"

    @property
    def study_runs(self) -> Path:
        """``models/study_runs.json``: the recipe and every run's model per seed."""
        return self.root / STUDY_RUNS_FILE

    @property
    def eval_dir(self) -> Path:
        """``eval/``: metrics JSON and tables."""
        return self.root / "eval"

    @property
    def eval_scores(self) -> Path:
        """``eval/scores/``: cached scores of a model file on a reference set (:func:`stlib.evaluate.segment_and_score`)."""
        return self.eval_dir / "scores"

    def eval_results(self, name: str) -> Path:
        """``eval/{name}/``: the tables of one evaluation (``stlib eval --name NAME``)."""
        return self.eval_dir / name

    def infer_dir(self, name: str) -> Path:
        """``infer/{name}/``: the outputs of inference on one image."""
        return self.root / "infer" / name


def model_subdir(run: str, seed_index: int = 0) -> str:
    """``models/{run}`` for training seed 0, ``models/{run}__seed{k}`` for seed ``k >= 1`` (relative)."""
    return f"models/{run}" if seed_index == 0 else f"models/{run}__seed{seed_index}"


#: (path pattern, what it holds): the documented run-folder layout, each pattern produced by the
#: :class:`RunLayout` method of the same line (``tests/test_layout.py`` checks both and DEVELOPING.md)
RUN_LAYOUT: tuple[tuple[str, str, str], ...] = (
    ("alignment/{id}/alignment.json", "alignment_json", "xenium_um_to_he_px, scores, residual field, excluded regions, status (ok/failed) + verdict"),
    ("labels/{id}/cells.parquet", "cells_parquet", "cell_id, x_he, y_he, fine_type, class, confidence, ignore_reason (+ more)"),
    ("labels/{id}/nuclei.parquet", "nuclei_parquet", "aligned nucleus polygons (H&E px) with class and confidence"),
    ("labels/{id}/cells.h5ad", "cells_h5ad", "the cells' counts, lognorm, obs and embeddings (figures)"),
    ("labels/{id}/label_report.json", "label_report", "the label-quality report (and its cache key)"),
    ("labels/{id}/coverage.parquet", "coverage_parquet",
     "region where Xenium imaged and transcripts fall (H&E px); outside = ignore"),
    ("tiles/{store}/", "tiles_dir", "tile store (below): st, st_truth, pannuke, pannuke_noheldout "
                                     "(PanNuke without the held-out organs' tissues), st__<labeler>"),
    ("models/", "models_root", "every training run; the real-tissue chapter installs its release pair as "
                               "models/{st,manual}/model.pt and trains its live pair in models/book/"),
    ("models/{run}/", "model_dir", "checkpoint.pt (resumable), model.pt (final), config.json, metrics.csv"),
    ("models/{run}__seed{k}/", "model_dir", "the same for training seed k >= 1 (run: st, pannuke, "
                                            "pannuke_noheldout, st__<labeler>)"),
    ("models/study_runs.json", "study_runs", "the recipe (03_training parameters) and every run's model per seed"),
    ("eval/", "eval_dir", "metrics JSON / tables"),
    ("eval/scores/", "eval_scores", "cached scores of a model file on a reference set (reused by 04, 05, stlib eval)"),
    ("eval/{name}/", "eval_results", "one evaluation (stlib eval): per_seed/per_image parquet, summary.csv, "
                                     "comparison.csv, eval.json"),
    ("infer/{name}/", "infer_dir", "inference outputs of one image (instances, classes, tables)"),
)


def render_layout() -> str:
    """:data:`RUN_LAYOUT` as the lines of DEVELOPING.md's "Run folder" block (kept equal by a test)."""
    width = max(len(p) for p, _, _ in RUN_LAYOUT) + len("{run_dir}/") + 2
    return "\n".join(f"{'{run_dir}/' + p:<{width}}{what}" for p, _, what in RUN_LAYOUT)
