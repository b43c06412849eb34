"""The tile stage's driver: a run's samples cut into the training tile stores (``stlib tiles build``).

:func:`build_tile_stores` runs the stage's four steps for every sample of a cohort table:

1. **rasterise** (:func:`stlib.tiles.slide.rasterise`): the label maps of each grid tile from
   the sample's aligned nuclei (``labels/{sample}/nuclei.parquet``, :mod:`stlib.labels.masks`);
2. **refine** (:func:`stlib.tiles.slide.refine`): the ST masks snapped to their H&E nucleus
   (:mod:`stlib.labels.refine`), scored against the demo truth where there is one;
3. **write** (:func:`write_tile`): each finished tile appended to the tile stores
   (:class:`stlib.io.tiles.TileStoreWriter`, the on-disk format) in grid order;
4. **split** (:func:`split_stores`): ``train`` / ``val`` / ``test`` by sample and organ
   (:func:`assign_splits`), written identically into every store of the run.

Steps 1-2 (and the H&E tile) run for many tiles at once (:func:`stlib.tiles.slide.iter_slide_tiles`).
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlib.config import RefineConfig, TilesConfig, with_options
from stlib.layout import RunLayout
from stlib.utils import InputError, atomic_path, cache_key, progress, read_json

__all__ = ["TILES_VERSION", "assign_splits", "build_tile_stores", "tiles_key", "write_tile", "split_stores",
           "refinement_table", "cli_parser", "cli_main"]

#: version of the tile stage; part of a store's ``build_key`` (:func:`tiles_key`; the value it had
#: as ``stlib.labels.derive.LABELS_VERSION``)
TILES_VERSION = "2"


def assign_splits(meta: pd.DataFrame, *, heldout_organs: Sequence[str], val_fraction: float = TilesConfig.val_fraction,
                  seed: int = TilesConfig.seed, guard_tiles: int = 1) -> pd.Series:
    """Splits by sample and organ; organs with a single training sample get a spatial split.

    Held-out organs -> ``test``. A training organ with >= 2 samples: whole samples go to
    ``val`` (:func:`stlib.io.tiles.split_by_sample`). A training organ with one sample: the
    right-most columns of its tiles (about ``val_fraction`` of them) are ``val`` and the
    ``guard_tiles`` columns before them are dropped (``""``), so no tile or its neighbour
    crosses the split.
    """
    from stlib.io.tiles import split_by_sample

    split = split_by_sample(meta, val_fraction=val_fraction, seed=seed, heldout_organs=heldout_organs)
    for organ, sub in meta.groupby("organ"):
        if organ in set(heldout_organs) or sub["sample"].nunique() != 1:
            continue
        cols = np.sort(sub["x0"].unique())
        n_val = max(1, int(round(val_fraction * len(cols))))
        if len(cols) < n_val + guard_tiles + 1:
            continue
        val_cols = set(cols[-n_val:])
        guard_cols = set(cols[-n_val - guard_tiles:-n_val]) if guard_tiles else set()
        x = sub["x0"]
        split.loc[sub.index[x.isin(val_cols).to_numpy()]] = "val"
        split.loc[sub.index[x.isin(guard_cols).to_numpy()]] = ""
    return split


def build_tile_stores(hest_dir: str | Path, samples: pd.DataFrame, run_dir: str | Path, *,
                      config: TilesConfig | None = None, truth_dir: str | Path | None = None,
                      name: str = "st", labels_name: str = "{sample}", force: bool = False, workers: int | None = None,
                      timings: dict[str, float] | None = None, **options: Any) -> dict[str, Path]:
    """Cut every sample into training tiles; write ``{run_dir}/tiles/{name}`` (and ``truth``).

    The ST store's pixels outside the region where Xenium imaged and transcripts fall
    (``coverage.parquet`` of each sample, :func:`stlib.labels.derive.imaged_region`) are ``ignore``: an H&E nucleus
    there is not background, nobody labelled it. So are those within ``region_border_um`` of the region's
    edge that no ST nucleus covers (an unlabelled nucleus from outside can reach that far in).

    Parameters
    ----------
    samples
        Cohort table with ``sample``, ``organ``, ``role`` (``train`` / ``held-out``).
    run_dir
        Run folder (:class:`stlib.layout.RunLayout`): reads ``labels/{sample}/`` and
        ``alignment/{sample}/alignment.json``, writes ``tiles/{name}``.
    config
        The knobs (:class:`stlib.config.TilesConfig`: ``um_per_px``, ``tile_px``, ``seed`` and
        ``val_fraction`` of the split, ``refine_masks`` and its ``refinement``); keyword ``options``
        (its fields) override it. Default: its defaults.
    truth_dir
        Demo truth root: also writes ``tiles/{name}_truth`` with the true nuclei and classes on
        exactly the same tiles (the "manual truth" of the demo evaluation).
    labels_name
        Folder of each sample's labels under ``run_dir/labels`` (``{sample}`` is replaced; the
        labeler ablation uses ``"{sample}__flat"`` etc.).
    refine_masks (config)
        Snap the rasterised ST nuclei to their haematoxylin boundary in each tile
        (:mod:`stlib.labels.refine`); nuclei without H&E contrast become ``ignore``. What it
        did, per sample, is recorded under ``refinement`` in the store's ``store.json`` (with
        the mask PQ of the ST masks against the truth before and after, when there is a truth).
    workers
        Threads cutting tiles (:func:`stlib.tiles.slide.iter_slide_tiles`; default: the
        usable CPUs). The tiles and the stores are the same for any number.
    timings
        When given, busy seconds per stage are added to it (``stlib bench derive``).

    Returns
    -------
    ``{"st": path, "truth": path?}``. Idempotent: stores built with the same parameters from the
    same labels are kept (``build_key`` in ``store.json``) unless ``force``.
    """
    import geopandas as gpd

    from stlib.align import load_alignment
    from stlib.io.hest import HestSample
    from stlib.io.tiles import TileStoreWriter

    cfg = with_options(TilesConfig, config, options)
    um_per_px, tile_px = cfg.um_per_px, cfg.tile_px
    hest_dir, layout = Path(hest_dir), RunLayout(run_dir)
    out = {"st": layout.tiles_dir(name)}
    if truth_dir is not None:
        out["truth"] = layout.tiles_dir(f"{name}_truth")
    rcfg = cfg.refinement if cfg.refine_masks else None
    lab_dirs = {sid: layout.labels_dir(labels_name.format(sample=sid)) for sid in samples["sample"]}
    for sid, d in lab_dirs.items():
        if not (d / "nuclei.parquet").is_file():
            raise InputError("labels not derived yet", path=d, sample=sid,
                             fix="run derive_sample / `stlib labels` for it first")
    build_key = tiles_key(cfg, truth_dir=truth_dir, samples=samples[["sample", "organ", "role"]].astype(str)
                          .to_dict("records"), labels_name=labels_name,
                          with_report=[sid for sid, d in lab_dirs.items() if (d / "label_report.json").is_file()],
                          files=[f for d in lab_dirs.values() for f in (d / "nuclei.parquet", d / "label_report.json")
                                 if f.is_file()])
    if not force and all((p / "store.json").is_file() for p in out.values()) and all(
            read_json(p / "store.json").get("build_key") == build_key for p in out.values()):
        return out
    heldout = sorted(samples.loc[samples["role"] == "held-out", "organ"].unique())
    writers = {k: TileStoreWriter(p, tile_px=tile_px, um_per_px=um_per_px, source=k, overwrite=True)
               for k, p in out.items()}
    refinement: dict[str, Any] = {}
    try:
        for row in progress(list(samples.itertuples()), desc="tiles"):
            nuc = gpd.read_parquet(lab_dirs[row.sample] / "nuclei.parquet")
            cov_path = lab_dirs[row.sample] / "coverage.parquet"
            imaged = gpd.read_parquet(cov_path).geometry.values if cov_path.is_file() else None
            truth = None
            if "truth" in out:
                t = gpd.read_parquet(Path(truth_dir) / row.sample / "nuclei.parquet")
                truth = t[t["visible"].to_numpy(bool)] if "visible" in t.columns else t
            rep = _sample_tiles(HestSample(hest_dir, row.sample), row.organ, nuc, truth, writers,
                                load_alignment(layout.alignment_json(row.sample)),
                                um_per_px=um_per_px, tile_px=tile_px, rcfg=rcfg, workers=workers, timings=timings,
                                imaged=imaged, region_border_um=cfg.region_border_um)
            if rep is not None:
                refinement[row.sample] = rep
        t_close = time.perf_counter()
        extra = {"build_key": build_key,
                 "refinement": None if rcfg is None else {"config": asdict(rcfg), "per_sample": refinement}}
        paths = {k: w.close(extra=extra if k == "st" else {"build_key": build_key}) for k, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w._release()
        raise
    split_stores(paths, heldout_organs=heldout, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if timings is not None:
        timings["store_finish"] = timings.get("store_finish", 0.0) + time.perf_counter() - t_close
    return paths


def tiles_key(config: TilesConfig, *, truth_dir: str | Path | None = None, samples: Sequence[dict] = (),
              labels_name: str = "{sample}", with_report: Sequence[str] = (), files: Sequence[str | Path] = ()) -> str:
    """The cache key of a run's tile stores (:func:`stlib.utils.cache_key`): the config (its
    ``refinement`` only with ``refine_masks``), the truth, the samples and their labels' files."""
    rcfg = asdict(config.refinement) if config.refine_masks else None
    return cache_key({"config": {**asdict(config), "refinement": rcfg},
                      "truth": None if truth_dir is None else str(truth_dir),
                      "samples": list(samples), "labels_name": labels_name, "version": TILES_VERSION,
                      "with_report": list(with_report)}, files)


def _sample_tiles(s, organ: str, nuc, truth, writers: dict[str, Any], res, *, um_per_px: float, tile_px: int,
                  rcfg: RefineConfig | None, workers: int | None,
                  timings: dict[str, float] | None, imaged=None, region_border_um: float = 0.0) -> dict[str, Any] | None:
    """Cut one sample into tiles (in parallel) and append them to the writers in grid order.

    ``imaged``: the Xenium-imaged region (level-0 px polygons, :func:`stlib.labels.derive.imaged_region`); the ST
    maps are ``ignore`` outside it, and within ``region_border_um`` of its edge (the image edge included)
    every pixel but those of ST nuclei is too (:func:`stlib.labels.masks.known_background_region`).

    Returns the sample's refinement record (None without refinement).
    """
    from stlib.labels.masks import TileRenderer, known_background_region
    from stlib.labels.refine import RefineStats
    from stlib.tiles.slide import iter_slide_tiles

    excluded = [_box(r) for r in res.excluded_regions] or None
    score = (res.scores.get("global", {}).get("after") or {}).get("corr")
    align_score = float(score) if score is not None else float("nan")
    scale = s.pixel_size_um / um_per_px
    stats, pq_before, pq_after = RefineStats(), [], []
    with s.wsi() as wsi:
        H, W = wsi.shape
        label_sets = {"st": nuc} if truth is None else {"st": nuc, "truth": truth}
        renderers = {}
        t0 = time.perf_counter()
        known = known_background_region(imaged, W, H, region_border_um / s.pixel_size_um) \
            if imaged is not None and len(imaged) else None
        for k, g in label_sets.items():
            conf = g["confidence"].to_numpy(float) if "confidence" in g.columns else 1.0
            renderers[k] = TileRenderer(g.geometry.values, width=W, height=H, scale=scale, tile_px=tile_px,
                                        classes=g["class"].to_numpy().astype(np.uint8), confidence=conf,
                                        ignore_polygons=excluded if k == "st" else None,
                                        tissue=_imaged_or_none(imaged) if k == "st" else None,
                                        known_background=known if k == "st" else None)
        if timings is not None:
            timings["polygon_setup"] = timings.get("polygon_setup", 0.0) + time.perf_counter() - t0
        # the tiles are written in their own thread (in grid order), so that this thread keeps the
        # workers fed while the arrays go to disk
        with _TileWriter(writers, sample=s.id, organ=organ, align_score=align_score) as tw:
            for t in iter_slide_tiles(wsi, renderers, size_l0=tile_px / scale, tile_px=tile_px, um_per_px=um_per_px,
                                      refine_config=rcfg, workers=workers, timings=timings):
                if t.refine is not None:
                    stats = stats + t.refine
                if t.pq_before is not None:
                    pq_before.append(t.pq_before)
                    pq_after.append(t.pq_after)
                tw.submit(t)
        if timings is not None:
            timings["store_writing"] = timings.get("store_writing", 0.0) + tw.seconds
            timings["cpu:store_writing"] = timings.get("cpu:store_writing", 0.0) + tw.cpu_seconds
    if rcfg is None:
        return None
    rep = stats.to_dict()
    if pq_before:
        rep["mask_pq_vs_truth_before"] = float(np.nanmean(pq_before))
        rep["mask_pq_vs_truth_after"] = float(np.nanmean(pq_after))
    return rep


class _TileWriter:
    """:func:`write_tile` of finished tiles in one background thread, in the order submitted.

    At most ``depth`` tiles wait; :meth:`submit` blocks beyond that and raises the error of a
    failed write (after which no further tile is written, so the partial store stays resumable).
    Leaving the ``with`` block waits for the queued writes. ``seconds`` / ``cpu_seconds``: wall
    and CPU time of the writes in that thread.
    """

    def __init__(self, writers: dict[str, Any], *, depth: int = 8, **row: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writers, self.row, self.depth = writers, row, int(depth)
        self.seconds = self.cpu_seconds = 0.0
        self._failed = False
        self._pending: deque = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stlib-write")

    def _write(self, tile: Any) -> None:
        if self._failed:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            write_tile(self.writers, tile, **self.row)
        except BaseException:
            self._failed = True
            raise
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0

    def submit(self, tile: Any) -> None:
        self._pending.append(self._pool.submit(self._write, tile))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def __enter__(self) -> _TileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._pending.popleft().result()
        finally:
            self._failed = self._failed or exc_type is not None
            self._pool.shutdown(wait=True)


def refinement_table(store: str | Path) -> pd.DataFrame:
    """Per-sample record of the mask refinement of a tile store (empty when it was not refined)."""
    info = read_json(Path(store) / "store.json")
    ref = info.get("refinement") or {}
    rows = [{"sample": sid, **d} for sid, d in (ref.get("per_sample") or {}).items()]
    return pd.DataFrame(rows)


def _imaged_or_none(imaged):
    """Imaged-region polygons for :func:`iter_label_tiles` (``tissue``: outside = ignore).

    An empty region (no molecule at all) makes every pixel ignore; ``None`` (labels derived
    before the region was recorded) leaves the maps as they are.
    """
    import shapely

    if imaged is None:
        return None
    if len(imaged) == 0:
        return np.array([shapely.box(-2.0, -2.0, -1.0, -1.0)], dtype=object)  # nothing imaged
    return imaged


def _box(r: dict[str, float]):
    import shapely

    return shapely.box(r["x0"], r["y0"], r["x1"], r["y1"])


def write_tile(writers: dict[str, Any], tile: Any, *, sample: str, organ: str, align_score: float) -> None:
    """Step 3: append a finished tile (:class:`stlib.tiles.slide.SlideTile`) to the writer of
    each of its label sets (``"st"``, ``"truth"``), with its meta row."""
    x0, y0 = tile.tile.origin
    for k, (inst, typ, ign, cf) in tile.maps.items():
        writers[k].add(image=tile.image, inst=inst, type=typ, ignore=ign, conf=cf, n_nuclei=tile.n_nuclei[k],
                       sample=sample, organ=organ, x0=x0, y0=y0, align_score=align_score,
                       tile_id=f"{sample}_{int(round(x0))}_{int(round(y0))}")


def split_stores(paths: dict[str, Path], *, heldout_organs: Sequence[str], val_fraction: float = 0.2,
                 seed: int = 0) -> pd.Series:
    """Step 4: the splits of :func:`assign_splits`, computed once from the first store's tiles
    and written into the ``split`` column of every store in ``paths`` (their tiles are the same).

    Returns the split per tile.
    """
    from stlib.io.tiles import TileStore

    first = next(iter(paths.values()))
    split = assign_splits(TileStore(first).meta, heldout_organs=heldout_organs, val_fraction=val_fraction,
                          seed=seed)
    for p in paths.values():
        _write_split(p, split.to_numpy())
    return split


def _write_split(store: Path, split: np.ndarray) -> None:
    meta = pd.read_parquet(store / "meta.parquet")
    if len(meta) != len(split):
        raise InputError(f"meta has {len(meta)} tiles, split {len(split)}", path=store)
    meta["split"] = split
    with atomic_path(store / "meta.parquet") as tmp:
        meta.to_parquet(tmp, index=False)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib tiles``; the knob options of ``build`` are generated from
    :class:`stlib.config.TilesConfig`."""
    from stlib.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="stlib tiles", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("build", help="cut the run's samples into RUN/tiles/st (labels derived first)")
    p.add_argument("--hest-dir", required=True, help="HEST layout root")
    p.add_argument("--sample", required=True, action="append", help="sample id (repeatable)")
    p.add_argument("--run-dir", required=True, help="run folder: reads RUN/labels/ID/, RUN/alignment/ID/, "
                                                    "writes RUN/tiles/st")
    p.add_argument("--profile", default=None,
                   help="start from this profile's 02_labels block (default: the TilesConfig defaults)")
    p.add_argument("--truth-dir", help="demo truth root (truth/): also build RUN/tiles/st_truth")
    p.add_argument("--workers", type=int, default=None, help="tile workers (default: usable CPUs)")
    p.add_argument("--force", action="store_true")
    add_config_arguments(p, TilesConfig)
    p = sub.add_parser("info", help="summary of a tile store")
    p.add_argument("path")
    return parser


def cli_main(argv: list[str]) -> int:
    """``stlib tiles build --hest-dir DIR --sample ID --run-dir RUN`` (the tile stores of a run) and
    ``stlib tiles info PATH`` (a store's tiles per split / organ / sample)."""
    args = cli_parser().parse_args(argv)
    if args.what == "info":
        from stlib.io.tiles import cli_main as info_main

        return info_main(["info", args.path])
    from stlib.config import config_from_args, stage_config
    from stlib.io.cohort import cohort_table

    cfg = config_from_args(TilesConfig, args, base=stage_config(args.profile, "tiles") if args.profile else None)
    table = cohort_table(Path(args.hest_dir).parent, samples=args.sample)
    paths = build_tile_stores(args.hest_dir, table, RunLayout(args.run_dir).root, config=cfg,
                              truth_dir=args.truth_dir, workers=args.workers, force=args.force)
    print(f"stlib tiles: tile stores {', '.join(str(p) for p in paths.values())}")
    return 0
