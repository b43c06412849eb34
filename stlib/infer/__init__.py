"""Apply a trained model to an H&E tile or a whole slide: nuclei, classes, QuPath GeoJSON.

Pipeline of :func:`infer_image`
-------------------------------
1. **Model** - ``model.pt`` from :mod:`stlib.train` (:func:`load_inference_model`); its
   training resolution ``um_per_px`` and tile size ``tile_px`` are read from the file. A
   checkpoint trained on another class table is refused (:func:`stlib.model.net.load_model`).
2. **Image** - a PNG/JPEG tile, a plain TIFF or a pyramidal WSI (:func:`stlib.io.wsi.open_wsi`).
   The level-0 pixel size comes from the file or from ``um_per_px=`` (``--um-per-px``); when
   neither says it, inference stops with an :class:`~stlib.utils.InputError`: running a
   40x model on a 20x image silently produces garbage (the most common complaint about
   HoVer-Net/CellViT).
3. **Resolution** - the image is resampled to the model's µm/px *per tile*: the tile is read
   from the coarsest pyramid level that is still at least as fine as the model, then mapped
   onto the model's pixel grid with a bilinear affine transform (Gaussian pre-filter when
   shrinking). Model pixel ``i`` covers level-0 ``[i*s, (i+1)*s)`` with
   ``s = model_um / image_um``; nothing is resampled when ``s == 1`` and the level is 0.
4. **Tissue** - Otsu threshold of the HSV saturation of a thumbnail (clipped to [0.03, 0.12]
   so a tile without background keeps all its tissue; near-black pixels excluded); tiles
   whose footprint holds no tissue are skipped.
5. **Tiles** - overlapping ``tile_px`` tiles in model pixels (``overlap`` px shared);
   the network runs in batches (bf16 autocast + channels_last on CUDA, fp32 on CPU) while
   a thread pool (or, with ``postproc_processes=True``, a process pool: on a GPU the network
   outruns what GIL-bound threads can post-process) post-processes the previous batches
   (:func:`stlib.model.postproc.hovernet_postprocess`).
6. **Seams** - every point belongs to the processed tile containing it whose centre is
   nearest (:func:`stlib.model.postproc.remove_seam_duplicates`); a nucleus is kept only in
   the tile owning its centroid, so a nucleus on a seam is reported once. Decided per tile
   from the grid alone: nothing slide-sized is held in memory except (optionally) the maps.
7. **Outputs** - per nucleus: polygon and centroid in **level-0 pixels of the input** (pixel
   ``(0, 0)`` covers ``[0, 1) x [0, 1)``, so a pixel centre is at ``index + 0.5``, as QuPath
   and :mod:`stlib.labels.masks` use), area in µm², class id (:mod:`stlib.constants`; 255 =
   "Ignore" when the NT head says background for every pixel of the nucleus) and the mean
   probability of that class over the nucleus. :func:`write_outputs` writes the GeoJSON,
   CSV, NPZ and overlay.

``inst``/``type`` maps (``NAME.npz``) are at the **input's level-0 resolution** (nearest-
neighbour from the model grid), the grid of the image and of any ground truth drawn on it,
so ``stlib metrics`` can compare them directly. They are assembled only when the slide has
at most ``max_map_px`` level-0 pixels (default 64 Mpx, i.e. a tile or a small region); for
whole slides the polygons are the output.

Modules: :mod:`stlib.infer.engine` (model loading, the network on batches, post-processing
workers: :func:`predict_tiles`, :func:`segment_tiles`), :mod:`stlib.infer.slide` (steps 2-7:
:func:`infer_image`, :func:`tissue_mask`, :class:`InferenceResult`), :mod:`stlib.infer.writers`
(:func:`write_outputs`, :func:`geojson_features`) and :mod:`stlib.infer.cli` (``stlib infer``).
Every public name of these modules is importable from ``stlib.infer``.
"""

from __future__ import annotations

from stlib.infer.cli import cli_main
from stlib.infer.engine import ModelInfo, load_inference_model, predict_tiles, segment_tiles
from stlib.infer.slide import DEFAULT_MAX_MAP_PX, InferenceResult, infer_image, tissue_mask
from stlib.infer.writers import geojson_features, write_outputs

__all__ = [
    "ModelInfo", "InferenceResult", "load_inference_model", "predict_tiles", "segment_tiles",
    "tissue_mask", "infer_image", "write_outputs", "geojson_features", "cli_main", "DEFAULT_MAX_MAP_PX",
]
