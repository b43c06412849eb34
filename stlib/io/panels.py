"""Gene lists of the 10x Xenium human panels, shipped with stlib.

The CSVs in ``stlib/data/panels`` come from the MIT-licensed XeniumPanelExplorer reference
panels (see ``stlib/data/panels/LICENSE``); they let the demo generator and the marker sets
use real panel genes without network access.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

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
