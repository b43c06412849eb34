"""The one parameter schema: notebooks, the CLI and ``params/*.yaml`` all go through it.

Each notebook ``NN_name`` has a frozen dataclass here; ``params/{profile}.yaml`` holds a
``common:`` block (shared by every notebook) and one block per notebook. :func:`load_params`
merges them, rejects unknown keys (typos are errors, not silently ignored) and returns the
validated values as a plain dict, ready for papermill.

Secrets are not parameters: the Hugging Face token is read by :mod:`stlib.io.download` from
the environment / HF cache only, and :func:`load_params` refuses any key that looks like one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from stlib.constants import TARGET_UM_PER_PX_40X
from stlib.utils import InputError

PROFILES = ("demo", "workshop", "paper", "realtissue")
_SECRET_WORDS = ("token", "password", "secret", "api_key")


@dataclass(frozen=True)
class CommonParams:
    """Parameters every notebook receives."""

    profile: str = "demo"
    #: root of the data: HEST layout under ``{data_dir}/hest``, raw Xenium bundles under
    #: ``{data_dir}/xenium``, PanNuke under ``{data_dir}/pannuke``, demo truth under ``{data_dir}/truth``
    data_dir: str = "data/demo"
    #: where every stage writes (alignment/, labels/, tiles/, models/, eval/, infer/)
    run_dir: str = "runs/demo"
    seed: int = 0
    #: "auto" = cuda when available, else cpu
    device: str = "auto"
    #: sample ids to use; empty = the role-selected samples of the manifest / demo cohort
    samples: tuple[str, ...] = ()
    #: path of data_manifest.yaml (relative to the repository root)
    manifest: str = "data_manifest.yaml"


@dataclass(frozen=True)
class DataParams(CommonParams):
    """00_data: obtain the data (generate the demo cohort or download HEST/PanNuke) and tabulate it."""

    #: demo/workshop: generate the synthetic cohort if missing; paper: download
    generate_demo: bool = True
    demo_scale: str = "demo"  # "demo" | "workshop" (size of the synthetic cohort)
    demo_image_px: int = 0  # override the synthetic slides' size (0 = the scale's default)
    download: bool = False
    offline: bool = True
    mirror: str = ""  # local HEST mirror to copy from instead of Hugging Face
    thumbnail_px: int = 512
    #: real annotated H&E to build the cohort from instead of the synthetic one (stlib.demo.realtissue):
    #: a folder with nuclei-monuseg/ and nuclei-consep/ (the shipped subset "realtissue", ../shared/realdata);
    #: "" = the synthetic cohort
    real_tissue_source: str = ""
    #: fetch the public annotated sets of data_manifest.yaml (``annotated_he``: MoNuSeg, CoNSeP) into
    #: ``{data_dir}/annotations/<name>``, where chapters 4-5 take them as manual truth (paper profile)
    fetch_annotations: bool = False
    #: local copy to take them from instead of the network: a folder holding ``nuclei-monuseg/`` and
    #: ``nuclei-consep/`` (e.g. ../shared/realdata) or ``monuseg/`` and ``consep/``
    annotations_mirror: str = ""


@dataclass(frozen=True)
class AlignParams(CommonParams):
    """01_alignment: put Xenium nuclei on H&E pixels, score and refine the registration."""

    refine: bool = True
    tile_um: float = 100.0
    max_residual_um: float = 3.0


@dataclass(frozen=True)
class LabelParams(CommonParams):
    """02_labels: masks, cell types, image-oriented classes, tile store, label-quality report."""

    um_per_px: float = TARGET_UM_PER_PX_40X
    tile_px: int = 256
    labeler: str = "hierarchical"  # hierarchical | flat | marker | cluster
    min_counts: int = 10
    min_confidence: float = 0.3
    leiden_resolution: float = 1.0
    refine_masks: bool = True  # snap ST nuclei to their haematoxylin boundary (stlib.labels.refine)
    dead: str = "ignore"  # ignore (Dead is not a training class) | proxy (low-count + apoptosis genes)
    #: robustness curves of the labeler: "benchmark" reads benchmarks/label_robustness.json (the
    #: committed sweep); "live" recomputes a small sweep here (workshop profile; minutes)
    robustness: str = "benchmark"
    robustness_json: str = "benchmarks/label_robustness.json"
    #: the real 10x panel gene lists (falls back to the copies shipped in stlib/data/panels)
    realdata_panels: str = "../shared/realdata/xenium-panels"


@dataclass(frozen=True)
class TrainParams(CommonParams):
    """03_training: train the HoVer-Net-style network (ST-supervised and PanNuke baselines).

    This block of ``params/{profile}.yaml`` is the one source of a profile's training recipe:
    every run (each recipe, each seed, each ablation labeler) trains with it
    (:func:`stlib.train.variant_config`; ``stlib train --profile P --run NAME``).
    """

    encoder: str = "small"  # small | resnet50
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | step (x0.1 halfway) | constant
    warmup_steps: int = 0
    val_every: int = 100
    val_max_tiles: int = 64
    #: training runs: ST-supervised, PanNuke with all tissues, PanNuke without the held-out organs' tissues
    recipes: tuple[str, ...] = ("st", "pannuke", "pannuke_noheldout")
    #: training seeds per recipe (and per ablation labeler in 05); the spread across them is reported
    n_seeds: int = 3
    weights: str = ""  # optional local encoder weight file; never downloaded
    compile: bool = False
    crop_px: int = 0  # train on random crops of this size (0 = whole tiles); CPU demos use 128
    nt_confidence: bool = False  # weight the NT loss by the per-cell label confidence


@dataclass(frozen=True)
class SegEvalParams(CommonParams):
    """04_segmentation_eval: unseen-organ segmentation, ST-supervised vs PanNuke-trained.

    The primary endpoint, fixed before any result: ``primary_metric`` on the held-out organs
    against manual truth (every manual reference: PanNuke tiles of the held-out organs' tissues
    from the fold no baseline trained on, the demo truth, the ``manual_truth`` sets), pooled by
    PanNuke's rule (per organ, then across organs), as the paired difference
    ``primary_model - primary_baseline``; 95% CI by a hierarchical bootstrap over slides/images
    then tiles, sign-flip test on the same statistic. Everything else is secondary.
    """

    n_bootstrap: int = 1000
    ci: float = 0.95
    #: sign patterns of the cluster-wise permutation test (exact when there are fewer patterns)
    n_permutations: int = 10000
    #: public manual-annotation sets (MoNuSeg, CoNSeP, Lizard-style folders; npz folders): paths, in
    #: addition to every set found under ``{data_dir}/annotations/`` (where downloads and mirrors go)
    manual_truth: tuple[str, ...] = ()
    #: PanNuke fold that no PanNuke-trained network trained on (its held-out tissues are manual truth)
    pannuke_test_split: str = "fold3"
    primary_metric: str = "bpq"
    primary_model: str = "st"
    primary_baseline: str = "pannuke_noheldout"


@dataclass(frozen=True)
class ClsEvalParams(CommonParams):
    """05_classification_eval: per-class scores of the label sets (hierarchical, flat, ...)."""

    labelers: tuple[str, ...] = ("hierarchical", "flat", "marker", "cluster")
    n_bootstrap: int = 1000
    n_permutations: int = 10000
    #: retrain the network on every label set with the recipe and seeds of 03_training (the ablation)
    retrain: bool = True
    pannuke_test_split: str = "fold3"
    #: training seeds per retrained label set: the first ones of 03_training's ``n_seeds`` (0 = all);
    #: the hierarchical arm is scored with the same seeds, so the comparison stays paired by seed
    ablation_seeds: int = 0


@dataclass(frozen=True)
class InferParams(CommonParams):
    """06_inference: apply a trained model to a new slide."""

    checkpoint: str = ""
    image: str = ""
    um_per_px: float = 0.0  # 0 = read from the file


@dataclass(frozen=True)
class RealTissueParams(CommonParams):
    """07_real_tissue: ST-derived vs manual labels on real H&E, scored against real manual nuclei.

    Under every profile the chapter uses its own cohort and run folders (``rt_data_dir``,
    ``rt_run_dir``): real annotated images with a simulated Xenium layer. Its two networks are
    written to ``{rt_run_dir}/models/st/model.pt`` and ``{rt_run_dir}/models/manual/model.pt``.
    """

    #: real annotated H&E: the shipped subset (realtissue/), or e.g. ../shared/realdata
    source: str = "realtissue"
    #: image names to use (empty = every image of ``source``)
    images: tuple[str, ...] = ()
    rt_data_dir: str = "data/realtissue"
    rt_run_dir: str = "runs/realtissue"
    #: organs never trained on (test organs); the others train both networks
    heldout_organs: tuple[str, ...] = ("Kidney", "Bowel")
    #: training / inference resolution of both networks (µm/px) and tile size. 0.25 (the images' own
    #: 40x) and lr 0.004 were chosen on development runs of the manual-mask network at 200-300 steps,
    #: scored on MoNuSeg kidney / colon and CoNSeP train_1-4 (0.5 µm/px or lr 0.001-0.002 lost
    #: 0.02-0.08 bPQ there). Those images are among the chapter's test images (the notebook says so);
    #: CoNSeP images outside the shipped subset were never used for any choice.
    um_per_px: float = TARGET_UM_PER_PX_40X
    tile_px: int = 256
    refine_masks: bool = True
    encoder: str = "small"
    steps: int = 150
    batch_size: int = 8
    crop_px: int = 128
    lr: float = 0.004
    #: CoNSeP images (in name order) whose nuclei train the classification heads; the rest test them
    n_class_train: int = 4
    n_bootstrap: int = 1000
    #: also segment the held-out images with the network untrained (a floor); the demo skips it for time
    score_untrained: bool = True


NOTEBOOK_PARAMS: dict[str, type[CommonParams]] = {
    "00_data": DataParams,
    "01_alignment": AlignParams,
    "02_labels": LabelParams,
    "03_training": TrainParams,
    "04_segmentation_eval": SegEvalParams,
    "05_classification_eval": ClsEvalParams,
    "06_inference": InferParams,
    "07_real_tissue": RealTissueParams,
}


def params_path(profile: str, params_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``params/{profile}.yaml`` (``profile`` may also be a path to a YAML file)."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        return p
    base = Path(params_dir) if params_dir is not None else _default_params_dir()
    return base / f"{profile}.yaml"


def _default_params_dir() -> Path:
    from stlib.utils import repo_root

    return repo_root() / "params"


def read_profile(profile: str, params_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and structurally check a profile YAML (``common`` + one block per notebook)."""
    path = params_path(profile, params_dir)
    if not path.is_file():
        raise InputError("profile file not found", path=path,
                         fix=f"use one of {PROFILES} or pass the path of a params YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML: {e}", path=path, fix="fix the YAML syntax") from e
    if not isinstance(raw, dict):
        raise InputError("expected a mapping with 'common' and notebook blocks", path=path)
    unknown = set(raw) - {"common", *NOTEBOOK_PARAMS}
    if unknown:
        raise InputError(f"unknown block(s) {sorted(unknown)}", path=path,
                         fix=f"blocks are 'common' and {sorted(NOTEBOOK_PARAMS)}")
    return raw


def load_params(profile: str, notebook: str, *, overrides: dict[str, Any] | None = None,
                params_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validated papermill parameters of ``notebook`` under ``profile``.

    Parameters
    ----------
    profile
        ``demo``, ``workshop``, ``paper`` or the path of a params YAML.
    notebook
        Notebook stem, e.g. ``"02_labels"``.
    overrides
        Values that win over the YAML (e.g. from ``stlib run -p key=value``).

    Returns
    -------
    A plain ``dict`` (lists, not tuples) with every field of the notebook's dataclass.
    """
    if notebook not in NOTEBOOK_PARAMS:
        raise InputError(f"unknown notebook {notebook!r}", fix=f"one of {sorted(NOTEBOOK_PARAMS)}")
    raw = read_profile(profile, params_dir)
    merged = {**(raw.get("common") or {}), **(raw.get(notebook) or {}), **(overrides or {})}
    path = params_path(profile, params_dir)
    obj = make_params(notebook, merged, source=str(path))
    return to_papermill(obj)


def make_params(notebook: str, values: dict[str, Any], *, source: str = "<parameters>") -> CommonParams:
    """Build the frozen dataclass of ``notebook`` from ``values``, checking names and types."""
    cls = NOTEBOOK_PARAMS[notebook]
    names = {f.name: f for f in fields(cls)}
    for key in values:
        if any(w in key.lower() for w in _SECRET_WORDS):
            raise InputError(f"parameter {key!r} looks like a secret; secrets are never parameters",
                             path=source, fix="set HF_TOKEN in the environment or run `huggingface-cli login`")
        if key not in names:
            raise InputError(f"unknown parameter {key!r} for {notebook}", path=source,
                             fix=f"known parameters: {sorted(names)}")
    kwargs = {}
    for key, val in values.items():
        f = names[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[key] = coerce_value(key, val, default, source)
    obj = cls(**kwargs)
    if obj.profile not in PROFILES:
        raise InputError(f"profile must be one of {PROFILES}, got {obj.profile!r}", path=source)
    return obj


def coerce_value(key: str, val: Any, default: Any, source: str) -> Any:
    """Check ``val`` against the type of ``default`` (bool, int, float, tuple, str) for ``key``.

    A scalar given where a list is expected becomes a one-element tuple. Errors name the key and
    the source file. Shared by the notebook parameters and :class:`stlib.train.TrainConfig`.
    """
    if isinstance(default, bool):
        if not isinstance(val, bool):
            raise InputError(f"parameter {key!r} must be true/false, got {val!r}", path=source)
        return val
    if isinstance(default, int):
        if isinstance(val, bool) or not isinstance(val, int):
            raise InputError(f"parameter {key!r} must be an integer, got {val!r}", path=source)
        return val
    if isinstance(default, float):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise InputError(f"parameter {key!r} must be a number, got {val!r}", path=source)
        return float(val)
    if isinstance(default, tuple):
        if isinstance(val, (str, int, float)):
            val = [val]
        if not isinstance(val, (list, tuple)):
            raise InputError(f"parameter {key!r} must be a list, got {val!r}", path=source)
        return tuple(val)
    if isinstance(default, str):
        if not isinstance(val, str):
            raise InputError(f"parameter {key!r} must be a string, got {val!r}", path=source)
        return val
    return val


def to_papermill(obj: CommonParams) -> dict[str, Any]:
    """Dataclass -> dict with lists instead of tuples (papermill/JSON friendly)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


__all__ = [
    "PROFILES", "CommonParams", "DataParams", "AlignParams", "LabelParams", "TrainParams",
    "SegEvalParams", "ClsEvalParams", "InferParams", "RealTissueParams", "NOTEBOOK_PARAMS", "load_params",
    "make_params", "coerce_value", "read_profile", "params_path", "to_papermill", "resolve_device", "params_from_namespace",
]


def params_from_namespace(notebook: str, namespace: dict[str, Any]) -> CommonParams:
    """The validated parameter object of ``notebook`` from a notebook's variables.

    Notebooks keep their parameters as plain variables (papermill injects them); this picks
    exactly the schema's fields from ``namespace`` (``globals()``) and validates them.
    """
    cls = NOTEBOOK_PARAMS[notebook]
    values = {f.name: namespace[f.name] for f in fields(cls) if f.name in namespace}
    return make_params(notebook, values, source=f"notebook {notebook}")
