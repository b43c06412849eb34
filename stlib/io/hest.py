"""Readers for HEST-1k samples (the ``hest/`` folder of a data root), real or synthetic.

Layout (one sample ``{id}``; see DEVELOPING.md)::

    {hest_dir}/HEST_v1_1_0.csv                         metadata table
    {hest_dir}/metadata/{id}.json                      pixel_size_um_estimated, organ, ...
    {hest_dir}/wsis/{id}.tif                           pyramidal TIFF, level 0 = full resolution
    {hest_dir}/transcripts/{id}_transcripts.parquet    Xenium molecules + he_x, he_y (H&E px)
    {hest_dir}/xenium_seg/{id}_xenium_nucleus_seg.parquet   nucleus polygons, H&E px, index cell_id
    {hest_dir}/cellvit_seg/{id}_cellvit_seg.parquet    CellViT predictions (second opinion only)

HEST's ``st/{id}.h5ad`` of a Xenium sample holds 100 µm pseudo-spots, not cells: per-cell
expression is rebuilt here from the transcripts (``qv >= 20``, genes only), grouped by cell_id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stlib.constants import MIN_QV
from stlib.io.xenium import (
    UNASSIGNED,
    counts_from_transcripts,
    make_valid_polygons,
    normalise_cell_ids,
    read_transcripts_file,
)
from stlib.utils import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import geopandas as gpd

    from stlib.io.wsi import Wsi

__all__ = ["HEST_CSV_NAME", "HestSample", "list_samples", "read_hest_metadata_csv", "read_polygons_parquet"]

#: File name of the HEST metadata table shipped with HEST-1k v1.1.0.
HEST_CSV_NAME = "HEST_v1_1_0.csv"

#: kind -> path template relative to the HEST folder
_KINDS: dict[str, str] = {
    "wsi": "wsis/{id}.tif",
    "metadata": "metadata/{id}.json",
    "transcripts": "transcripts/{id}_transcripts.parquet",
    "xenium_seg": "xenium_seg/{id}_xenium_nucleus_seg.parquet",
    "cellvit_seg": "cellvit_seg/{id}_cellvit_seg.parquet",
}


def _resolve_hest_dir(hest_dir: str | os.PathLike) -> Path:
    """Accept the HEST folder itself or a data root holding ``hest/``."""
    p = Path(hest_dir)
    if not (p / "metadata").is_dir() and (p / "hest").is_dir():
        p = p / "hest"
    return p


def list_samples(hest_dir: str | os.PathLike) -> list[str]:
    """Sample ids present in a HEST folder (those with ``metadata/{id}.json``), sorted.

    Parameters
    ----------
    hest_dir
        The HEST folder (or a data root holding ``hest/``).

    Returns
    -------
    Sorted list of ids; falls back to ``wsis/*.tif`` stems when there is no metadata folder.
    """
    p = _resolve_hest_dir(hest_dir)
    if not p.is_dir():
        raise InputError("HEST folder not found", path=p,
                         fix="pass {data_dir}/hest (run `stlib demo` or `stlib download` first)")
    ids = {f.stem for f in (p / "metadata").glob("*.json")}
    if not ids:
        ids = {f.stem for f in (p / "wsis").glob("*.tif")}
    return sorted(ids)


def read_hest_metadata_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read the HEST metadata table (``HEST_v1_1_0.csv``; it starts with a UTF-8 BOM).

    Parameters
    ----------
    path
        The CSV file, or a folder holding ``HEST_v1_1_0.csv``.

    Returns
    -------
    DataFrame, one row per sample, with ``id`` as a column.
    """
    path = Path(path)
    if path.is_dir():
        path = path / HEST_CSV_NAME
    if not path.is_file():
        raise InputError("HEST metadata CSV not found", path=path,
                         fix="download assets/HEST_v1_1_0.csv of mahmoodlab/HEST, or generate the demo cohort")
    try:
        df = pd.read_csv(path, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"cannot parse the HEST metadata CSV ({e})", path=path,
                         fix="download the file again") from e
    df.columns = [str(c).strip() for c in df.columns]
    if "id" not in df.columns:
        raise InputError(f"HEST metadata CSV has no 'id' column (columns: {list(df.columns)[:8]}...)",
                         path=path, fix="pass HEST_v1_1_0.csv of mahmoodlab/HEST")
    df["id"] = df["id"].astype(str).str.strip()
    return df


def read_polygons_parquet(path: str | os.PathLike, *, sample: str | None = None) -> gpd.GeoDataFrame:
    """Read a (Geo)Parquet of polygons; index = ``cell_id`` as ``str``; invalid polygons repaired.

    Accepts a GeoParquet (geo metadata) or a plain parquet with a WKB ``geometry`` column; the
    cell id comes from a ``cell_id`` column when present, else from the stored index.
    """
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, sample=sample,
                         fix="download the sample's segmentation, or regenerate the demo cohort")
    try:
        schema = pq.read_schema(path)
        if schema.metadata and b"geo" in schema.metadata:
            gdf = gpd.read_parquet(path)
        else:
            df = pd.read_parquet(path)
            if "geometry" not in df.columns:
                raise InputError(f"no geometry column (columns: {list(df.columns)})", path=path, sample=sample,
                                 fix="expected a GeoParquet of polygons")
            geom = df.pop("geometry").to_numpy()
            geom = shapely.from_wkb(geom) if len(geom) and isinstance(geom[0], bytes) else shapely.from_wkt(geom)
            gdf = gpd.GeoDataFrame(df, geometry=geom)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read polygons ({e})", path=path, sample=sample,
                         fix="the file is corrupt or truncated: download it again") from e
    raw_ids = gdf.pop("cell_id").to_numpy() if "cell_id" in gdf.columns else gdf.index.to_numpy()
    ids = normalise_cell_ids(raw_ids, path=path, sample=sample)
    gdf.index = pd.Index(ids.astype(str), name="cell_id")
    gdf = gdf.set_geometry(make_valid_polygons(gdf.geometry.to_numpy()), crs=gdf.crs)
    gdf = gdf[~gdf.geometry.isna()]
    gdf.attrs["source"] = str(path)
    return gdf


class HestSample:
    """One HEST-1k sample.

    Parameters
    ----------
    hest_dir
        The HEST folder (or a data root holding ``hest/``).
    sample_id
        The sample id, e.g. ``"TENX95"``.

    Examples
    --------
    >>> s = HestSample("data/demo/hest", "DEMO_BREAST_0")     # doctest: +SKIP
    >>> s.organ, s.pixel_size_um                               # doctest: +SKIP
    >>> adata = s.cells()                                      # doctest: +SKIP
    """

    def __init__(self, hest_dir: str | os.PathLike, sample_id: str) -> None:
        self.root = _resolve_hest_dir(hest_dir)
        self.id = str(sample_id)
        if not self.root.is_dir():
            raise InputError("HEST folder not found", path=self.root, sample=self.id,
                             fix="pass {data_dir}/hest (run `stlib demo` or `stlib download` first)")
        self._metadata: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"HestSample({str(self.root)!r}, {self.id!r})"

    # -- paths and metadata --------------------------------------------------------------
    def path(self, kind: str) -> Path:
        """Path of one file of the sample (it may not exist).

        Parameters
        ----------
        kind
            One of ``"wsi"``, ``"metadata"``, ``"transcripts"``, ``"xenium_seg"``, ``"cellvit_seg"``.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {list(_KINDS)}, got {kind!r}")
        return self.root / _KINDS[kind].format(id=self.id)

    def has(self, kind: str) -> bool:
        """Whether the file of ``kind`` exists."""
        return self.path(kind).is_file()

    def _require(self, kind: str, fix: str | None = None) -> Path:
        p = self.path(kind)
        if not p.is_file():
            raise InputError(f"{kind} file not found", path=p, sample=self.id,
                             fix=fix or f"download the sample (`stlib download hest --ids {self.id} --out DATA/hest`) "
                                        "or regenerate the demo cohort")
        return p

    @property
    def metadata(self) -> dict[str, Any]:
        """``metadata/{id}.json`` as a dict."""
        if self._metadata is None:
            p = self._require("metadata")
            try:
                meta = json.loads(p.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"metadata is not valid JSON ({e})", path=p, sample=self.id,
                                 fix="download the sample's metadata again") from e
            if not isinstance(meta, dict):
                raise InputError(f"metadata JSON is a {type(meta).__name__}, expected an object", path=p,
                                 sample=self.id, fix="download the sample's metadata again")
            self._metadata = meta
        return self._metadata

    @property
    def pixel_size_um(self) -> float:
        """µm per level-0 H&E pixel (``pixel_size_um_estimated``, else ``pixel_size_um_embedded``)."""
        for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
            v = self.metadata.get(key)
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if np.isfinite(v) and v > 0:
                return v
        raise InputError("metadata has no positive pixel_size_um_estimated", path=self.path("metadata"),
                         sample=self.id, fix="add pixel_size_um_estimated (µm/px of the WSI level 0)")

    @property
    def organ(self) -> str | None:
        """Organ (HEST vocabulary: Lung, Breast, Bowel, ...)."""
        return self._meta_str("organ")

    @property
    def disease_state(self) -> str | None:
        """``Cancer`` / ``Healthy`` / ``Diseased``."""
        return self._meta_str("disease_state")

    @property
    def oncotree_code(self) -> str | None:
        """OncoTree code, ``None`` for non-cancer samples."""
        return self._meta_str("oncotree_code")

    def _meta_str(self, key: str) -> str | None:
        v = self.metadata.get(key)
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "nan", "NaN"):
            return None
        return str(v).strip()

    # -- data ----------------------------------------------------------------------------
    def wsi(self, *, decode_workers: int | None = None) -> Wsi:
        """Open the whole-slide image (level 0 µm/px from the metadata; ``decode_workers``:
        :func:`stlib.io.wsi.open_wsi`)."""
        from stlib.io.wsi import open_wsi

        return open_wsi(self._require("wsi"), um_per_px=self.pixel_size_um, decode_workers=decode_workers)

    def transcripts(self, *, min_qv: float | None = MIN_QV, genes_only: bool = True,
                    columns: Sequence[str] | None = None, drop_unassigned: bool = False,
                    allow_missing_cell_id: bool = False) -> pd.DataFrame:
        """The sample's molecules, filtered.

        Parameters
        ----------
        min_qv
            Keep ``qv >= min_qv`` (``None`` keeps all).
        genes_only
            Drop control probes / codewords (``is_gene`` / ``codeword_category`` when present,
            else the control-name prefixes).
        columns
            Columns to return (``None`` = all, plus ``assigned``).
        drop_unassigned
            Drop molecules outside any cell; else they are kept with ``cell_id == "UNASSIGNED"``
            and ``assigned == False``.
        allow_missing_cell_id
            Read a transcripts parquet that has no ``cell_id`` (all molecules unassigned)
            instead of raising.

        Returns
        -------
        DataFrame; ``cell_id`` is ``str`` whatever the file stores (int, str or bytes).
        """
        return read_transcripts_file(self._require("transcripts"), min_qv=min_qv, genes_only=genes_only,
                                     drop_unassigned=drop_unassigned, columns=columns, sample=self.id,
                                     allow_missing_cell_id=allow_missing_cell_id)

    def nuclei(self) -> gpd.GeoDataFrame:
        """Xenium (DAPI) nucleus polygons in H&E level-0 px, indexed by ``cell_id`` (str)."""
        return read_polygons_parquet(self._require("xenium_seg"), sample=self.id)

    def cellvit(self) -> gpd.GeoDataFrame | None:
        """CellViT nucleus predictions (H&E px) or ``None`` when the file is absent."""
        p = self.path("cellvit_seg")
        return read_polygons_parquet(p, sample=self.id) if p.is_file() else None

    def cells(self, *, min_qv: float | None = MIN_QV, nucleus_only: bool = False) -> anndata.AnnData:
        """Per-cell gene counts from the transcripts.

        Parameters
        ----------
        min_qv
            Molecule quality threshold.
        nucleus_only
            Count only molecules inside the nucleus (``overlaps_nucleus == 1``).

        Returns
        -------
        AnnData (cells with at least one counted molecule x genes of the panel seen in the
        transcripts): ``X`` CSR int32; ``obs`` = ``cell_id``, ``sample``, ``organ``, ``n_counts``,
        ``n_genes``, ``has_nucleus``; ``obsm["spatial"]`` = nucleus centroid in H&E level-0 px
        (mean ``he_x``/``he_y`` of the cell's molecules when it has no polygon or there is no
        segmentation file; NaN when neither exists); ``uns["pixel_size_um"]``.
        """
        import pyarrow.parquet as pq

        p = self._require("transcripts")
        have = set(pq.read_schema(p).names)
        cols = ["cell_id", "feature_name"]
        cols += [c for c in ("he_x", "he_y") if c in have]
        if nucleus_only:
            if "overlaps_nucleus" not in have:
                raise InputError("transcripts have no overlaps_nucleus column", path=p, sample=self.id,
                                 fix="call cells(nucleus_only=False)")
            cols.append("overlaps_nucleus")
        tx = self.transcripts(min_qv=min_qv, genes_only=True, columns=cols, drop_unassigned=True)
        if nucleus_only:
            tx = tx[tx["overlaps_nucleus"].to_numpy().astype(bool)]
        adata = counts_from_transcripts(tx, sample=self.id)
        adata.obs["organ"] = self.organ or "unknown"
        xy = np.full((adata.n_obs, 2), np.nan)
        if {"he_x", "he_y"} <= set(tx.columns) and len(tx):
            mean_xy = tx.groupby("cell_id", sort=False)[["he_x", "he_y"]].mean()
            xy = mean_xy.reindex(adata.obs_names).to_numpy(np.float64)
        has_nucleus = np.zeros(adata.n_obs, bool)
        if self.has("xenium_seg"):
            nuc = self.nuclei()
            nuc = nuc[~nuc.index.duplicated()]
            cent = nuc.geometry.centroid
            cxy = np.c_[cent.x.to_numpy(), cent.y.to_numpy()]
            idx = pd.Index(nuc.index).get_indexer(adata.obs_names)
            has_nucleus = idx >= 0
            xy[has_nucleus] = cxy[idx[has_nucleus]]
        adata.obs["has_nucleus"] = has_nucleus
        adata.obsm["spatial"] = xy
        if self.has("metadata"):
            adata.uns["pixel_size_um"] = self.pixel_size_um
        adata.uns["spatial_units"] = "H&E level-0 px"
        return adata

    def unassigned_fraction(self, *, min_qv: float | None = MIN_QV) -> float:
        """Fraction of (gene, qv-passing) molecules not assigned to any cell."""
        tx = self.transcripts(min_qv=min_qv, columns=["cell_id"])
        return float((tx["cell_id"] == UNASSIGNED).mean()) if len(tx) else float("nan")
