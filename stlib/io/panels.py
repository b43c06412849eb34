"""Gene lists of the 10x Xenium human panels, shipped with stlib.

The CSVs in ``stlib/data/panels`` come from the MIT-licensed XeniumPanelExplorer reference
panels (see ``stlib/data/panels/LICENSE``); they let the demo generator and the marker sets
use real panel genes without network access.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from stlib.utils import InputError

#: panel id -> file name inside stlib/data/panels
PANELS = {
    "hMulti": "hMulti.csv", "hBreast": "hBreast.csv", "hColon": "hColon.csv",
    "hLung": "hLung.csv", "hSkin": "hSkin.csv", "hPrime5K": "hPrime5K.csv",
}


def panel_names() -> list[str]:
    """Ids of the panels shipped with stlib."""
    return list(PANELS)


@lru_cache(maxsize=None)
def load_panel_table(name: str) -> pd.DataFrame:
    """The panel table (``gene``, ``Ensembl ID``, annotated tissues / cell types)."""
    if name not in PANELS:
        raise InputError(f"unknown Xenium panel {name!r}", fix=f"one of {panel_names()}")
    with resources.files("stlib.data.panels").joinpath(PANELS[name]).open("r") as fh:
        return pd.read_csv(fh)


def load_panel(name: str) -> list[str]:
    """Gene symbols of a panel, in file order (e.g. 377 for ``hMulti``)."""
    return load_panel_table(name)["gene"].astype(str).tolist()


@lru_cache(maxsize=1)
def gene_positions() -> pd.DataFrame:
    """GRCh38 positions of the shipped panels' genes (``gene``, ``chromosome``, ``start``, ``end``).

    See ``stlib/data/gene_positions.README.md`` for the source (GENCODE) and the recipe.
    """
    with resources.files("stlib.data").joinpath("gene_positions.csv").open("r") as fh:
        return pd.read_csv(fh, comment="#")


def genomic_order(genes: list[str]) -> np.ndarray:
    """Indices of ``genes`` that have a position, sorted by chromosome (1..22, X, Y) and start."""
    pos = gene_positions().drop_duplicates("gene").set_index("gene")
    rank = {f"chr{c}": i for i, c in enumerate([*map(str, range(1, 23)), "X", "Y"])}
    rows = [(rank.get(pos.at[g, "chromosome"], 99), float(pos.at[g, "start"]), i)
            for i, g in enumerate(genes) if g in pos.index]
    rows.sort()
    return np.array([r[2] for r in rows], dtype=int)


#: Approximate centromere midpoints of GRCh38 (Mb; UCSC hg38 centromere annotation, rounded):
#: a gene starting before it lies on the p arm, after it on the q arm. A genome fact shared by the
#: demo generator (arm-level copy-number events) and the labeler (genes per arm on a panel).
CENTROMERE_MB: dict[str, float] = {
    "chr1": 123.4, "chr2": 93.9, "chr3": 90.9, "chr4": 50.0, "chr5": 48.8, "chr6": 59.8, "chr7": 60.1,
    "chr8": 45.2, "chr9": 43.0, "chr10": 39.8, "chr11": 53.4, "chr12": 35.5, "chr13": 17.7, "chr14": 17.2,
    "chr15": 19.0, "chr16": 36.8, "chr17": 25.1, "chr18": 18.5, "chr19": 26.2, "chr20": 28.1, "chr21": 12.0,
    "chr22": 15.0, "chrX": 60.6, "chrY": 10.4,
}


def chromosome_arms(genes: list[str]) -> np.ndarray:
    """Chromosome arm of each gene (``"chr8q"``; ``""`` for genes without a GRCh38 position).

    Arms are split at :data:`CENTROMERE_MB` by the gene's start.
    """
    pos = gene_positions().drop_duplicates("gene").set_index("gene")
    out = np.full(len(genes), "", dtype=object)
    for i, g in enumerate(genes):
        if g in pos.index:
            c = str(pos.at[g, "chromosome"])
            if c in CENTROMERE_MB:
                out[i] = c + ("p" if float(pos.at[g, "start"]) < CENTROMERE_MB[c] * 1e6 else "q")
    return out


def read_panel_dir(path: str | Path | None = None) -> dict[str, list[str]]:
    """Gene lists of every panel CSV in a folder (a ``gene`` column each), by file stem.

    ``path=None`` (or a folder that does not exist) gives the panels shipped with stlib. The
    real-data folder ``realdata/xenium-panels`` holds the same files as ``stlib/data/panels``.
    """
    if path is not None and Path(path).is_dir():
        out = {}
        for p in sorted(Path(path).glob("*.csv")):
            t = pd.read_csv(p)
            if "gene" in t.columns:
                out[p.stem] = t["gene"].astype(str).tolist()
        if out:
            return out
    return {name: load_panel(name) for name in panel_names()}
