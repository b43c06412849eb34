"""Writers of inference results (:func:`write_outputs`): QuPath GeoJSON, nuclei CSV, ``NAME.npz``
maps, overlay PNG and a summary JSON, each written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stlib.constants import CLASS_COLORS, IGNORE
from stlib.infer.slide import InferenceResult
from stlib.utils import atomic_path, write_json


def geojson_features(result: InferenceResult, *, decimals: int = 2) -> Iterator[dict[str, Any]]:
    """QuPath detection features (one per nucleus), polygons in level-0 px of the input.

    Built by :func:`stlib.io.annotations.geojson_feature`, the one GeoJSON writer of stlib (its
    reader, :func:`stlib.io.annotations.read_geojson`, reads these files back).
    """
    from stlib.io.annotations import geojson_feature

    df = result.nuclei
    cols = [df[c].to_numpy() for c in ("id", "class", "class_name", "area_um2", "probability")]
    for (nid, cid, cname, area, prob), ring in zip(zip(*cols), result.polygons):
        meas: dict[str, float] = {"id": int(nid), "area_um2": round(float(area), 3)}
        if np.isfinite(prob):
            meas["probability"] = round(float(prob), 4)
        yield geojson_feature(ring, class_id=int(cid), class_label=str(cname), measurements=meas,
                              decimals=decimals)


def _overlay(result: InferenceResult) -> np.ndarray:
    from PIL import Image, ImageDraw

    base = result.thumbnail if result.thumbnail is not None else np.full((*result.image_shape, 3), 255, np.uint8)
    im = Image.fromarray(np.ascontiguousarray(base))
    draw = ImageDraw.Draw(im)
    sc = result.thumbnail_scale
    for cid, ring in zip(result.nuclei["class"].to_numpy(), result.polygons):
        pts = [(float(x) * sc, float(y) * sc) for x, y in ring]
        color = tuple(CLASS_COLORS.get(int(cid), CLASS_COLORS[IGNORE]))
        if len(pts) >= 3:
            draw.line(pts, fill=color, width=1)
    return np.asarray(im)


def write_outputs(result: InferenceResult, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
    """Write the results of :func:`infer_image` (each file atomically).

    Files
    -----
    ``NAME.geojson``
        QuPath FeatureCollection of detections: Polygon in level-0 px, ``classification``
        ``{name, color}``, ``measurements`` ``{id, area_um2, probability}``.
    ``NAME_nuclei.csv``
        ``id, x, y, area_um2, class, class_name, probability`` (x, y level-0 px).
    ``NAME.npz``
        ``inst`` (int32) and ``type`` (uint8) at the input's level-0 resolution, plus
        ``um_per_px``; only when the maps were assembled (see :func:`infer_image`).
    ``NAME_overlay.png``
        Nucleus contours coloured by class over the (thumbnail of the) image.
    ``NAME_summary.json``
        Counts per class, tiles, timings, resolutions.

    Returns
    -------
    dict
        kind -> written path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if name is None:
        stem = Path(result.source).name
        for suf in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpg", ".jpeg", ".svs"):
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        name = stem if stem and stem != "<array>" else "image"
    paths: dict[str, Path] = {}

    from stlib.io.annotations import write_geojson

    paths["geojson"] = write_geojson(out / f"{name}.geojson", geojson_features(result))

    p = out / f"{name}_nuclei.csv"
    with atomic_path(p) as tmp:
        result.nuclei.to_csv(tmp, index=False, float_format="%.4f")
    paths["csv"] = p

    if result.inst is not None:
        p = out / f"{name}.npz"
        with atomic_path(p) as tmp:
            np.savez_compressed(tmp, inst=result.inst, type=result.type, um_per_px=np.float64(result.um_per_px))
        paths["npz"] = p

    from PIL import Image

    p = out / f"{name}_overlay.png"
    with atomic_path(p) as tmp:
        Image.fromarray(_overlay(result)).save(tmp, format="PNG")
    paths["overlay"] = p

    counts = result.nuclei["class_name"].value_counts().to_dict()
    summary = {"source": result.source, "image_shape": list(result.image_shape), "um_per_px": result.um_per_px,
               "model_um_per_px": result.model_um_per_px, "n_nuclei": len(result), "per_class": counts,
               "coordinates": "level-0 px of the input; pixel (0,0) covers [0,1)x[0,1)", **result.stats}
    paths["summary"] = write_json(out / f"{name}_summary.json", summary)
    return paths
