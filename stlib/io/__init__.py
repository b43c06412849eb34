"""Readers and writers of the study's data: HEST-1k samples, raw Xenium bundles, PanNuke,
the data manifest, whole-slide images, manually annotated H&E sets and the tile store.

Names are imported lazily (on first attribute access), so ``import stlib.io`` stays light:
pyarrow, geopandas, anndata and h5py load only when a reader is used.
"""

# no `from __future__ import annotations` here: it would bind the name `annotations` in this
# package and shadow the submodule stlib.io.annotations for `from stlib.io import annotations`
import importlib
from typing import Any

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # HEST-1k
    "HestSample": "hest",
    "list_samples": "hest",
    "read_hest_metadata_csv": "hest",
    "read_polygons_parquet": "hest",
    # raw Xenium
    "XeniumBundle": "xenium",
    "counts_from_transcripts": "xenium",
    "normalise_cell_ids": "xenium",
    "read_boundaries": "xenium",
    "read_cell_feature_matrix": "xenium",
    "read_he_alignment": "xenium",
    "read_transcripts_file": "xenium",
    "um_to_he_px_matrix": "xenium",
    # PanNuke
    "PanNukeFold": "pannuke",
    "images_uint8": "pannuke",
    "list_folds": "pannuke",
    "masks_to_inst_type": "pannuke",
    "read_fold": "pannuke",
    # manifest
    "Manifest": "manifest",
    "load_manifest": "manifest",
    # whole-slide images
    "open_wsi": "wsi",
    # manually annotated H&E (MoNuSeg, CoNSeP, PanNuke, instance folders, QuPath GeoJSON)
    "AnnotatedImage": "annotations",
    "read_annotations": "annotations",
    "read_monuseg": "annotations",
    "read_consep_patches": "annotations",
    "read_geojson": "annotations",
    "write_geojson": "annotations",
    "write_instance_folder": "annotations",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        mod = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'stlib.io' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"stlib.io.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
