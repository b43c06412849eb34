"""Build the whole synthetic cohort (``stlib demo``)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlib.constants import PANNUKE_CHANNEL_TO_CLASS
from stlib.demo.config import (FINE_TYPE_TO_CLASS, ORGANS, PANNUKE_EXTRA_ORGANS, PRESETS, SCALES, DemoConfig,
                               cohort_samples, config_for_scale)
from stlib.utils import InputError, atomic_dir, progress, read_json, write_json

__all__ = ["GENERATOR_VERSION", "make_cohort", "cli_main", "expected_files", "render_pannuke"]

#: bump when the generator's output changes for the same config and seed
GENERATOR_VERSION = "2.0"

_CLASS_TO_CHANNEL = {v: k for k, v in PANNUKE_CHANNEL_TO_CLASS.items()}


def expected_files(cfg: DemoConfig) -> list[str]:
    """Paths (relative to the data root) that a complete cohort has."""
    out = ["cohort.json", "hest/HEST_v1_1_0.csv"]
    for s in cohort_samples(cfg):
        i = s.sample_id
        out += [f"hest/metadata/{i}.json", f"hest/wsis/{i}.tif", f"hest/transcripts/{i}_transcripts.parquet",
                f"hest/xenium_seg/{i}_xenium_nucleus_seg.parquet", f"hest/cellvit_seg/{i}_cellvit_seg.parquet",
                f"truth/{i}/nuclei.parquet", f"truth/{i}/transform.json"]
        if s.raw_bundle:
            out += [f"xenium/{i}/{f}" for f in ("experiment.xenium", "cells.parquet", "transcripts.parquet",
                                                 "nucleus_boundaries.parquet", "cell_feature_matrix.h5",
                                                 f"{i}_he_imagealignment.csv", "he_image.ome.tif")]
    if cfg.pannuke_per_fold > 0:
        for k in (1, 2, 3):
            out += [f"pannuke/Fold {k}/images/fold{k}/images.npy", f"pannuke/Fold {k}/images/fold{k}/types.npy",
                    f"pannuke/Fold {k}/masks/fold{k}/masks.npy"]
    return out


def _is_complete(out: Path, cfg: DemoConfig, seed: int) -> bool:
    p = out / "cohort.json"
    if not p.is_file():
        return False
    try:
        meta = read_json(p)
    except InputError:
        return False
    if meta.get("version") != GENERATOR_VERSION or meta.get("seed") != seed or meta.get("config") != cfg.to_dict():
        return False
    return all((out / f).is_file() for f in expected_files(cfg))


def render_pannuke(organ_key: str, cancer: bool, rng: np.random.Generator, cfg: DemoConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One PanNuke-like image (uint8) and its (px, px, 6) instance mask."""
    from stlib.demo.render import render_he, sample_stain
    from stlib.demo.tissue import simulate_tissue

    organ = ORGANS[organ_key]
    px = cfg.pannuke_px
    tis = simulate_tissue(organ, (px, px), cfg.pannuke_um_per_px, rng, cancer=cancer, density=cfg.cell_density,
                          dead_fraction=cfg.dead_fraction)
    img, inst = render_he(tis, sample_stain(organ, rng, cfg.stain_jitter), rng, blur_px=cfg.blur_px * 0.9,
                          defocus_px=cfg.defocus_px, defocus_fraction=cfg.defocus_fraction, noise_sd=cfg.noise_sd)
    masks = np.zeros((px, px, 6), np.float64)
    cls = np.array([FINE_TYPE_TO_CLASS[t] for t in tis.fine_type], dtype=np.int64)
    lut = np.zeros(tis.n + 1, np.int64)
    lut[1:] = [_CLASS_TO_CHANNEL[c] for c in cls]
    ch = lut[inst]
    for c in range(5):
        m = (inst > 0) & (ch == c)
        masks[..., c][m] = inst[m]
    masks[..., 5] = (inst == 0).astype(np.float64)
    return img, masks


def _pannuke(root: Path, cfg: DemoConfig, seed: int) -> dict[str, Any]:
    from stlib.demo.writers import write_pannuke_fold

    organs = ["breast", "lung", "pancreas", "prostate", "bowel", "skin", *PANNUKE_EXTRA_ORGANS]
    info: dict[str, Any] = {"folds": {}, "um_per_px": cfg.pannuke_um_per_px, "tile_px": cfg.pannuke_px}
    for k in (1, 2, 3):
        imgs, masks, types = [], [], []
        for i in range(cfg.pannuke_per_fold):
            rng = np.random.default_rng([seed, 100 + k, i])
            key = organs[(i + 4 * (k - 1)) % len(organs)]
            img, m = render_pannuke(key, bool(rng.random() < 0.6), rng, cfg)
            imgs.append(img)
            masks.append(m)
            types.append(ORGANS[key].pannuke)
        write_pannuke_fold(root, k, np.stack(imgs), np.stack(masks), np.array(types))
        info["folds"][str(k)] = {"n": len(imgs), "tissues": sorted(set(types))}
    return info


def make_cohort(out: str | Path, *, seed: int = 0, scale: str = "demo", preset: str = "realistic",
                config: DemoConfig | None = None, force: bool = False, **overrides: Any) -> Path:
    """Write the synthetic cohort (HEST + raw Xenium + PanNuke layouts, plus ground truth).

    Parameters
    ----------
    out
        The data root to create (``data_dir``); built in a temporary folder beside it and
        renamed when complete.
    seed
        Seed of everything; the same seed and config give identical tables.
    scale
        ``"demo"`` (6 samples of ~1024² px) or ``"workshop"`` (more, larger samples).
    preset
        Biology preset: ``"realistic"`` (default: :mod:`stlib.demo.biology` at the knobs'
        literature-based defaults) or ``"easy"`` (the generator before issue 12, see
        :data:`stlib.demo.config.PRESETS`).
    config
        A full :class:`DemoConfig` (then ``scale`` and ``preset`` are ignored); ``overrides`` still apply.
    force
        Rebuild even if a complete cohort with the same config and seed exists.
    **overrides
        Any knob of :class:`DemoConfig`.

    Returns
    -------
    The data root. Its ``cohort.json`` holds the version, seed, knobs, sample table (role
    ``train`` / ``held-out``) and measured statistics per sample.
    """
    from stlib.demo.sample import simulate_sample
    from stlib.demo.writers import csv_text, write_hest_sample, write_truth, write_xenium_bundle
    from stlib.io.panels import load_panel

    out = Path(out)
    if config is None:
        cfg = config_for_scale(scale, preset, **overrides)
    else:
        cfg = dataclasses.replace(config, **overrides).validate() if overrides else config.validate()
    if not force and _is_complete(out, cfg, seed):
        return out
    genes = load_panel(cfg.panel)
    t0 = time.perf_counter()
    specs = cohort_samples(cfg)
    with atomic_dir(out) as tmp:
        rows, table = [], []
        for idx, spec in enumerate(progress(specs, desc="demo samples")):
            sd = simulate_sample(spec, cfg, seed=seed, index=idx, genes=genes)
            rows.append(write_hest_sample(tmp, sd, n_genes=len(genes), jpeg_quality=cfg.jpeg_quality))
            write_truth(tmp, sd)
            if spec.raw_bundle:
                write_xenium_bundle(tmp, sd, genes=genes, jpeg_quality=cfg.jpeg_quality)
            table.append({"sample_id": spec.sample_id, "organ": ORGANS[spec.organ_key].name,
                          "disease_state": spec.disease_state, "oncotree_code": spec.oncotree_code,
                          "role": spec.role, "cell_id_style": spec.cell_id_style, "raw_bundle": spec.raw_bundle,
                          "um_per_px": cfg.um_per_px, "shape": list(sd.image.shape[:2]), "stats": sd.stats})
        (tmp / "hest").mkdir(exist_ok=True)
        from stlib.utils import atomic_path

        with atomic_path(tmp / "hest" / "HEST_v1_1_0.csv") as p:
            p.write_text(csv_text(rows), encoding="utf-8")
        pannuke = _pannuke(tmp, cfg, seed) if cfg.pannuke_per_fold > 0 else {}
        meta = {"version": GENERATOR_VERSION, "seed": seed, "scale": scale if config is None else "custom",
                "preset": preset if config is None else "custom",
                "config": cfg.to_dict(), "panel": cfg.panel, "samples": table, "pannuke": pannuke,
                "train_organs": sorted({t["organ"] for t in table if t["role"] == "train"}),
                "held_out_organs": sorted({t["organ"] for t in table if t["role"] == "held-out"}),
                "generation_seconds": round(time.perf_counter() - t0, 2),
                "note": "synthetic test bed, not evidence: every number from it says so"}
        write_json(tmp / "cohort.json", meta)
    return out


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

#: one-line help of the biology knobs (the full reasons are in stlib/demo/config.py)
_KNOB_HELP = {
    "biology": "realistic | legacy programmes.",
    "marker_overlap": "fraction of each type's textbook markers it expresses specifically;",
    "cnv_fold": "expression fold of an arm-level copy-number change (literature: ~1.2-1.5);",
    "cnv_subclonal_fraction": "fraction of copy-number events present in a subclone only;",
    "cycling_normal_fraction": "fraction of normal cells that cycle (Ki-67 index of normal tissue <5%%);",
    "noncycling_tumour_fraction": "fraction of tumour cells that do not cycle (Ki-67 index ~30%%);",
    "offvocab_fraction": "fraction of cells of types outside the labeler's vocabulary;",
    "dead_signal": "strength of any expression signal of dying cells, 0 = none;",
    "xenium_region_fraction": "fraction of the H&E field that the Xenium run imaged;",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stlib demo",
        description="Write the synthetic demo cohort (HEST-1k + raw Xenium + PanNuke layouts, ground truth). "
                    "Every knob of stlib.demo.DemoConfig is an option; unset knobs take the --scale preset.")
    p.add_argument("--out", required=True, help="data root to write (e.g. data/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo", help="cohort size preset (default demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="realistic",
                   help="biology preset: realistic (default; stlib.demo.biology at literature-based knob values) or "
                        "easy (the generator before issue 12: labeler-derived programmes, every tumour cell cycling)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical cohort exists")
    g = p.add_argument_group("knobs (DemoConfig)")
    for f in dataclasses.fields(DemoConfig):
        typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        doc = _KNOB_HELP.get(f.name, "")
        g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=None, metavar=typ.__name__.upper(),
                       help=(doc + " " if doc else "") + f"(default {f.default!r})")
    return p


def cli_main(argv: list[str]) -> int:
    """``stlib demo --out DIR [--seed N] [--scale demo|workshop] [--<knob> value ...]``."""
    args = _parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
                 if getattr(args, f.name) is not None}
    t0 = time.perf_counter()
    out = make_cohort(args.out, seed=args.seed, scale=args.scale, preset=args.preset, force=args.force, **overrides)
    meta = read_json(Path(out) / "cohort.json")
    print(f"demo cohort at {out}: {len(meta['samples'])} samples, seed {meta['seed']} "
          f"({time.perf_counter() - t0:.1f} s; generated in {meta['generation_seconds']} s)")
    return 0
