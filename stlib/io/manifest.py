"""The data manifest (``data_manifest.yaml``): every data source of the study in one file.

It lists every human Xenium sample of HEST-1k v1.1.0 with its organ and its role in the paper
protocol (``train`` or ``held-out``), the PanNuke folds, the HEST release and the synthetic demo
cohort. :func:`load_manifest` validates it; :func:`write_manifest_yaml` regenerates it from the
HEST metadata CSV (so the list can be checked against its source).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from stlib.utils import InputError, atomic_path, repo_root

__all__ = [
    "HELD_OUT_ORGANS",
    "KNOWN_ORGANS",
    "ROLES",
    "TRAIN_ORGANS",
    "Manifest",
    "build_manifest_from_hest_csv",
    "load_manifest",
    "write_manifest_yaml",
]

#: The 13 organs of the human Xenium samples of HEST-1k v1.1.0 (HEST vocabulary).
KNOWN_ORGANS: tuple[str, ...] = (
    "Bone", "Bowel", "Brain", "Breast", "Heart", "Kidney", "Liver", "Lung", "Lymphoid",
    "Ovary", "Pancreas", "Prostate", "Skin",
)
#: Organs held out from training: public manual nucleus annotations exist for each. Written
#: into ``data_manifest.yaml`` (the samples' roles) by :func:`write_manifest_yaml`; code reads the
#: roles from the manifest (:meth:`Manifest.organs`), never from this tuple.
HELD_OUT_ORGANS: tuple[str, ...] = ("Bowel", "Kidney", "Liver", "Skin")
#: The nine training organs (the paper trains on nine of the 13).
TRAIN_ORGANS: tuple[str, ...] = tuple(o for o in KNOWN_ORGANS if o not in HELD_OUT_ORGANS)
ROLES: tuple[str, ...] = ("train", "held-out")

#: Columns of :attr:`Manifest.samples`, in order.
SAMPLE_FIELDS: tuple[str, ...] = (
    "id", "organ", "tissue", "disease_state", "oncotree_code", "pixel_size_um", "panel_size", "role",
)
_REQUIRED = ("id", "organ", "pixel_size_um", "role")


@dataclass(frozen=True)
class Manifest:
    """A validated data manifest.

    Attributes
    ----------
    samples
        One row per HEST sample: ``id``, ``organ``, ``tissue``, ``disease_state``,
        ``oncotree_code``, ``pixel_size_um``, ``panel_size``, ``role``.
    hest, pannuke, demo
        The corresponding YAML blocks as dicts.
    path
        The file read.
    """

    samples: pd.DataFrame
    hest: dict[str, Any] = field(default_factory=dict)
    pannuke: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def train_ids(self) -> list[str]:
        """Ids of the training samples."""
        return self.samples.loc[self.samples["role"] == "train", "id"].tolist()

    def heldout_ids(self) -> list[str]:
        """Ids of the held-out samples (unseen organs)."""
        return self.samples.loc[self.samples["role"] == "held-out", "id"].tolist()

    def organs(self, role: str | None = None) -> list[str]:
        """Sorted organs, of one role (``"train"`` / ``"held-out"``) or of all samples."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
        s = self.samples if role is None else self.samples[self.samples["role"] == role]
        return sorted(s["organ"].unique().tolist())

    def sample(self, sample_id: str) -> dict[str, Any]:
        """The manifest row of one sample as a dict."""
        row = self.samples[self.samples["id"] == sample_id]
        if row.empty:
            raise InputError(f"sample {sample_id!r} is not in the manifest", path=self.path,
                             fix="use an id listed under samples:")
        return row.iloc[0].to_dict()

    def pannuke_folds(self) -> list[int]:
        """PanNuke fold numbers listed."""
        return [int(f["fold"]) for f in self.pannuke.get("folds", [])]

    def demo_organs(self, role: str) -> list[str]:
        """Organs of the demo cohort with one role."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return list(self.demo.get("organs", {}).get(role, []))


def _clean(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _validate_samples(rows: list[Any], path: Path) -> pd.DataFrame:
    if not isinstance(rows, list) or not rows:
        raise InputError("'samples' must be a non-empty list", path=path,
                         fix="regenerate it with stlib.io.manifest.write_manifest_yaml")
    recs = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"samples[{i}] is not a mapping", path=path, fix="write each sample as {id: ..., organ: ...}")
        sid = str(r.get("id", f"samples[{i}]"))
        missing = [k for k in _REQUIRED if _clean(r.get(k)) in (None, "")]
        if missing:
            raise InputError(f"missing field(s) {missing}", path=path, sample=sid,
                             fix=f"every sample needs {list(_REQUIRED)}")
        unknown = set(r) - set(SAMPLE_FIELDS)
        if unknown:
            raise InputError(f"unknown field(s) {sorted(unknown)}", path=path, sample=sid,
                             fix=f"allowed fields: {list(SAMPLE_FIELDS)}")
        if r["role"] not in ROLES:
            raise InputError(f"role {r['role']!r} is not one of {list(ROLES)}", path=path, sample=sid,
                             fix="set role: train or role: held-out")
        if r["organ"] not in KNOWN_ORGANS:
            raise InputError(f"unknown organ {r['organ']!r}", path=path, sample=sid,
                             fix=f"use one of the 13 HEST Xenium organs {list(KNOWN_ORGANS)} "
                                 "(or add the organ to stlib.io.manifest.KNOWN_ORGANS)")
        try:
            px = float(r["pixel_size_um"])
        except (TypeError, ValueError):
            px = float("nan")
        if not px > 0:
            raise InputError(f"pixel_size_um {r['pixel_size_um']!r} is not a positive number", path=path,
                             sample=sid, fix="use HEST's pixel_size_um_estimated (about 0.27 µm/px)")
        recs.append({k: _clean(r.get(k)) for k in SAMPLE_FIELDS} | {"id": sid, "pixel_size_um": px})
    df = pd.DataFrame.from_records(recs, columns=list(SAMPLE_FIELDS))
    dup = df["id"][df["id"].duplicated()].unique().tolist()
    if dup:
        raise InputError(f"duplicate sample id(s) {dup}", path=path, sample=str(dup[0]),
                         fix="list each sample once")
    both = sorted(set(df.loc[df.role == "train", "organ"]) & set(df.loc[df.role == "held-out", "organ"]))
    if both:
        bad = df.loc[df.organ == both[0], "id"].iloc[0]
        raise InputError(f"organ(s) {both} are both train and held-out: the held-out organs would not be unseen",
                         path=path, sample=str(bad), fix="give all samples of an organ the same role")
    df["panel_size"] = pd.array(df["panel_size"], dtype="Int64")
    return df


def _validate_demo(demo: Any, path: Path) -> dict[str, Any]:
    if demo is None:
        return {}
    if not isinstance(demo, dict):
        raise InputError("'demo' must be a mapping", path=path, fix="see the demo: block of the shipped manifest")
    organs = demo.get("organs", {}) or {}
    if not isinstance(organs, dict) or set(organs) - set(ROLES):
        raise InputError(f"demo.organs must map {list(ROLES)} to organ lists", path=path,
                         fix="write demo: {organs: {train: [...], held-out: [...]}}")
    for role, lst in organs.items():
        for o in lst or []:
            if o not in KNOWN_ORGANS:
                raise InputError(f"demo organ {o!r} ({role}) is unknown", path=path,
                                 fix=f"use one of {list(KNOWN_ORGANS)}")
    both = set(organs.get("train") or []) & set(organs.get("held-out") or [])
    if both:
        raise InputError(f"demo organ(s) {sorted(both)} are both train and held-out", path=path,
                         fix="give each demo organ one role")
    return demo


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate ``data_manifest.yaml``.

    Parameters
    ----------
    path
        The YAML file; default ``data_manifest.yaml`` at the repository root.

    Returns
    -------
    :class:`Manifest`.

    Raises
    ------
    InputError
        Missing file, bad YAML, a sample without a required field, an unknown role or organ
        (naming the sample), duplicate ids, an organ both train and held-out, a non-positive
        pixel size.
    """
    path = Path(path) if path is not None else repo_root() / "data_manifest.yaml"
    if not path.is_file():
        raise InputError("manifest not found", path=path, fix="run from the repository root or pass the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML ({e})", path=path, fix="fix the syntax or restore the file from git") from e
    if not isinstance(data, dict) or "samples" not in data:
        raise InputError("no 'samples:' list", path=path, fix="restore data_manifest.yaml from git")
    samples = _validate_samples(data["samples"], path)
    pannuke = data.get("pannuke") or {}
    for f in pannuke.get("folds", []) or []:
        if not isinstance(f, dict) or "fold" not in f:
            raise InputError("every pannuke.folds entry needs 'fold'", path=path, fix="write - {fold: 1, file: fold_1.zip}")
    return Manifest(samples=samples, hest=data.get("hest") or {}, pannuke=pannuke,
                    demo=_validate_demo(data.get("demo"), path), path=path)


# --------------------------------------------------------------------------------------------
# generation from the HEST CSV
# --------------------------------------------------------------------------------------------
def build_manifest_from_hest_csv(csv_path: str | os.PathLike, *,
                                 held_out: tuple[str, ...] = HELD_OUT_ORGANS) -> pd.DataFrame:
    """Select the human Xenium samples of the HEST table and assign roles.

    Parameters
    ----------
    csv_path
        ``HEST_v1_1_0.csv`` (UTF-8 with BOM).
    held_out
        Organs whose samples get ``role == "held-out"``; all others are ``train``.

    Returns
    -------
    DataFrame with the columns of :data:`SAMPLE_FIELDS`, sorted by role, organ, id.
    """
    from stlib.io.hest import read_hest_metadata_csv

    df = read_hest_metadata_csv(csv_path)
    need = ["st_technology", "species", "organ", "pixel_size_um_estimated", "nb_genes"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"HEST CSV lacks columns {missing}", path=csv_path, fix="pass HEST_v1_1_0.csv")
    x = df[(df["st_technology"] == "Xenium") & (df["species"] == "Homo sapiens")].copy()
    unknown = sorted(set(x["organ"]) - set(KNOWN_ORGANS))
    if unknown:
        raise InputError(f"HEST lists organ(s) {unknown} unknown to stlib", path=csv_path,
                         fix="add them to stlib.io.manifest.KNOWN_ORGANS with a role")
    out = pd.DataFrame({
        "id": x["id"].astype(str),
        "organ": x["organ"].astype(str),
        "tissue": x.get("tissue", pd.Series(None, index=x.index)).astype(object).map(
            lambda v: None if pd.isna(v) else str(v).strip()),
        "disease_state": x["disease_state"].map(lambda v: None if pd.isna(v) else str(v).strip()),
        "oncotree_code": x["oncotree_code"].map(lambda v: None if pd.isna(v) else str(v).strip()),
        "pixel_size_um": x["pixel_size_um_estimated"].astype(float).round(6),
        "panel_size": x["nb_genes"].astype("Int64"),
        "role": ["held-out" if o in held_out else "train" for o in x["organ"]],
    })
    out["_r"] = out["role"].map({"train": 0, "held-out": 1})
    out = out.sort_values(["_r", "organ", "id"])
    return out.drop(columns="_r").reset_index(drop=True)


_HEADER = """\
# data_manifest.yaml: every data source of the study (read by stlib.io.manifest.load_manifest).
#
# Generated by stlib.io.manifest.write_manifest_yaml from HEST_v1_1_0.csv (mahmoodlab/HEST,
# assets/): every row with st_technology == Xenium and species == Homo sapiens ({n} samples,
# {n_organs} organs). Edit roles here only together with the rationale below.
#
# Roles (the paper protocol: train on nine organs, evaluate segmentation on organs never seen):
#   held-out organs: {held_out}
#     chosen so that "unseen organ" can be scored against MANUAL nucleus annotations, not only
#     against ST-derived labels: colon/bowel (Lizard, CoNSeP, MoNuSeg colon, PanNuke Colon),
#     skin (PUMA melanoma, PanNuke Skin), kidney (MoNuSeg, PanNuke Kidney), liver (MoNuSeg,
#     PanNuke Liver). Together {n_held} samples ({held_counts}).
#   train organs ({n_train_organs}): {train}
#     ({n_train} samples; Lung dominates with 22: report per organ and consider balanced sampling).
#   No organ is in both roles: splits are by slide and organ, never by overlapping patches.
#
# Sample fields: id, organ, tissue (HEST), disease_state, oncotree_code (null when not cancer),
# pixel_size_um (HEST pixel_size_um_estimated, µm per WSI level-0 pixel), panel_size (HEST
# nb_genes: number of features in the sample's expression table, not only panel genes), role.
"""


def write_manifest_yaml(path: str | os.PathLike, hest_csv: str | os.PathLike) -> Path:
    """Regenerate ``data_manifest.yaml`` (samples from the HEST CSV; fixed PanNuke/HEST/demo blocks).

    Parameters
    ----------
    path
        Output YAML (written atomically).
    hest_csv
        ``HEST_v1_1_0.csv``.

    Returns
    -------
    The path written.
    """
    s = build_manifest_from_hest_csv(hest_csv)
    held = s[s.role == "held-out"]
    counts = held.organ.value_counts().sort_index()
    header = _HEADER.format(
        n=len(s), n_organs=s.organ.nunique(), held_out=", ".join(HELD_OUT_ORGANS),
        n_held=len(held), held_counts=", ".join(f"{o} {c}" for o, c in counts.items()),
        n_train_organs=len(TRAIN_ORGANS), train=", ".join(TRAIN_ORGANS), n_train=int((s.role == "train").sum()),
    )
    blocks = {
        "version": 1,
        "hest": {
            "repo": "MahmoodLab/hest", "repo_type": "dataset", "version": "v1.1.0",
            "url": "https://huggingface.co/datasets/MahmoodLab/hest",
            "metadata_csv": "HEST_v1_1_0.csv",
            "licence": "CC BY-NC-SA 4.0",
            "access": "gated: accept the terms on Hugging Face; token from the environment / HF cache only",
            "selection": "st_technology == 'Xenium' and species == 'Homo sapiens'",
            "files_per_sample": ["wsis/{id}.tif", "metadata/{id}.json", "transcripts/{id}_transcripts.parquet",
                                 "xenium_seg/{id}_xenium_nucleus_seg.parquet", "cellvit_seg/{id}_cellvit_seg.parquet"],
        },
        "pannuke": {
            "source": "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke",
            "licence": "CC BY-NC-SA 4.0",
            "n_tissues": 19, "magnification": "40x", "um_per_px": 0.25, "tile_px": 256,
            "layout": "Fold {k}/images/fold{k}/images.npy, types.npy; Fold {k}/masks/fold{k}/masks.npy",
            "folds": [
                {"fold": k, "file": f"fold_{k}.zip",
                 "url": f"https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_{k}.zip",
                 "n_images": n, "size": None, "sha256": None,
                 "note": "file name as offered on the TIA Centre page; size (bytes) and sha256 unknown "
                         "(not published; not verified offline): fill them in after a first verified download"}
                for k, n in ((1, 2656), (2, 2523), (3, 2722))
            ],
            "protocol": "3-fold: train on one fold, validate on another, test on the third; never test on a training fold",
        },
        "demo": {
            "generator": "stlib.demo", "seed": 0,
            "organs": {"train": ["Breast", "Lung", "Pancreas", "Prostate"], "held-out": ["Bowel", "Skin"]},
            "note": "synthetic cohort in HEST + PanNuke layout with ground truth: a test bed, not evidence",
        },
    }
    dump = lambda obj: yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)  # noqa: E731
    lines = [header, dump({"version": blocks["version"]}),
             "\n# HEST-1k release the samples come from\n", dump({"hest": blocks["hest"]}),
             "\n# PanNuke (baseline training data; 7,901 images over 3 folds)\n", dump({"pannuke": blocks["pannuke"]}),
             "\n# Synthetic demo cohort (profiles demo / workshop)\n", dump({"demo": blocks["demo"]}),
             f"\n# {len(s)} human Xenium samples of HEST-1k v1.1.0, by role then organ\nsamples:\n"]
    prev = None
    for rec in s.to_dict("records"):
        key = (rec["role"], rec["organ"])
        if key != prev:
            lines.append(f"  # {rec['role']}: {rec['organ']}\n")
            prev = key
        rec = {k: (None if pd.isna(v) else (int(v) if k == "panel_size" else v)) for k, v in rec.items()}
        lines.append("  - " + yaml.safe_dump(rec, default_flow_style=True, sort_keys=False, width=10_000,
                                             allow_unicode=True).strip() + "\n")
    text = "".join(lines)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
