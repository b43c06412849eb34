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
from collections.abc import Sequence
from typing import Any

import pandas as pd
import yaml

from stlib.utils import InputError, atomic_path, repo_root

__all__ = [
    "ANNOTATED_HE",
    "HELD_OUT_ORGANS",
    "PANNUKE_TISSUES_OF_ORGAN",
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

#: HEST organ -> PanNuke tissue names (``types.npy``): written into the manifest's
#: ``pannuke.tissues_of_organ`` by :func:`write_manifest_yaml`; code reads the manifest
#: (:meth:`Manifest.pannuke_tissues`), not this table. Bile-duct stays apart from Liver (a
#: neighbouring organ, not the hepatocyte tissue of HEST's liver samples).
PANNUKE_TISSUES_OF_ORGAN: dict[str, tuple[str, ...]] = {
    "Bowel": ("Colon",), "Breast": ("Breast",), "Kidney": ("Kidney",), "Liver": ("Liver",), "Lung": ("Lung",),
    "Ovary": ("Ovarian",), "Pancreas": ("Pancreatic",), "Prostate": ("Prostate",), "Skin": ("Skin",),
}
_PANNUKE_COMMENT = """
# PanNuke (baseline training data; 7,901 images over 3 folds). tissues_of_organ maps each HEST
# organ to its PanNuke tissues (types.npy): the PanNuke baseline without the held-out organs drops
# the tissues of the held-out organs, and PanNuke tiles of those tissues from a fold no baseline
# trained on are manual truth for the held-out organs. Bone, Brain, Heart and Lymphoid have no
# PanNuke tissue; Bile-duct is kept apart from Liver (a neighbouring organ, not hepatocytes).
"""

#: Columns of :attr:`Manifest.samples`, in order.
SAMPLE_FIELDS: tuple[str, ...] = (
    "id", "organ", "tissue", "disease_state", "oncotree_code", "pixel_size_um", "panel_size", "role",
)
_REQUIRED = ("id", "organ", "pixel_size_um", "role")


#: Real annotated H&E sets: ``stlib download monuseg|consep`` and the real-tissue chapter. Sizes and
#: SHA-256 of the MoNuSeg files were computed from the copy in ../shared/realdata (as mirrored in
#: github ykrmm/monuseg @93a696d); the CoNSeP archive's SHA-256 is the one pinned by a third-party
#: downloader (not published by the TIA centre), so a mismatch is reported, not silently accepted.
ANNOTATED_HE: dict[str, Any] = {
    "monuseg": {
        "source": "https://monuseg.grand-challenge.org/Data/",
        "licence": "CC BY-NC-SA 4.0",
        "cite": "Kumar et al., IEEE TMI 36(7) 2017; Kumar et al., IEEE TMI 39(5) 2020",
        "magnification": "40x",
        "um_per_px": "MicronsPerPixel of each XML (0.2456-0.2527; absent in TCGA-NH-A8F7)",
        "layout": "images/{name}.tif, annotations/{name}.xml",
        "official_access": "Google Drive archive linked from the challenge page (needs a browser)",
        "url_template": ("https://raw.githubusercontent.com/ykrmm/monuseg/93a696d5b608b963ff7083a059c93d5addbd985a/"
                         "datasets/MoNuSegTrainingData/{folder}/{file}"),
        "folders": {"image": "Tissue%20Images", "xml": "Annotations"},
        "note": ("the 13 training images whose XML is in that GitHub mirror; the URL layout is not verified "
                 "offline, the checksums are: a file that does not match is refused"),
        "files": [
        {"name": "TCGA-21-5784-01Z-00-DX1", "organ": "Lung", "image_size": 2499970, "image_sha256": "8e05b6f3c92f33f7f2606bee2fdb223db92f3b94559d2748b67d0b2d62960100",
         "xml_size": 3920375, "xml_sha256": "d49690dad9d115ef5b4651521effa31dc2849ce307e0527d9a6d9de49a5350d6"},
        {"name": "TCGA-21-5786-01Z-00-DX1", "organ": "Lung", "image_size": 2510688, "image_sha256": "fbee9258bc8df706b9bba8b30a8064b4aede797a54224715af28564c342296ef",
         "xml_size": 3740548, "xml_sha256": "a02e0eea799db7d65ec4a4e6ed87262b304e3d043cb1e2cb22a6eaba667a128e"},
        {"name": "TCGA-50-5931-01Z-00-DX1", "organ": "Lung", "image_size": 2677314, "image_sha256": "143c39a3f6925f4df146f4f90d07c5035838cdc365fb64963c61624844fb0f77",
         "xml_size": 3841552, "xml_sha256": "548fa69925df3500c02ccf218547c028f33e7594c570717bfefcf29d42bb5c1e"},
        {"name": "TCGA-A7-A13E-01Z-00-DX1", "organ": "Breast", "image_size": 2411084, "image_sha256": "132bcb7f423a1f82aa24a46526bbc7cd494cd02a87992df4c1dc35e9925c3532",
         "xml_size": 3046342, "xml_sha256": "2ec624361299072295cf9cdff99e010e31a5edd20817da409d492b0aa66c4607"},
        {"name": "TCGA-AR-A1AK-01Z-00-DX1", "organ": "Breast", "image_size": 2488404, "image_sha256": "d60ce260a27d5f4bfac1e1e5dd3aefb7c2bb79b8ff070029d4bd293ae564fb0f",
         "xml_size": 2997755, "xml_sha256": "893609de156b908222db4fc81f5a5b6af1b1426aef75438db9c5fa8fc0290917"},
        {"name": "TCGA-AR-A1AS-01Z-00-DX1", "organ": "Breast", "image_size": 2666288, "image_sha256": "8944c2bcd11ff7c8b9ac35e2e7fbddb380f000586306ec47e15cad6f7a0441a5",
         "xml_size": 3721820, "xml_sha256": "14a64ebc8d07e016de14be9f3312b27e1d2ddaeb4387f9096bb3b2b8496bf4bb"},
        {"name": "TCGA-B0-5698-01Z-00-DX1", "organ": "Kidney", "image_size": 2207620, "image_sha256": "c64a9d2838d8a16f6ba5cc93a5fc021cedf069da1c347262237ae1af7448131d",
         "xml_size": 2183421, "xml_sha256": "618b62e43ef762fefea5c1e8f148c119107e9ba85c64719552c4718b2a0196a3"},
        {"name": "TCGA-B0-5710-01Z-00-DX1", "organ": "Kidney", "image_size": 2014962, "image_sha256": "0eb115e1aee44ff1fc3ee9cc496319d02212215a30922bb2e65da778fa7c611a",
         "xml_size": 1120359, "xml_sha256": "78f0dd170aa1bb3c8282837fd10ab37bfa618067d468f9dd252fe4638a401562"},
        {"name": "TCGA-B0-5711-01Z-00-DX1", "organ": "Kidney", "image_size": 2182636, "image_sha256": "7384ad4fe3ae9bab49dc7df10d7158ca7767e1c46c0a1661632ba090a4ec737d",
         "xml_size": 3498960, "xml_sha256": "88dad5dd2b7e3c19e18f1011eeb78d80c01fe375251ea39e2bc586e1a6709b60"},
        {"name": "TCGA-CH-5767-01Z-00-DX1", "organ": "Prostate", "image_size": 2121570, "image_sha256": "aa2865bd0cd60617d9372659bd3284fee8d132d9c79c1008e1fae7e6aa87dfec",
         "xml_size": 2382226, "xml_sha256": "61e4caa06f0db2af412e819b6c6c1052a35ff855a80e0c3841f988b090f5eb96"},
        {"name": "TCGA-E2-A1B5-01Z-00-DX1", "organ": "Breast", "image_size": 2594042, "image_sha256": "26e77a18d6ea4ee5224b84e5837a207e60c634ec4753e7ddfa248537d3907210",
         "xml_size": 3657640, "xml_sha256": "adbc0912327a3aff03b9d5fe156e58a93d560df583c6cf211088507d0bc12d3a"},
        {"name": "TCGA-G9-6362-01Z-00-DX1", "organ": "Prostate", "image_size": 2133616, "image_sha256": "4be4e6d71053eee0408fcffe8a7ca40d758a03053d9a3302d395a2a247276423",
         "xml_size": 3229206, "xml_sha256": "12bf75d35b745fd73aa8a159fa082616f3001fe1a8d355fc17a0292d882fa2e3"},
        {"name": "TCGA-NH-A8F7-01A-01-TS1", "organ": "Bowel", "image_size": 2164648, "image_sha256": "be919c53a36bc39f084888587acb5afc2aec22fc57367a3ebe3a26f76f2e0c81",
         "xml_size": 3681776, "xml_sha256": "3906362573759fa8f4cec1cc6670c485560aa0d5cca1fb403a8902d27b1e7941"},
        ],
    },
    "consep": {
        "source": "https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/",
        "licence": "CC BY-NC-SA, non-commercial (TIA Centre, University of Warwick)",
        "cite": "Graham et al., Medical Image Analysis 58, 2019",
        "magnification": "40x",
        "um_per_px": 0.25,
        "file": "consep.zip",
        "url": "https://warwick.ac.uk/fac/sci/dcs/research/tia/data/hovernet/consep.zip",
        "size": None,
        "sha256": "23eb8a717551827b4d42642b08bd64370810acf6e6e73a399182c1c915dfe82a",
        "layout": "CoNSeP/{Train,Test}/Images/{name}.png, Labels/{name}.mat (inst_map, type_map: 7 classes)",
        "n_images": {"Train": 27, "Test": 14},
        "note": ("sha256 as pinned by a third-party downloader, size unknown: neither verified offline; "
                 "the HoVer-Net patch export (images/, inst/, type_mat/) is accepted as a --mirror too"),
    },
}


@dataclass(frozen=True)
class Manifest:
    """A validated data manifest.

    Attributes
    ----------
    samples
        One row per HEST sample: ``id``, ``organ``, ``tissue``, ``disease_state``,
        ``oncotree_code``, ``pixel_size_um``, ``panel_size``, ``role``.
    hest, pannuke, demo, annotated_he
        The corresponding YAML blocks as dicts (``annotated_he``: MoNuSeg / CoNSeP).
    path
        The file read.
    """

    samples: pd.DataFrame
    hest: dict[str, Any] = field(default_factory=dict)
    pannuke: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    annotated_he: dict[str, Any] = field(default_factory=dict)

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

    def pannuke_tissues(self, organs: Sequence[str]) -> list[str]:
        """PanNuke tissue names (``types.npy``) of HEST organs, from ``pannuke.tissues_of_organ``.

        The one place where the two vocabularies meet: the restricted PanNuke baseline drops
        ``pannuke_tissues(held-out organs)`` and the evaluation scores PanNuke tiles of those
        tissues as manual truth of the held-out organs. An organ without PanNuke tissue maps to
        nothing; an organ the table does not list is an error (the table must be complete).
        """
        table = self.pannuke.get("tissues_of_organ") or {}
        missing = sorted(set(organs) - set(table))
        if missing:
            raise InputError(f"organ(s) {missing} have no entry in pannuke.tissues_of_organ", path=self.path,
                             fix="add them (an empty list when PanNuke has no such tissue)")
        return sorted({t for o in organs for t in (table[o] or [])})

    def organ_of_pannuke_tissue(self) -> dict[str, str]:
        """PanNuke tissue -> HEST organ (inverse of ``pannuke.tissues_of_organ``)."""
        return {t: o for o, ts in (self.pannuke.get("tissues_of_organ") or {}).items() for t in (ts or [])}

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


def _validate_tissue_map(table: Any, path: Path) -> None:
    """``pannuke.tissues_of_organ``: HEST organ -> list of PanNuke tissue names, each tissue once."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise InputError("pannuke.tissues_of_organ must map organs to lists of PanNuke tissues", path=path,
                         fix="write e.g. tissues_of_organ: {Bowel: [Colon], Bone: []}")
    seen: dict[str, str] = {}
    for organ, tissues in table.items():
        if organ not in KNOWN_ORGANS:
            raise InputError(f"pannuke.tissues_of_organ names unknown organ {organ!r}", path=path,
                             fix=f"use one of {list(KNOWN_ORGANS)}")
        if not isinstance(tissues, list) or not all(isinstance(t, str) for t in tissues):
            raise InputError(f"pannuke.tissues_of_organ[{organ}] must be a list of tissue names", path=path)
        for t in tissues:
            if t in seen:
                raise InputError(f"PanNuke tissue {t!r} is mapped to both {seen[t]} and {organ}", path=path,
                                 fix="map each PanNuke tissue to one organ")
            seen[t] = organ


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
    _validate_tissue_map(pannuke.get("tissues_of_organ"), path)
    return Manifest(samples=samples, hest=data.get("hest") or {}, pannuke=pannuke,
                    demo=_validate_demo(data.get("demo"), path), path=path,
                    annotated_he=data.get("annotated_he") or {})


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
            "tissues_of_organ": {o: list(PANNUKE_TISSUES_OF_ORGAN.get(o, ())) for o in KNOWN_ORGANS},
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
             _PANNUKE_COMMENT, dump({"pannuke": blocks["pannuke"]}),
             "\n# Synthetic demo cohort (profiles demo / workshop)\n", dump({"demo": blocks["demo"]}),
             "\n# Real annotated H&E (MoNuSeg, CoNSeP): stlib download monuseg|consep; the real-tissue chapter\n",
             dump({"annotated_he": ANNOTATED_HE}),
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
