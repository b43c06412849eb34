"""Readers for raw 10x Xenium output bundles, and the transcript helpers shared with HEST.

A Xenium output folder (any XOA version from 1.0) holds, among others:

- ``experiment.xenium``: JSON manifest (``pixel_size`` = 0.2125 µm per morphology pixel);
- ``cells.parquet`` / ``cells.csv.gz``: one row per cell (centroids in µm);
- ``transcripts.parquet`` or (XOA 1.x) ``transcripts.csv[.gz]``: one row per decoded molecule
  (``cell_id``, ``feature_name``, ``qv``, ``x_location``, ``y_location`` in µm, and from XOA 3
  ``is_gene`` / ``codeword_category``);
- ``nucleus_boundaries.*`` / ``cell_boundaries.*``: one row per polygon vertex in µm
  (``cell_id``, ``vertex_x``, ``vertex_y`` and, from XOA 2.0, ``label_id``);
- ``cell_feature_matrix.h5``: 10x HDF5 count matrix;
- ``{prefix}_he_imagealignment.csv``: 3x3 affine exported by Xenium Explorer mapping H&E
  level-0 pixels to morphology pixels (or a keypoints CSV from which one is fitted).

Every reader normalises ``cell_id`` to ``str`` whatever it is stored as (int in XOA 1.x and
R exports, str such as ``"aaabbbcc-1"`` from XOA 1.3, bytes in some HDF5/parquet files), drops
control probes when asked for genes only, filters molecules by ``qv`` and raises
:class:`~stlib.utils.InputError` naming the file and the fix for unreadable input.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stlib.constants import CONTROL_PREFIXES, MIN_QV, XENIUM_PIXEL_SIZE_UM, is_control_feature
from stlib.utils import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import geopandas as gpd
    import pyarrow as pa

__all__ = [
    "UNASSIGNED",
    "XeniumBundle",
    "counts_from_transcripts",
    "fit_affine",
    "make_valid_polygons",
    "normalise_cell_ids",
    "normalise_transcripts",
    "read_boundaries",
    "read_cell_feature_matrix",
    "read_he_alignment",
    "read_transcripts_file",
    "um_to_he_px_matrix",
]

log = logging.getLogger(__name__)

#: The one token every reader uses for a molecule not assigned to any cell.
UNASSIGNED = "UNASSIGNED"
#: String cell ids that mean "no cell" (XOA >= 1.3 writes "UNASSIGNED"; integer exports use -1).
_UNASSIGNED_STR = ("UNASSIGNED", "-1", "", "0")
#: codeword_category values that are genes (XOA >= 3).
_GENE_CATEGORIES = ("predesigned_gene", "custom_gene")


# --------------------------------------------------------------------------------------------
# cell ids
# --------------------------------------------------------------------------------------------
def _cell_id_to_arrow_str(arr: pa.ChunkedArray | pa.Array, *, path: Path | None = None,
                          sample: str | None = None) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Cast a cell-id column to arrow strings; return ``(ids, unassigned_mask)``.

    Integer ids: ``<= 0`` or null is unassigned (Xenium integer ids start at 1, -1 = none).
    String / bytes ids: null, ``"UNASSIGNED"``, ``"-1"``, ``""`` and ``"0"`` are unassigned.
    Unassigned entries are rewritten to :data:`UNASSIGNED`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.Array):
        arr = pa.chunked_array([arr])
    typ = arr.type
    if pa.types.is_dictionary(typ):
        arr = arr.cast(typ.value_type)
        typ = arr.type
    if pa.types.is_floating(typ):
        vals = arr.to_numpy(zero_copy_only=False)
        finite = vals[np.isfinite(vals)]
        if finite.size and not np.all(finite == np.round(finite)):
            raise InputError("cell_id column holds non-integer floats", path=path, sample=sample,
                             fix="cell ids must be integers or strings; check the file's cell_id column")
        arr = pc.cast(arr, pa.int64(), safe=False)
        typ = arr.type
    if pa.types.is_null(typ):  # an all-null (or empty) column: nothing is assigned
        n = len(arr)
        return (pa.chunked_array([pa.array([UNASSIGNED] * n, pa.string())]),
                pa.chunked_array([pa.array(np.ones(n, bool))]))
    if pa.types.is_integer(typ):
        unassigned = pc.fill_null(pc.less_equal(arr, 0), True)
        ids = pc.cast(arr, pa.string())
    elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ):
        try:
            ids = pc.cast(pc.cast(arr, pa.binary()) if pa.types.is_fixed_size_binary(typ) else arr,
                          pa.string())
        except pa.ArrowInvalid as e:
            raise InputError(f"cell_id bytes are not UTF-8 ({e})", path=path, sample=sample,
                             fix="re-export the file with text cell ids") from e
        ids = pc.utf8_trim_whitespace(ids)
        unassigned = pc.or_(pc.is_null(ids), pc.fill_null(pc.is_in(ids, pa.array(_UNASSIGNED_STR)), True))
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        ids = pc.cast(arr, pa.string())
        unassigned = pc.or_(pc.is_null(ids), pc.fill_null(pc.is_in(ids, pa.array(_UNASSIGNED_STR)), True))
    else:
        raise InputError(f"cell_id column has unsupported type {typ}", path=path, sample=sample,
                         fix="cell ids must be integers, strings or bytes")
    ids = pc.if_else(unassigned, pa.scalar(UNASSIGNED), ids)
    return ids, unassigned


def normalise_cell_ids(values: Any, *, path: str | os.PathLike | None = None,
                       sample: str | None = None) -> np.ndarray:
    """Cell ids as an object array of ``str``; unassigned ones become :data:`UNASSIGNED`.

    Parameters
    ----------
    values
        Array-like of ints, strings or bytes (a pandas Series, numpy array, list or arrow array).
    path, sample
        Named in errors.

    Returns
    -------
    Object array of ``str``, same length.

    Examples
    --------
    >>> normalise_cell_ids([3, -1]).tolist()
    ['3', 'UNASSIGNED']
    >>> normalise_cell_ids([b"aaab-1", "UNASSIGNED"]).tolist()
    ['aaab-1', 'UNASSIGNED']
    """
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values
    else:
        a = np.asarray(values.to_numpy() if isinstance(values, pd.Series) else values)
        typ = None
        if a.dtype == object and a.size:
            first = next((v for v in a if v is not None and not (isinstance(v, float) and np.isnan(v))), None)
            if isinstance(first, bytes):
                typ = pa.binary()
            elif isinstance(first, (int, np.integer)):
                a = pd.array(a, dtype="Int64")
            elif pd.api.types.infer_dtype(a, skipna=False) == "string":
                typ = pa.string()  # all str already (a pandas index read from parquet): no per-value pass
            else:
                a = np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                              for v in a], dtype=object)
        arr = pa.array(a, type=typ, from_pandas=True)
    ids, _ = _cell_id_to_arrow_str(arr, path=None if path is None else Path(path), sample=sample)
    return np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)


# --------------------------------------------------------------------------------------------
# transcripts
# --------------------------------------------------------------------------------------------
def _drop_row_index_columns(table: pa.Table) -> pa.Table:
    """Drop the leading unnamed row-index column that R's write.csv adds ("" / "Unnamed: 0")."""
    drop = [n for n in table.column_names
            if n in ("", "...1", "__index_level_0__") or n.startswith("Unnamed: ")]
    return table.drop_columns(drop) if drop else table


def _read_table(path: Path, *, columns: Sequence[str] | None = None, sample: str | None = None) -> pa.Table:
    """Read a parquet or (gzipped) CSV file into an arrow table, with errors naming the file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError("file not found", path=path, sample=sample,
                         fix="check the path, or download / regenerate the sample")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            if columns is not None:
                have = set(pq.read_schema(path).names)
                columns = [c for c in columns if c in have]
            return _drop_row_index_columns(pq.read_table(path, columns=columns))
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            delim = "\t" if ".tsv" in name else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delim))
            table = _drop_row_index_columns(table)
            if columns is not None:
                table = table.select([c for c in columns if c in table.column_names])
            return table
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read table ({e})", path=path, sample=sample,
                         fix="the file is corrupt or truncated: download it again") from e
    raise InputError("unsupported table format", path=path, sample=sample,
                     fix="expected .parquet, .csv or .csv.gz")


def normalise_transcripts(table: pa.Table | pd.DataFrame, *, min_qv: float | None = MIN_QV,
                          genes_only: bool = True, drop_unassigned: bool = False,
                          columns: Sequence[str] | None = None, path: str | os.PathLike | None = None,
                          sample: str | None = None, allow_missing_cell_id: bool = False) -> pd.DataFrame:
    """Filter and normalise a Xenium transcript table.

    Parameters
    ----------
    table
        Transcripts as an arrow table or DataFrame (``cell_id``, ``feature_name``, ``qv``, ...).
    min_qv
        Keep molecules with ``qv >= min_qv`` (10x and HEST use 20). ``None`` or 0 keeps all.
    genes_only
        Drop control probes and codewords: by ``is_gene`` when present, else by
        ``codeword_category`` when present, and always by the control-name prefixes of
        :data:`stlib.constants.CONTROL_PREFIXES`.
    drop_unassigned
        Drop molecules outside any cell (else they are kept with ``cell_id == "UNASSIGNED"``
        and ``assigned == False``).
    columns
        Output columns (``None`` = all). ``assigned`` is added when ``columns`` is ``None``
        or names it.
    path, sample
        Named in errors.
    allow_missing_cell_id
        Accept a table without ``cell_id`` (every molecule unassigned) instead of raising.

    Returns
    -------
    DataFrame with ``cell_id`` and ``feature_name`` as ``str`` and a boolean ``assigned``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(table, pd.DataFrame):
        df = table.copy()
        for c in df.columns:  # arrow cannot infer mixed object columns of bytes: decode them
            if df[c].dtype == object and len(df) and isinstance(df[c].dropna().iloc[0] if df[c].notna().any() else None, bytes):
                df[c] = df[c].str.decode("utf-8")
        table = pa.Table.from_pandas(df, preserve_index=False)
    table = _drop_row_index_columns(table)
    names = table.column_names
    if "feature_name" not in names:
        raise InputError("transcripts have no feature_name column", path=path, sample=sample,
                         fix="this is not a Xenium transcripts file; check the path")
    if "cell_id" not in names:
        if not allow_missing_cell_id:
            raise InputError(
                "transcripts have no cell_id column, so molecules cannot be grouped into cells",
                path=path, sample=sample,
                fix="re-download the sample's transcripts parquet, or pass allow_missing_cell_id=True "
                    "to read the molecules as unassigned (no per-cell counts)")
        table = table.append_column("cell_id", pa.array([UNASSIGNED] * table.num_rows, pa.string()))
    # feature names: decode bytes / dictionaries to str
    feat = table.column("feature_name")
    if pa.types.is_dictionary(feat.type):
        feat = feat.cast(feat.type.value_type)
    if not (pa.types.is_string(feat.type) or pa.types.is_large_string(feat.type)):
        feat = pc.cast(feat, pa.string())
    table = table.set_column(names.index("feature_name"), "feature_name", feat)

    mask = None
    if min_qv:
        if "qv" not in names:
            raise InputError("transcripts have no qv column", path=path, sample=sample,
                             fix="pass min_qv=None to read them without a quality filter")
        mask = pc.fill_null(pc.greater_equal(table.column("qv"), float(min_qv)), False)
    if genes_only:
        gene = pc.invert(_starts_with_any(table.column("feature_name"), CONTROL_PREFIXES))
        if "is_gene" in names:
            gene = pc.and_(gene, pc.fill_null(pc.cast(table.column("is_gene"), pa.bool_()), False))
        elif "codeword_category" in names:
            cat = table.column("codeword_category")
            if pa.types.is_dictionary(cat.type):
                cat = cat.cast(cat.type.value_type)
            gene = pc.and_(gene, pc.is_in(pc.cast(cat, pa.string()), pa.array(_GENE_CATEGORIES)))
        mask = gene if mask is None else pc.and_(mask, gene)
    if mask is not None:
        table = table.filter(mask)
    ids, unassigned = _cell_id_to_arrow_str(table.column("cell_id"), path=path, sample=sample)
    table = table.set_column(table.column_names.index("cell_id"), "cell_id", ids)
    if drop_unassigned:
        table = table.filter(pc.invert(unassigned))
        unassigned = pa.chunked_array([pa.array(np.zeros(table.num_rows, bool))])
    if columns is None or "assigned" in columns:
        table = table.append_column("assigned", pc.invert(unassigned))
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(f"transcripts have no column(s) {missing}", path=path, sample=sample,
                             fix=f"available: {table.column_names}")
        table = table.select(list(columns))
    return table.to_pandas()


def _starts_with_any(arr: pa.ChunkedArray, prefixes: Sequence[str]) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    out = None
    for p in prefixes:
        m = pc.fill_null(pc.starts_with(arr, p), False)
        out = m if out is None else pc.or_(out, m)
    return out


def read_transcripts_file(path: str | os.PathLike, *, min_qv: float | None = MIN_QV, genes_only: bool = True,
                          drop_unassigned: bool = False, columns: Sequence[str] | None = None,
                          sample: str | None = None, allow_missing_cell_id: bool = False) -> pd.DataFrame:
    """Read a Xenium/HEST transcripts parquet or CSV (``.csv``, ``.csv.gz``) file.

    Only the columns needed are read from parquet. See :func:`normalise_transcripts` for the
    options; an R row-index column (unnamed first column) is dropped.
    """
    path = Path(path)
    read_cols = None
    if columns is not None:
        read_cols = list(dict.fromkeys([*columns, "cell_id", "feature_name", "qv", "is_gene", "codeword_category"]))
    table = _read_table(path, columns=read_cols, sample=sample)
    return normalise_transcripts(table, min_qv=min_qv, genes_only=genes_only, drop_unassigned=drop_unassigned,
                                 columns=columns, path=path, sample=sample,
                                 allow_missing_cell_id=allow_missing_cell_id)


def counts_from_transcripts(transcripts: pd.DataFrame, *, cell_ids: Sequence[str] | None = None,
                            genes: Sequence[str] | None = None, sample: str | None = None) -> anndata.AnnData:
    """Count molecules per cell and gene.

    Parameters
    ----------
    transcripts
        Output of a transcripts reader (``cell_id`` str, ``feature_name``; filtered already).
        Unassigned molecules are ignored.
    cell_ids
        Rows of the result, in this order (cells without molecules get zero rows; molecules of
        other cells are ignored). Default: the sorted assigned cell ids present.
    genes
        Columns of the result, in this order. Default: the sorted genes present.
    sample
        Written to ``obs["sample"]`` when given.

    Returns
    -------
    AnnData with ``X`` CSR ``int32`` (cells x genes), ``obs`` (index = cell id) with
    ``cell_id``, ``n_counts``, ``n_genes`` [, ``sample``] and ``var`` indexed by gene name.
    """
    import anndata as ad
    import scipy.sparse as sp

    for col in ("cell_id", "feature_name"):
        if col not in transcripts.columns:
            raise InputError(f"transcripts lack column {col!r}", sample=sample,
                             fix="read them with stlib.io readers, which provide cell_id and feature_name")
    cid = transcripts["cell_id"].to_numpy()
    keep = cid != UNASSIGNED
    if "assigned" in transcripts.columns:
        keep &= transcripts["assigned"].to_numpy(bool)
    # hash-factorise the (possibly tens of millions of) molecules once, then map the few uniques
    cid_codes, cid_uniq = pd.factorize(cid[keep])
    feat_codes, feat_uniq = pd.factorize(transcripts["feature_name"].to_numpy()[keep])
    cid_uniq = pd.Index(cid_uniq).astype(str)
    feat_uniq = pd.Index(feat_uniq).astype(str)
    rows_idx = cid_uniq.sort_values() if cell_ids is None else pd.Index(cell_ids).astype(str)
    cols_idx = feat_uniq.sort_values() if genes is None else pd.Index(genes).astype(str)
    if not rows_idx.is_unique or not cols_idx.is_unique:
        raise InputError("cell_ids / genes contain duplicates", sample=sample, fix="pass unique ids")
    r = rows_idx.get_indexer(cid_uniq)[cid_codes]
    c = cols_idx.get_indexer(feat_uniq)[feat_codes]
    ok = (r >= 0) & (c >= 0)
    X = sp.coo_matrix((np.ones(int(ok.sum()), np.int32), (r[ok], c[ok])),
                      shape=(len(rows_idx), len(cols_idx))).tocsr()
    X.sum_duplicates()
    X = X.astype(np.int32)
    obs = pd.DataFrame({"cell_id": rows_idx.to_numpy(dtype=object)}, index=rows_idx.rename(None))
    if sample is not None:
        obs["sample"] = sample
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    obs["n_genes"] = np.diff(X.indptr).astype(np.int64)
    var = pd.DataFrame(index=cols_idx.rename(None))
    var["n_counts"] = np.asarray(X.sum(axis=0)).ravel().astype(np.int64)
    return ad.AnnData(X=X, obs=obs, var=var)


# --------------------------------------------------------------------------------------------
# boundaries
# --------------------------------------------------------------------------------------------
def make_valid_polygons(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid polygons, keeping only their polygonal part (a (Multi)Polygon or None)."""
    from concurrent.futures import ThreadPoolExecutor

    import shapely

    from stlib.utils import usable_cpus

    geoms = np.asarray(geoms, dtype=object)
    # shapely's predicates release the GIL: the validity of a slide's polygons is checked in
    # blocks over the usable CPUs (the same booleans)
    blocks = np.array_split(geoms, max(1, min(usable_cpus(), len(geoms) // 50_000)))
    if len(blocks) > 1:
        with ThreadPoolExecutor(max_workers=len(blocks)) as pool:
            valid = np.concatenate(list(pool.map(shapely.is_valid, blocks)))
    else:
        valid = shapely.is_valid(geoms)
    bad = ~valid & ~shapely.is_missing(geoms)
    if not bad.any():
        return geoms
    out = geoms.copy()
    fixed = shapely.make_valid(geoms[bad])
    for i, g in zip(np.flatnonzero(bad), fixed, strict=True):
        if g.geom_type in ("Polygon", "MultiPolygon"):
            out[i] = g
            continue
        parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
        out[i] = shapely.union_all(parts) if parts else None
    return out


def _polygons_from_vertices(df: pd.DataFrame, keys: list[str], path: Path | None,
                            sample: str | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Vectorised: one polygon per group of consecutive-in-group vertices (file order kept)."""
    import shapely

    codes = df.groupby(keys, sort=True, observed=True).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    xy = df[["vertex_x", "vertex_y"]].to_numpy(np.float64)[order]
    if not np.isfinite(xy).all():
        raise InputError("boundary vertices contain NaN/inf", path=path, sample=sample,
                         fix="the boundaries file is corrupt: download it again")
    n_groups = int(codes.max()) + 1 if codes.size else 0
    counts = np.bincount(codes, minlength=n_groups)
    first = np.r_[0, np.cumsum(counts)[:-1]] if n_groups else np.zeros(0, int)
    # drop the closing vertex when a ring repeats its first point (shapely closes rings itself)
    last = first + counts - 1
    closed = np.all(xy[first] == xy[last], axis=1) & (counts > 1) if n_groups else np.zeros(0, bool)
    drop = np.zeros(len(xy), bool)
    drop[last[closed]] = True
    n_distinct = counts - closed.astype(int)
    ok_group = n_distinct >= 3
    keep_vertex = ~drop & ok_group[codes]
    if (~ok_group).any():
        log.warning("%s: %d boundary polygon(s) with < 3 vertices dropped", path, int((~ok_group).sum()))
    new_codes = np.cumsum(ok_group) - 1  # re-index kept groups contiguously
    rings = shapely.linearrings(xy[keep_vertex], indices=new_codes[codes[keep_vertex]])
    polys = make_valid_polygons(shapely.polygons(rings))
    key_df = df.iloc[order[first[ok_group]]][keys].reset_index(drop=True)
    return key_df, polys


def read_boundaries(path: str | os.PathLike, *, multi: Literal["union", "keep", "largest"] = "union",
                    sample: str | None = None) -> gpd.GeoDataFrame:
    """Read Xenium nucleus/cell boundaries (one row per vertex) as polygons in µm.

    Parameters
    ----------
    path
        ``nucleus_boundaries.parquet`` / ``.csv`` / ``.csv.gz`` (or ``cell_boundaries.*``) with
        ``cell_id``, ``vertex_x``, ``vertex_y`` (µm) and, from XOA 2.0, ``label_id``. An R
        row-index column is ignored.
    multi
        What to do when a cell has several polygons (several ``label_id``, e.g. a cell with two
        nuclei in XOA >= 2): ``"union"`` (default) one row per cell, a MultiPolygon when the
        parts are disjoint; ``"keep"`` one row per (cell, label) with a ``label_id`` column (the
        index then repeats); ``"largest"`` one row per cell with its largest polygon.
    sample
        Named in errors.

    Returns
    -------
    GeoDataFrame indexed by ``cell_id`` (str), geometry in Xenium µm (no CRS), valid polygons,
    with ``n_parts`` (polygons per cell). ``attrs["units"] == "um"``.
    """
    import geopandas as gpd
    import shapely

    path = Path(path)
    table = _read_table(path, sample=sample)
    need = {"cell_id", "vertex_x", "vertex_y"}
    if not need <= set(table.column_names):
        raise InputError(f"boundaries file lacks columns {sorted(need - set(table.column_names))}",
                         path=path, sample=sample,
                         fix="expected Xenium nucleus/cell boundaries (one row per vertex)")
    ids, unassigned = _cell_id_to_arrow_str(table.column("cell_id"), path=path, sample=sample)
    df = pd.DataFrame({"cell_id": ids.to_numpy(zero_copy_only=False),
                       "vertex_x": table.column("vertex_x").to_numpy(),
                       "vertex_y": table.column("vertex_y").to_numpy()})
    df = df[~unassigned.to_numpy(zero_copy_only=False)]
    has_label = "label_id" in table.column_names
    keys = ["cell_id"]
    if has_label:
        df["label_id"] = table.column("label_id").to_numpy(zero_copy_only=False)[df.index.to_numpy()]
        keys.append("label_id")
    key_df, polys = _polygons_from_vertices(df.reset_index(drop=True), keys, path, sample)
    gdf = gpd.GeoDataFrame(key_df, geometry=polys)
    gdf = gdf[~gdf.geometry.isna()]
    if has_label and multi != "keep":
        if multi == "union":
            n_parts = gdf.groupby("cell_id", sort=True).size()
            first = gdf.drop_duplicates("cell_id").set_index("cell_id").loc[n_parts.index]
            geoms = first.geometry.to_numpy().copy()
            multi_ids = n_parts.index[n_parts.to_numpy() > 1]
            if len(multi_ids):  # only the few cells with several polygons need a union
                sub = gdf[gdf["cell_id"].isin(multi_ids)]
                pos = n_parts.index.get_indexer(multi_ids)
                for p, (_, grp) in zip(pos, sub.groupby("cell_id", sort=True), strict=True):
                    geoms[p] = shapely.union_all(grp.geometry.to_numpy())
            gdf = gpd.GeoDataFrame({"n_parts": n_parts.to_numpy()}, geometry=geoms, index=n_parts.index)
        elif multi == "largest":
            gdf = gdf.assign(_a=gdf.geometry.area)
            n_parts = gdf.groupby("cell_id").size()
            gdf = gdf.sort_values(["cell_id", "_a"], ascending=[True, False]).drop_duplicates("cell_id")
            gdf = gdf.set_index("cell_id").drop(columns=["_a", "label_id"])
            gdf["n_parts"] = n_parts.reindex(gdf.index).to_numpy()
        else:
            raise ValueError(f"multi must be 'union', 'keep' or 'largest', got {multi!r}")
    else:
        gdf = gdf.set_index("cell_id")
        if not has_label:
            gdf["n_parts"] = 1
        else:
            gdf["n_parts"] = gdf.groupby(level=0).size().reindex(gdf.index).to_numpy()
    gdf.index = gdf.index.astype(str)
    gdf.index.name = "cell_id"
    gdf = gpd.GeoDataFrame(gdf, geometry="geometry")
    gdf.attrs["units"] = "um"
    gdf.attrs["source"] = str(path)
    return gdf


# --------------------------------------------------------------------------------------------
# count matrix
# --------------------------------------------------------------------------------------------
def _decode(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in ("S", "O") and a.size and isinstance(a.flat[0], bytes):
        return np.char.decode(a.astype(bytes), "utf-8").astype(object)
    return a.astype(str).astype(object)


def read_cell_feature_matrix(path: str | os.PathLike, *, genes_only: bool = True,
                             sample: str | None = None) -> anndata.AnnData:
    """Read a 10x ``cell_feature_matrix.h5`` into AnnData (cells x features).

    The HDF5 group ``matrix`` holds ``barcodes``, the CSC-by-cell arrays ``data``, ``indices``,
    ``indptr``, ``shape = (n_features, n_cells)`` and ``features/{id,name,feature_type}``.

    Parameters
    ----------
    path
        The ``.h5`` file.
    genes_only
        Keep features with ``feature_type == "Gene Expression"`` whose name is not a control
        probe (:func:`stlib.constants.is_control_feature`).
    sample
        Named in errors and written to ``obs["sample"]`` when given.

    Returns
    -------
    AnnData, ``X`` CSR int32, ``obs`` index = cell id (str) with ``cell_id``, ``n_counts``,
    ``n_genes``; ``var`` index = feature name with ``gene_ids``, ``feature_type``.
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, sample=sample,
                         fix="check the path, or download the Xenium bundle again")
    try:
        with h5py.File(path, "r") as h:
            if "matrix" not in h:
                raise InputError("no 'matrix' group: not a 10x feature-barcode HDF5", path=path, sample=sample,
                                 fix="pass the bundle's cell_feature_matrix.h5")
            m = h["matrix"]
            n_feat, n_cells = (int(v) for v in m["shape"][()])
            data, indices, indptr = m["data"][()], m["indices"][()], m["indptr"][()]
            barcodes = _decode(m["barcodes"][()])
            f = m["features"]
            names = _decode(f["name"][()])
            ids = _decode(f["id"][()]) if "id" in f else names.copy()
            ftype = _decode(f["feature_type"][()]) if "feature_type" in f else np.full(n_feat, "Gene Expression", object)
    except OSError as e:
        raise InputError(f"cannot read HDF5 ({e})", path=path, sample=sample,
                         fix="the file is corrupt or truncated: download it again") from e
    except KeyError as e:
        raise InputError(f"10x HDF5 is missing {e}", path=path, sample=sample,
                         fix="pass a 10x cell_feature_matrix.h5 (matrix/data, indices, indptr, shape, features)") from e
    if (len(indptr) != n_cells + 1 or len(barcodes) != n_cells or len(names) != n_feat
            or len(data) != len(indices) or (len(indptr) and indptr[-1] != len(data))):
        raise InputError(f"inconsistent 10x matrix: shape {(n_feat, n_cells)}, {len(barcodes)} barcodes, "
                         f"{len(names)} features, indptr {len(indptr)}, nnz {len(data)}", path=path, sample=sample,
                         fix="the file is corrupt or truncated: download it again")
    X = sp.csr_matrix((data.astype(np.int32), indices, indptr), shape=(n_cells, n_feat))
    cell_ids = normalise_cell_ids(barcodes)
    var = pd.DataFrame({"gene_ids": ids, "feature_type": ftype}, index=pd.Index(names.astype(str)))
    keep = np.ones(n_feat, bool)
    if genes_only:
        keep = (ftype == "Gene Expression") & ~np.array([is_control_feature(n) for n in names], bool)
    X = X[:, np.flatnonzero(keep)]
    X.sort_indices()
    obs = pd.DataFrame({"cell_id": cell_ids}, index=pd.Index(cell_ids.astype(str)))
    if sample is not None:
        obs["sample"] = sample
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    obs["n_genes"] = np.diff(X.indptr).astype(np.int64)
    adata = ad.AnnData(X=X, obs=obs, var=var[keep].copy())
    adata.var_names_make_unique()
    adata.uns["source"] = str(path)
    return adata


# --------------------------------------------------------------------------------------------
# H&E alignment
# --------------------------------------------------------------------------------------------
def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine ``A`` (3x3) with ``dst ≈ A @ [src, 1]`` (``src``, ``dst``: (n, 2))."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"src and dst must both be (n, 2), got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise ValueError(f"an affine fit needs >= 3 point pairs, got {len(src)}")
    M = np.c_[src, np.ones(len(src))]
    coef, _, rank, _ = np.linalg.lstsq(M, dst, rcond=None)
    if rank < 3:
        raise ValueError("the points are collinear: the affine is undetermined")
    A = np.eye(3)
    A[:2, :] = coef.T
    return A


def read_he_alignment(path: str | os.PathLike, *, pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
                      keypoint_units: Literal["um", "px"] = "um", sample: str | None = None) -> np.ndarray:
    """Read an H&E ↔ Xenium alignment as a 3x3 affine (H&E level-0 px -> morphology px).

    Two forms are accepted:

    - the 3x3 matrix CSV exported by Xenium Explorer (``*_he_imagealignment.csv``, three rows
      of three numbers, no header), returned as is;
    - a keypoints CSV (``fixedX, fixedY, alignmentX, alignmentY``: ``fixed`` = Xenium
      coordinates, in µm by default (``keypoint_units``), ``alignment`` = H&E pixels); the
      affine is fitted by least squares and returned in the same orientation.

    To put Xenium coordinates on the H&E image:
    ``H&E px = inv(A) @ [x_um / pixel_size_um, y_um / pixel_size_um, 1]`` (see
    :func:`um_to_he_px_matrix`).

    Parameters
    ----------
    path
        The CSV file.
    pixel_size_um
        Morphology pixel size (``experiment.xenium`` ``pixel_size``), used for keypoints in µm.
    keypoint_units
        Units of ``fixedX``/``fixedY`` in a keypoints file.
    sample
        Named in errors.

    Returns
    -------
    ``(3, 3)`` float64 array.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("alignment file not found", path=path, sample=sample,
                         fix="export the alignment from Xenium Explorer, or pass the bundle's *_he_imagealignment.csv")
    text = path.read_text(encoding="utf-8-sig")
    first = text.strip().splitlines()[0] if text.strip() else ""
    if any(ch.isalpha() for ch in first.replace("e-", "").replace("e+", "").replace("E", "")):
        df = pd.read_csv(path, encoding="utf-8-sig")
        df.columns = [str(c).strip().strip('"') for c in df.columns]
        low = {c.lower(): c for c in df.columns}
        need = ["fixedx", "fixedy", "alignmentx", "alignmenty"]
        if not all(k in low for k in need):
            raise InputError(f"alignment CSV has a header {list(df.columns)} but not the keypoint columns",
                             path=path, sample=sample,
                             fix="expected fixedX, fixedY, alignmentX, alignmentY, or a headerless 3x3 matrix")
        fixed = df[[low["fixedx"], low["fixedy"]]].to_numpy(np.float64)
        he = df[[low["alignmentx"], low["alignmenty"]]].to_numpy(np.float64)
        if keypoint_units == "um":
            fixed = fixed / float(pixel_size_um)
        elif keypoint_units != "px":
            raise ValueError(f"keypoint_units must be 'um' or 'px', got {keypoint_units!r}")
        try:
            return fit_affine(he, fixed)
        except ValueError as e:
            raise InputError(f"cannot fit an affine to the keypoints ({e})", path=path, sample=sample,
                             fix="place at least 3 non-collinear keypoints in Xenium Explorer") from e
    try:
        A = np.loadtxt(path, delimiter=",", dtype=np.float64, encoding="utf-8-sig", ndmin=2)
    except ValueError as e:
        raise InputError(f"not a numeric 3x3 matrix ({e})", path=path, sample=sample,
                         fix="pass the 3x3 alignment CSV exported by Xenium Explorer") from e
    if A.shape != (3, 3):
        raise InputError(f"alignment matrix has shape {A.shape}, expected (3, 3)", path=path, sample=sample,
                         fix="pass the 3x3 alignment CSV exported by Xenium Explorer")
    if not np.allclose(A[2], [0, 0, 1]) or abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise InputError("alignment matrix is not an invertible affine (last row must be 0,0,1)",
                         path=path, sample=sample, fix="re-export the alignment from Xenium Explorer")
    return A


def um_to_he_px_matrix(alignment: np.ndarray, pixel_size_um: float = XENIUM_PIXEL_SIZE_UM) -> np.ndarray:
    """The 3x3 map from Xenium µm to H&E level-0 px, acting on ``[x_um, y_um, 1]``.

    ``M = inv(A) @ diag(1/pixel_size_um, 1/pixel_size_um, 1)`` with ``A`` the alignment
    (H&E px -> morphology px) of :func:`read_he_alignment`.
    """
    A = np.asarray(alignment, np.float64)
    if A.shape != (3, 3):
        raise ValueError(f"alignment must be 3x3, got {A.shape}")
    if not pixel_size_um > 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    S = np.diag([1.0 / pixel_size_um, 1.0 / pixel_size_um, 1.0])
    return np.linalg.inv(A) @ S


# --------------------------------------------------------------------------------------------
# the bundle
# --------------------------------------------------------------------------------------------
class XeniumBundle:
    """A raw Xenium output folder.

    Parameters
    ----------
    path
        The folder (holding ``experiment.xenium`` and the other outputs).
    sample
        Name used in errors and ``obs["sample"]``; default the folder name.

    Examples
    --------
    >>> b = XeniumBundle("data/demo/xenium/DEMO01")          # doctest: +SKIP
    >>> adata = b.counts_from_transcripts(min_qv=20)           # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, *, sample: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError("Xenium bundle folder not found", path=self.path, sample=sample,
                             fix="pass the Xenium output folder (the one holding experiment.xenium)")
        self.sample = sample or self.path.name
        self._experiment: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"XeniumBundle({str(self.path)!r})"

    def _find(self, stems: Sequence[str], what: str, *, required: bool = True) -> Path | None:
        for stem in stems:
            for ext in (".parquet", ".csv.gz", ".csv"):
                p = self.path / f"{stem}{ext}"
                if p.is_file():
                    return p
        if required:
            raise InputError(f"no {what} file ({', '.join(s + '.parquet|.csv[.gz]' for s in stems)})",
                             path=self.path, sample=self.sample,
                             fix="check that the bundle is complete, or download it again")
        return None

    @property
    def experiment(self) -> dict[str, Any]:
        """``experiment.xenium`` as a dict (``{}`` when the file is absent)."""
        if self._experiment is None:
            p = self.path / "experiment.xenium"
            if not p.is_file():
                self._experiment = {}
            else:
                try:
                    self._experiment = json.loads(p.read_text(encoding="utf-8-sig"))
                except json.JSONDecodeError as e:
                    raise InputError(f"experiment.xenium is not valid JSON ({e})", path=p, sample=self.sample,
                                     fix="download the bundle again") from e
        return self._experiment

    @property
    def pixel_size_um(self) -> float:
        """Morphology pixel size in µm (``experiment.xenium`` ``pixel_size``, default 0.2125)."""
        v = self.experiment.get("pixel_size", XENIUM_PIXEL_SIZE_UM)
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not v > 0:
            raise InputError(f"pixel_size {self.experiment.get('pixel_size')!r} is not a positive number",
                             path=self.path / "experiment.xenium", sample=self.sample,
                             fix="fix or remove pixel_size (the Xenium default is 0.2125 µm)")
        return v

    def cells(self) -> pd.DataFrame:
        """``cells.parquet`` / ``cells.csv.gz`` with ``cell_id`` as ``str`` (a column; µm centroids)."""
        p = self._find(["cells"], "cells")
        table = _read_table(p, sample=self.sample)
        if "cell_id" not in table.column_names:
            raise InputError("cells table has no cell_id column", path=p, sample=self.sample,
                             fix="download the bundle again")
        ids, _ = _cell_id_to_arrow_str(table.column("cell_id"), path=p, sample=self.sample)
        table = table.set_column(table.column_names.index("cell_id"), "cell_id", ids)
        return table.to_pandas()

    def transcripts(self, *, min_qv: float | None = MIN_QV, genes_only: bool = True,
                    drop_unassigned: bool = False, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Molecules (``transcripts.parquet`` or v1 ``transcripts.csv[.gz]``), filtered.

        See :func:`normalise_transcripts` for the options and output columns.
        """
        p = self._find(["transcripts"], "transcripts")
        return read_transcripts_file(p, min_qv=min_qv, genes_only=genes_only, drop_unassigned=drop_unassigned,
                                     columns=columns, sample=self.sample)

    def nucleus_boundaries(self, *, multi: Literal["union", "keep", "largest"] = "union") -> gpd.GeoDataFrame:
        """Nucleus polygons in µm, indexed by ``cell_id``; see :func:`read_boundaries`."""
        return read_boundaries(self._find(["nucleus_boundaries"], "nucleus boundaries"), multi=multi,
                               sample=self.sample)

    def cell_boundaries(self) -> gpd.GeoDataFrame:
        """Cell polygons in µm, indexed by ``cell_id``; see :func:`read_boundaries`."""
        return read_boundaries(self._find(["cell_boundaries"], "cell boundaries"), sample=self.sample)

    def cell_feature_matrix(self, *, genes_only: bool = True) -> anndata.AnnData:
        """``cell_feature_matrix.h5`` as AnnData; see :func:`read_cell_feature_matrix`."""
        return read_cell_feature_matrix(self.path / "cell_feature_matrix.h5", genes_only=genes_only,
                                        sample=self.sample)

    def counts_from_transcripts(self, *, min_qv: float | None = MIN_QV, genes_only: bool = True,
                                nucleus_only: bool = False, cell_ids: Sequence[str] | None = None) -> anndata.AnnData:
        """Cell x gene counts by grouping molecules on ``cell_id``.

        Parameters
        ----------
        min_qv, genes_only
            Molecule filters (see :func:`normalise_transcripts`).
        nucleus_only
            Count only molecules with ``overlaps_nucleus == 1``.
        cell_ids
            Rows of the result (default: cells with at least one molecule).

        Returns
        -------
        AnnData as :func:`counts_from_transcripts`, ``obs["sample"]`` set.
        """
        cols = ["cell_id", "feature_name"] + (["overlaps_nucleus"] if nucleus_only else [])
        tx = self.transcripts(min_qv=min_qv, genes_only=genes_only, drop_unassigned=True, columns=cols)
        if nucleus_only:
            tx = tx[tx["overlaps_nucleus"].to_numpy().astype(bool)]
        return counts_from_transcripts(tx, cell_ids=cell_ids, sample=self.sample)

    def alignment_path(self) -> Path | None:
        """The H&E alignment CSV of the bundle (``*_he_imagealignment.csv``), if any."""
        hits = sorted(self.path.glob("*he_imagealignment.csv")) or sorted(self.path.glob("*alignment*.csv"))
        return hits[0] if hits else None

    def he_alignment(self) -> np.ndarray:
        """The bundle's H&E alignment (H&E px -> morphology px); see :func:`read_he_alignment`."""
        p = self.alignment_path()
        if p is None:
            raise InputError("no *_he_imagealignment.csv in the bundle", path=self.path, sample=self.sample,
                             fix="export the H&E alignment from Xenium Explorer into the bundle folder")
        return read_he_alignment(p, pixel_size_um=self.pixel_size_um, sample=self.sample)
