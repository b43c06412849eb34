"""``stlib infer``: the command line of the inference stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from stlib.config import InferConfig, add_config_arguments, config_from_args
from stlib.infer.slide import infer_image
from stlib.infer.writers import write_outputs


def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib infer``; its knob options are generated from :class:`stlib.config.InferConfig`."""
    p = argparse.ArgumentParser(prog="stlib infer", description="Segment and classify nuclei in an H&E tile or "
                                "whole slide; writes QuPath GeoJSON, a nuclei CSV, NAME.npz and an overlay PNG.")
    p.add_argument("--model", required=True, help="model.pt written by `stlib train`")
    p.add_argument("--input", required=True, help="PNG/JPEG/TIFF tile or pyramidal WSI")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--run-dir", help="run folder: writes RUN/infer/NAME/")
    out.add_argument("--out", help="output folder (instead of a run folder's infer/NAME/)")
    p.add_argument("--name", default=None, help="output file stem (default: the input's)")
    p.add_argument("--profile", default=None,
                   help="start from this profile's 06_inference block (default: the InferConfig defaults)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_config_arguments(p, InferConfig)
    return p


def cli_main(argv: list[str]) -> int:
    """``stlib infer --model PATH --input IMAGE (--run-dir RUN | --out DIR) [options]``."""
    from stlib.config import stage_config
    from stlib.layout import RunLayout

    args = cli_parser().parse_args(argv)
    cfg = config_from_args(InferConfig, args, base=stage_config(args.profile, "infer") if args.profile else None)
    res = infer_image(args.model, args.input, config=cfg, device=args.device)
    name = args.name or Path(args.input).stem
    out = Path(args.out) if args.out else RunLayout(args.run_dir).infer_dir(name)
    paths = write_outputs(res, out, args.name)
    st = res.stats
    print(f"stlib infer: {len(res)} nuclei in {st['n_tiles_processed']}/{st['n_tiles']} tiles "
          f"({st['wall_s']:.1f}s on {st['device']}); wrote {', '.join(str(v) for v in paths.values())}")
    return 0
