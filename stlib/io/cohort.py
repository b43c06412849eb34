"""Which samples a run uses, with their roles: one table for the demo cohort and HEST alike.

Roles come, in order, from the demo cohort's ``cohort.json`` (synthetic data), from
``data_manifest.yaml`` by sample id, and finally from the manifest's held-out *organs* (so a
local HEST mirror of samples the manifest does not list still gets an honest role: an organ that
is held out stays held out).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stlib.utils import InputError, read_json

ROLES = ("train", "held-out")


def hest_dir(data_dir: str | os.PathLike) -> Path:
    """The HEST layout folder of a data root (``{data_dir}/hest``)."""
    return Path(data_dir) / "hest"


def _demo_roles(data_dir: Path) -> dict[str, dict]:
    p = data_dir / "cohort.json"
    if not p.is_file():
        return {}
    meta = read_json(p)
    return {s["sample_id"]: s for s in meta.get("samples", [])}


def cohort_table(data_dir: str | os.PathLike, *, samples: Sequence[str] = (),
                 manifest: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per sample present under ``{data_dir}/hest``: metadata, role and file sizes.

    Parameters
    ----------
    data_dir
        Data root (``hest/`` inside; ``cohort.json`` for the synthetic cohort).
    samples
        Restrict to these ids (an id with no files is an error naming it).
    manifest
        ``data_manifest.yaml`` (default: the repository's).

    Returns
    -------
    DataFrame with ``sample``, ``organ``, ``disease_state``, ``oncotree_code``, ``um_per_px``,
    ``role``, ``role_source``, ``synthetic``, ``n_transcripts`` (rows in the transcripts file) and
    ``wsi_shape``.
    """
    import pyarrow.parquet as pq

    from stlib.io.hest import HestSample, list_samples
    from stlib.io.manifest import load_manifest

    data_dir = Path(data_dir)
    hd = hest_dir(data_dir)
    if not hd.is_dir():
        raise InputError("no HEST layout folder", path=hd,
                         fix="generate the demo cohort (stlib demo --out DATA) or download HEST samples into DATA/hest")
    present = list_samples(hd)
    ids = list(samples) if samples else present
    missing = [s for s in ids if s not in present]
    if missing:
        raise InputError(f"sample(s) {missing} not found", path=hd,
                         fix="download them (stlib download hest --ids ...) or fix `samples`")
    demo = _demo_roles(data_dir)
    # roles of samples cohort.json does not list come from data_manifest.yaml only (no typed default)
    man_error: InputError | None = None
    try:
        man = load_manifest(manifest)
        man_roles = dict(zip(man.samples["id"], man.samples["role"]))
        held_organs = set(man.organs("held-out"))
    except InputError as e:
        man_roles, held_organs, man_error = {}, set(), e
    unlisted = [sid for sid in ids if sid not in demo and sid not in man_roles]
    if man_error is not None and unlisted:
        raise InputError(f"the roles (train / held-out) of {unlisted} come from data_manifest.yaml, which could "
                         f"not be read: {man_error}", path=manifest or data_dir,
                         fix="restore data_manifest.yaml (the repository's) or pass manifest=PATH") from man_error
    rows = []
    for sid in ids:
        s = HestSample(hd, sid)
        if sid in demo:
            role = demo[sid]["role"]
            src = "cohort.json (synthetic)" if demo[sid].get("synthetic", True) else "cohort.json (real tissue)"
        elif sid in man_roles:
            role, src = man_roles[sid], "data_manifest.yaml (id)"
        else:
            role = "held-out" if s.organ in held_organs else "train"
            src = "data_manifest.yaml (organ)"
        n_tx = pq.ParquetFile(s.path("transcripts")).metadata.num_rows if s.has("transcripts") else 0
        with s.wsi() as w:
            shape = tuple(int(v) for v in w.shape)
        rows.append({"sample": sid, "organ": s.organ, "disease_state": s.disease_state,
                     "oncotree_code": s.oncotree_code, "um_per_px": float(s.pixel_size_um),
                     "role": role, "role_source": src, "synthetic": bool(demo[sid].get("synthetic", True))
                     if sid in demo else False,
                     "n_transcripts": int(n_tx), "wsi_shape": f"{shape[0]}x{shape[1]}"})
    table = pd.DataFrame(rows)
    if not table.empty:
        both = set(table.loc[table.role == "train", "organ"]) & set(table.loc[table.role == "held-out", "organ"])
        if both:
            raise InputError(f"organ(s) {sorted(both)} are both train and held-out in this cohort", path=data_dir,
                             fix="held-out organs must be absent from training; fix the roles")
    return table


def thumbnails(data_dir: str | os.PathLike, ids: Sequence[str], *, max_px: int = 512) -> list[np.ndarray]:
    """Slide thumbnails (RGB uint8) read from the smallest adequate pyramid level."""
    from stlib.io.hest import HestSample

    out = []
    for sid in ids:
        with HestSample(hest_dir(data_dir), sid).wsi() as w:
            out.append(w.thumbnail(max_px))
    return out


__all__ = ["cohort_table", "thumbnails", "hest_dir", "ROLES"]
