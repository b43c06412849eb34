"""The training tile store: one folder of ``.npy`` arrays read by memory mapping.

Layout (DEVELOPING.md, "Tile store")::

    images.npy  (N, T, T, 3) uint8      inst.npy   (N, T, T) int32 (0 = background)
    type.npy    (N, T, T) uint8         ignore.npy (N, T, T) uint8 (1 = no loss)
    conf.npy    (N, T, T) uint8         meta.parquet, store.json

The writer appends tiles to raw ``.npy`` files whose 256-byte header is rewritten with the
final tile count on :meth:`TileStoreWriter.close` (so the number of tiles need not be known
in advance and nothing is copied), inside a hidden ``.{name}.partial`` folder that is renamed
onto ``path`` only when complete. An interrupted build can be resumed (``resume=True``): the
tiles recorded in ``meta.jsonl`` are kept, anything after them is cut off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlib.config import TilesConfig
from stlib.constants import CLASS_NAMES
from stlib.utils import InputError, read_json, write_json

__all__ = [
    "ARRAYS",
    "META_COLUMNS",
    "TileStoreWriter",
    "TileStore",
    "split_by_sample",
    "read_throughput",
    "cli_main",
]

#: batch key -> (file name, per-tile trailing shape after (T, T), dtype)
ARRAYS: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {
    "image": ("images.npy", (3,), np.dtype(np.uint8)),
    "inst": ("inst.npy", (), np.dtype(np.int32)),
    "type": ("type.npy", (), np.dtype(np.uint8)),
    "ignore": ("ignore.npy", (), np.dtype(np.uint8)),
    "conf": ("conf.npy", (), np.dtype(np.uint8)),
}
META_COLUMNS: tuple[str, ...] = ("tile_id", "sample", "organ", "split", "x0", "y0", "um_per_px",
                                 "n_nuclei", "align_score", "source")
_HEADER_BYTES = 256
_FORMAT = "stlib-tile-store/1"


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy version-1.0 header padded to exactly 256 bytes (room for any tile count)."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), shape)
    body_len = _HEADER_BYTES - 10
    if len(d) + 1 > body_len:  # pragma: no cover - only for absurd shapes
        raise ValueError(f"npy header too long for shape {shape}")
    body = d + " " * (body_len - len(d) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


#: keys of store.json written by the format itself (``TileStoreWriter.close(extra=...)`` cannot set them)
_STORE_KEYS = frozenset({"format", "tile_px", "um_per_px", "class_names", "n_tiles", "source", "stlib_version", "arrays"})


class TileStoreWriter:
    """Append tiles to a new tile store; the store appears at ``path`` only when closed.

    Parameters
    ----------
    path
        Final store folder.
    tile_px
        Tile side T.
    um_per_px
        Resolution of the tiles (µm/px).
    n_tiles
        Optional upper bound on the number of tiles (an error when exceeded); the store grows
        as needed either way.
    source
        Where the tiles come from (``"demo"``, ``"hest"``, ``"pannuke"``, ...), the default of the
        ``source`` meta column and recorded in ``store.json``.
    resume
        Continue an interrupted build of the same store (same ``tile_px`` / ``um_per_px``);
        otherwise a leftover partial build is discarded.
    overwrite
        Replace an existing store at ``path`` (only when the new one is complete).

    Examples
    --------
    >>> with TileStoreWriter("runs/x/tiles/train", tile_px=256, um_per_px=0.25) as w:  # doctest: +SKIP
    ...     w.add(image=img, inst=inst, type=typ, sample="TENX95", organ="breast", x0=0, y0=0)
    """

    def __init__(self, path: str | os.PathLike, *, tile_px: int, um_per_px: float, n_tiles: int | None = None,
                 source: str = "", resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        if tile_px <= 0:
            raise ValueError(f"tile_px: must be positive, got {tile_px}")
        if not (um_per_px > 0 and math.isfinite(um_per_px)):
            raise ValueError(f"um_per_px: must be positive, got {um_per_px}")
        if self.path.exists() and not overwrite:
            raise InputError("a tile store already exists here", path=self.path,
                             fix="pass overwrite=True (--force) to rebuild it, or choose another folder")
        self.tile_px = int(tile_px)
        self.um_per_px = float(um_per_px)
        self.n_max = None if n_tiles is None else int(n_tiles)
        self.source = str(source)
        self.partial = self.path.parent / f".{self.path.name}.partial"
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"tile_px": self.tile_px, "um_per_px": self.um_per_px, "source": self.source}
        self.n = 0
        if resume and (self.partial / "partial.json").is_file():
            old = read_json(self.partial / "partial.json")
            if old != info:
                raise InputError(f"cannot resume: the partial build has {old}, this one {info}",
                                 path=self.partial, fix="resume with the same settings or pass resume=False")
            lines = (self.partial / "meta.jsonl").read_text().splitlines() if (self.partial / "meta.jsonl").exists() else []
            rows = []
            for line in lines:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line: drop it and what follows
            self.n = len(rows)
            for key in ARRAYS:
                f = self.partial / ARRAYS[key][0]
                need = _HEADER_BYTES + self.n * self._row_bytes(key)
                if not f.is_file() or f.stat().st_size < need:
                    raise InputError(f"cannot resume: {f.name} is shorter than the {self.n} recorded tiles",
                                     path=f, fix="pass resume=False to rebuild")
                with open(f, "r+b") as fh:
                    fh.truncate(need)
            with open(self.partial / "meta.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            for key, (fname, trail, dtype) in ARRAYS.items():
                with open(self.partial / fname, "wb") as fh:
                    fh.write(_npy_header(dtype, (0, self.tile_px, self.tile_px, *trail)))
            (self.partial / "meta.jsonl").write_text("")
            write_json(self.partial / "partial.json", info)
        self._files = {k: open(self.partial / ARRAYS[k][0], "ab") for k in ARRAYS}
        self._meta = open(self.partial / "meta.jsonl", "a")

    def _row_bytes(self, key: str) -> int:
        _, trail, dtype = ARRAYS[key]
        return int(self.tile_px * self.tile_px * int(np.prod(trail, dtype=np.int64)) * dtype.itemsize)

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> TileStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the partial build for resume=True; just release the files
            self._release()

    def _check(self, name: str, arr: Any, trail: tuple[int, ...], dtype: np.dtype, *, int_range: bool) -> np.ndarray:
        a = np.asarray(arr)
        want = (self.tile_px, self.tile_px, *trail)
        if a.shape != want:
            raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
        if a.dtype != dtype:
            if int_range and a.size:
                info = np.iinfo(dtype)
                if not np.issubdtype(a.dtype, np.integer) or a.min() < info.min or a.max() > info.max:
                    raise ValueError(f"{name}: values of dtype {a.dtype} do not fit {dtype}")
            a = a.astype(dtype)
        return np.ascontiguousarray(a)

    def add(self, *, image: np.ndarray, inst: np.ndarray, sample: str, organ: str, x0: float, y0: float,
            type: np.ndarray | None = None, ignore: np.ndarray | None = None,  # noqa: A002
            conf: np.ndarray | None = None, split: str = "", n_nuclei: int | None = None,
            align_score: float = float("nan"), source: str | None = None, tile_id: str | None = None) -> int:
        """Append one tile; returns its index.

        Parameters
        ----------
        image
            (T, T, 3) uint8 RGB.
        inst
            (T, T) instance ids (0 = background), stored as int32.
        sample, organ
            Slide id and organ (splits are made by these).
        x0, y0
            Level-0 px of the tile's top-left corner in its slide.
        type, ignore, conf
            (T, T) uint8 maps; zeros when omitted.
        split
            ``"train"`` / ``"val"`` / ``"test"`` or ``""`` (assign later with :func:`split_by_sample`).
        n_nuclei
            Instances in the tile; counted from ``inst`` when omitted.
        align_score, source, tile_id
            Meta columns (``tile_id`` defaults to ``{sample}_{x0}_{y0}``).
        """
        if self._closed:
            raise RuntimeError("TileStoreWriter is closed")
        if self.n_max is not None and self.n >= self.n_max:
            raise ValueError(f"n_tiles={self.n_max} exceeded")
        zeros = np.zeros((self.tile_px, self.tile_px), np.uint8)
        arrays = {
            "image": self._check("image", image, (3,), ARRAYS["image"][2], int_range=False),
            "inst": self._check("inst", inst, (), ARRAYS["inst"][2], int_range=True),
            "type": self._check("type", zeros if type is None else type, (), ARRAYS["type"][2], int_range=True),
            "ignore": self._check("ignore", zeros if ignore is None else ignore, (), ARRAYS["ignore"][2], int_range=True),
            "conf": self._check("conf", zeros if conf is None else conf, (), ARRAYS["conf"][2], int_range=True),
        }
        if n_nuclei is None:
            ids = arrays["inst"][arrays["inst"] > 0]
            n_nuclei = int(np.unique(ids).size)
        row = {"tile_id": tile_id if tile_id is not None else f"{sample}_{int(round(x0))}_{int(round(y0))}",
               "sample": str(sample), "organ": str(organ), "split": str(split), "x0": float(x0), "y0": float(y0),
               "um_per_px": self.um_per_px, "n_nuclei": int(n_nuclei),
               "align_score": None if align_score is None or not math.isfinite(align_score) else float(align_score),
               "source": self.source if source is None else str(source)}
        for key, a in arrays.items():
            self._files[key].write(memoryview(a).cast("B"))  # _check made it C-contiguous: no copy
        # the meta line is written last: a tile counts only once all its arrays are on disk
        for fh in self._files.values():
            fh.flush()
        self._meta.write(json.dumps(row) + "\n")
        self._meta.flush()
        self.n += 1
        return self.n - 1

    def _release(self) -> None:
        for fh in getattr(self, "_files", {}).values():
            fh.close()
        if getattr(self, "_meta", None) is not None:
            self._meta.close()

    def close(self, extra: dict[str, Any] | None = None) -> Path:
        """Finish the store: final headers, ``meta.parquet``, ``store.json``, atomic rename.

        ``extra`` entries (JSON-serialisable: how the labels were made, a build key) are added
        to ``store.json``; they cannot replace its format keys.
        """
        if self._closed:
            return self.path
        clash = sorted(set(extra or {}) & _STORE_KEYS)
        if clash:
            raise ValueError(f"store.json keys {clash} are reserved")
        self._release()
        n = self.n
        for key, (fname, trail, dtype) in ARRAYS.items():
            with open(self.partial / fname, "r+b") as fh:
                fh.write(_npy_header(dtype, (n, self.tile_px, self.tile_px, *trail)))
        rows = [json.loads(line) for line in (self.partial / "meta.jsonl").read_text().splitlines()]
        meta = pd.DataFrame(rows, columns=list(META_COLUMNS))
        meta = meta.astype({"tile_id": str, "sample": str, "organ": str, "split": str, "x0": float, "y0": float,
                            "um_per_px": float, "n_nuclei": np.int64, "align_score": float, "source": str})
        meta.to_parquet(self.partial / "meta.parquet", index=False)
        from stlib import __version__

        info = {
            "format": _FORMAT, "tile_px": self.tile_px, "um_per_px": self.um_per_px,
            "class_names": {str(k): v for k, v in CLASS_NAMES.items()}, "n_tiles": n,
            "source": self.source, "stlib_version": __version__,
            "arrays": {k: {"file": f, "dtype": str(d)} for k, (f, _, d) in ARRAYS.items()},
        }
        assert set(info) == _STORE_KEYS, "keep _STORE_KEYS in step with store.json"
        write_json(self.partial / "store.json", {**info, **(extra or {})})
        (self.partial / "meta.jsonl").unlink()
        (self.partial / "partial.json").unlink()
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.path)
        self._closed = True
        return self.path


class TileStore:
    """Read a tile store by memory mapping (random access without loading it).

    Parameters
    ----------
    path
        The store folder written by :class:`TileStoreWriter`.

    Attributes
    ----------
    meta
        One row per tile (``META_COLUMNS``).
    info
        ``store.json``.
    arrays
        Key -> read-only memmap, keys ``image``, ``inst``, ``type``, ``ignore``, ``conf``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "store.json").is_file():
            partial = self.path.parent / f".{self.path.name}.partial"
            hint = " (an unfinished build exists: resume it)" if partial.exists() else ""
            raise InputError(f"not a tile store: store.json missing{hint}", path=self.path,
                             fix="build it with `stlib tiles` / TileStoreWriter")
        self.info = read_json(self.path / "store.json")
        self.tile_px = int(self.info["tile_px"])
        self.um_per_px = float(self.info["um_per_px"])
        self.arrays: dict[str, np.ndarray] = {}
        for key, (fname, trail, dtype) in ARRAYS.items():
            f = self.path / fname
            if not f.is_file():
                raise InputError(f"{fname} missing", path=self.path, fix="rebuild the tile store")
            try:
                arr = np.load(f, mmap_mode="r")
            except ValueError as e:
                raise InputError(f"unreadable array ({e})", path=f, fix="rebuild the tile store") from e
            want = (self.tile_px, self.tile_px, *trail)
            if arr.shape[1:] != want or arr.dtype != dtype:
                raise InputError(f"shape {arr.shape} {arr.dtype}, expected (N, {want}) {dtype}", path=f,
                                 fix="rebuild the tile store")
            self.arrays[key] = arr
        self.meta = pd.read_parquet(self.path / "meta.parquet")
        n = {k: a.shape[0] for k, a in self.arrays.items()}
        if len(set(n.values())) != 1 or len(self.meta) != next(iter(n.values())):
            raise InputError(f"inconsistent tile counts: {n}, meta {len(self.meta)}", path=self.path,
                             fix="rebuild the tile store")

    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n={len(self)}, tile_px={self.tile_px}, um_per_px={self.um_per_px})"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of tile ``i`` (copies), keys ``image``, ``inst``, ``type``, ``ignore``, ``conf``."""
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"tile {i} out of range for {n} tiles")
        return {k: np.array(a[int(i)]) for k, a in self.arrays.items()}

    def indices(self, *, split: str | Sequence[str] | None = None, organ: str | Sequence[str] | None = None,
                sample: str | Sequence[str] | None = None) -> np.ndarray:
        """Tile indices matching all given filters (each a value or a list of values)."""
        keep = np.ones(len(self), bool)
        for col, val in (("split", split), ("organ", organ), ("sample", sample)):
            if val is None:
                continue
            vals = [val] if isinstance(val, str) else list(val)
            keep &= self.meta[col].isin(vals).to_numpy()
        return np.flatnonzero(keep)

    def get_batch(self, idx: Iterable[int] | np.ndarray, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Stacked arrays of tiles ``idx`` (in that order), read with one sorted fancy index per array."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"tile indices out of range for {n} tiles")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        srt = idx[order]
        out = {}
        for k in keys or ARRAYS:
            a = self.arrays[k][srt]
            out[k] = a if np.array_equal(inv, np.arange(inv.size)) else a[inv]
        return out


def split_by_sample(meta: pd.DataFrame, *, val_fraction: float = TilesConfig.val_fraction, seed: int = TilesConfig.seed,
                    heldout_organs: Iterable[str] = ()) -> pd.Series:
    """Assign ``train`` / ``val`` / ``test`` by whole samples, so no tile or overlapping neighbour leaks.

    Tiles of ``heldout_organs`` are ``test``. For every other organ, its samples are shuffled
    (``seed``) and ``round(val_fraction * n)`` of them go to ``val`` (at least one when the
    organ has two or more samples and ``val_fraction > 0``, never all of them); the rest are
    ``train``. All tiles of one sample share a split, so overlapping tiles cannot straddle it.

    Parameters
    ----------
    meta
        Tile table with ``sample`` and ``organ`` columns.
    val_fraction
        Fraction of each training organ's samples held out for validation.
    seed
        Shuffle seed (same seed, same split).
    heldout_organs
        Organs never trained on (the unseen-organ test).

    Returns
    -------
    pandas.Series
        Split name per tile, aligned with ``meta.index``.
    """
    for col in ("sample", "organ"):
        if col not in meta.columns:
            raise ValueError(f"meta: missing column {col!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    organs_per_sample = meta.groupby("sample")["organ"].nunique()
    bad = organs_per_sample[organs_per_sample > 1]
    if len(bad):
        raise InputError(f"samples with tiles of several organs: {list(bad.index)[:5]}",
                         fix="fix the organ column of the tile meta table")
    heldout = set(heldout_organs)
    sample_organ = meta.groupby("sample")["organ"].first()
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for organ in sorted(sample_organ.unique()):
        samples = sorted(sample_organ.index[sample_organ == organ])
        if organ in heldout:
            split_of.update({s: "test" for s in samples})
            continue
        perm = rng.permutation(len(samples))
        n_val = int(round(val_fraction * len(samples)))
        if val_fraction > 0 and len(samples) >= 2:
            n_val = min(max(n_val, 1), len(samples) - 1)
        else:
            n_val = 0
        for j, p in enumerate(perm):
            split_of[samples[p]] = "val" if j < n_val else "train"
    return meta["sample"].map(split_of).rename("split")


def read_throughput(store: TileStore | str | os.PathLike, *, batch: int = 64, n_batches: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Random-batch read speed of a store (all arrays of each tile), as the training loader reads.

    Returns
    -------
    dict
        ``tiles_per_s``, ``mb_per_s``, ``batch``, ``n_batches``, ``n_tiles``, ``tile_px``, ``seconds``.
        A store that fits in the page cache is measured at memory speed after its first read;
        the first batch is not timed.
    """
    st = store if isinstance(store, TileStore) else TileStore(store)
    n = len(st)
    if n == 0:
        raise InputError("empty tile store", path=st.path, fix="build it with some tiles first")
    rng = np.random.default_rng(seed)
    b = min(int(batch), n)
    st.get_batch(rng.choice(n, size=b, replace=False))  # warm-up
    nbytes = 0
    t0 = time.perf_counter()
    for _ in range(int(n_batches)):
        out = st.get_batch(rng.choice(n, size=b, replace=False))
        nbytes += sum(a.nbytes for a in out.values())
    dt = time.perf_counter() - t0
    return {"tiles_per_s": round(b * n_batches / dt, 1), "mb_per_s": round(nbytes / dt / 1e6, 1),
            "batch": b, "n_batches": int(n_batches), "n_tiles": n, "tile_px": st.tile_px,
            "seconds": round(dt, 4)}


def cli_main(argv: list[str]) -> int:
    """``stlib tiles info PATH``: summary of a tile store (tiles per split / organ / sample)."""
    parser = argparse.ArgumentParser(prog="stlib tiles", description="inspect a tile store")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("info", help="summary of a tile store")
    p.add_argument("path")
    args = parser.parse_args(argv)
    st = TileStore(args.path)
    print(repr(st))
    counts = st.meta.groupby(["split", "organ"]).agg(samples=("sample", "nunique"), tiles=("tile_id", "size"),
                                                      nuclei=("n_nuclei", "sum"))
    print(counts.to_string())
    return 0
