"""The ``stlib`` command. Each sub-command lives in the module of its pipeline stage.

``stlib <command> ...`` imports ``module`` and calls ``module.<function>(argv)``; the
stage modules own their argument parsers, so ``stlib <command> --help`` is documented
where the code is. Imports are lazy: ``stlib --help`` starts fast.
"""

from __future__ import annotations

import importlib
import os
import sys

#: command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("stlib.demo", "cli_main", "write the synthetic demo cohort (HEST + Xenium + PanNuke layouts, truth)"),
    "realtissue": ("stlib.demo.realtissue", "cli_main",
                   "write a cohort of REAL annotated H&E with a SIMULATED Xenium layer (demo layout, truth)"),
    "download": ("stlib.io.download", "cli_main", "download HEST-1k samples / PanNuke folds / MoNuSeg / CoNSeP"),
    "align": ("stlib.align", "cli_main", "align Xenium nuclei to H&E, score and refine (alignment.json)"),
    "labels": ("stlib.labels.derive", "cli_main", "derive masks, cell types and classes for a sample"),
    "tiles": ("stlib.tiles.stage", "cli_main", "build a run's tile stores or inspect one (stlib tiles build|info)"),
    "train": ("stlib.train", "cli_main", "train the HoVer-Net-style network (--config FILE)"),
    "eval": ("stlib.evaluate", "cli_main",
             "score trained networks on a run's held-out organs (segmentation + classification, CIs)"),
    "metrics": ("stlib.metrics", "cli_main", "segmentation/classification metrics of NAME.npz folders"),
    "infer": ("stlib.infer", "cli_main", "run a trained model on a tile or a whole slide"),
    "run": ("stlib.run", "cli_main", "execute the notebooks of a profile with papermill and build the book"),
    "lab": ("stlib.lab", "cli_main", "JupyterLab on parameterised copies of a profile's notebooks (make lab)"),
    "batch": ("stlib.run", "batch_main", "run a notebook over samples / a parameter grid on Dask"),
    "bench": ("stlib.bench", "cli_main", "benchmarks: labels | train | infer"),
    "robustness": ("stlib.robustness", "cli_main",
                   "labeler vs the demo generator's own biology: acceptance over seeds, robustness curves"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: stlib <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`stlib <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stlib`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from stlib import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"stlib: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, func_name, _ = COMMANDS[cmd]
    # before the command's module imports torch: idle OpenMP threads sleep (stlib.run.cpu_thread_env)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    func = getattr(importlib.import_module(mod_name), func_name)
    from stlib.utils import StlibError

    try:
        return int(func(rest) or 0)
    except StlibError as e:
        print(f"stlib {cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
