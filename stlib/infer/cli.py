"""``stlib infer``: the command line of the inference stage."""

from __future__ import annotations

import argparse

from stlib.infer.slide import infer_image
from stlib.infer.writers import write_outputs


def cli_main(argv: list[str]) -> int:
    """``stlib infer --model PATH --input IMAGE --out DIR [options]``."""
    p = argparse.ArgumentParser(prog="stlib infer", description="Segment and classify nuclei in an H&E tile or "
                                "whole slide; writes QuPath GeoJSON, a nuclei CSV, NAME.npz and an overlay PNG.")
    p.add_argument("--model", required=True, help="model.pt written by `stlib train`")
    p.add_argument("--input", required=True, help="PNG/JPEG/TIFF tile or pyramidal WSI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="output file stem (default: the input's)")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="level-0 pixel size of the input in µm (overrides the file; required when it has none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tile-px", type=int, default=None,
                   help="tile size in model px (default: 512, or the model's training tile if larger)")
    p.add_argument("--overlap", type=int, default=128,
                   help="model px shared by neighbouring tiles; keep it >= 2x the largest nucleus diameter")
    p.add_argument("--workers", type=int, default=None, help="post-processing threads (default CPUs-1, max 8)")
    p.add_argument("--postproc-processes", action="store_true",
                   help="post-process in --workers processes instead of threads (GPU: more CPU cores keep up)")
    p.add_argument("--no-tissue-detection", action="store_true", help="process every tile")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default bf16 autocast)")
    args = p.parse_args(argv)
    res = infer_image(args.model, args.input, um_per_px=args.um_per_px, device=args.device, tile_px=args.tile_px,
                      overlap=args.overlap, batch_size=args.batch_size, tissue_detection=not args.no_tissue_detection,
                      amp=not args.no_amp, workers=args.workers, postproc_processes=args.postproc_processes)
    paths = write_outputs(res, args.out, args.name)
    st = res.stats
    print(f"stlib infer: {len(res)} nuclei in {st['n_tiles_processed']}/{st['n_tiles']} tiles "
          f"({st['wall_s']:.1f}s on {st['device']}); wrote {', '.join(str(v) for v in paths.values())}")
    return 0
