"""The tile stage: a run's aligned, labelled samples cut into training tile stores.

Four steps, one named function each:

1. **rasterise** -- :func:`stlib.tiles.slide.rasterise`: label maps (instances, classes,
   ignore, confidence) of a grid tile from the sample's nucleus polygons
   (:class:`stlib.labels.masks.TileRenderer`);
2. **refine** -- :func:`stlib.tiles.slide.refine`: the ST masks snapped to their H&E nucleus
   (:mod:`stlib.labels.refine`);
3. **write** -- :func:`stlib.tiles.stage.write_tile`: the tile appended to the stores
   (:class:`stlib.io.tiles.TileStoreWriter`; the format itself lives in :mod:`stlib.io.tiles`,
   because readers of other sources, PanNuke and annotated images, write it too);
4. **split** -- :func:`stlib.tiles.stage.split_stores`: train / val / test by sample and organ.

:func:`stlib.tiles.stage.build_tile_stores` runs them for a cohort table (``stlib tiles build``);
:mod:`stlib.tiles.slide` runs steps 1-2 and the H&E tiles of one slide in parallel.
"""

from stlib.tiles.slide import (RowBands, SlideTile, default_workers, iter_slide_tiles, rasterise, read_tile_image,
                               refine, resample_tile)
from stlib.tiles.stage import (TILES_VERSION, assign_splits, build_tile_stores, refinement_table, split_stores,
                               write_tile)

__all__ = ["RowBands", "SlideTile", "TILES_VERSION", "assign_splits", "build_tile_stores", "default_workers",
           "iter_slide_tiles", "rasterise", "read_tile_image", "refine", "refinement_table", "resample_tile",
           "split_stores", "write_tile"]
