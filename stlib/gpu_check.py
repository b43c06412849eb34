"""``make gpu-check`` / ``stlib bench gpu-check``: the GPU measurements of the study in one short run.

On a machine with a CUDA GPU (about 5-8 minutes on an H100/H200-class device) it measures

1. training throughput of the ResNet-50-class HoVer-Net (bf16 autocast, channels_last) with
   ``torch.compile`` off and on: tiles/s, GPU-busy fraction (CUDA kernel time / wall time over
   profiled steps), peak GPU memory, estimated model FLOP utilisation
   (:func:`stlib.bench.bench_train_main`);
2. inference per tile: network time and post-processing time, measured apart
   (:func:`stlib.bench.bench_infer_main`);
3. whether post-processing keeps up with the network: post-processing tiles/s with 1 thread,
   with all CPUs as threads and with all CPUs as processes, against the network's tiles/s
   (issue 14, part 4: with a GPU the network is far faster than one CPU thread).

Each part writes ``gpu_<part>.json`` into ``--out-dir`` (default ``benchmarks/``) with the
device, the command and the date, and ``gpu_check.json`` collects them. ``--dry-run`` runs the
same code on the CPU with tiny sizes into a temporary folder (CI checks it); its numbers mean
nothing and it never writes into ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlib.utils import write_json

__all__ = ["gpu_check", "cli_main", "postproc_keep_up"]


def _postproc_one(args: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    from stlib.model import postproc

    return int(postproc.hovernet_postprocess(*args)[0].max())


def postproc_keep_up(n_tiles: int = 64, tile_px: int = 256, workers: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Post-processing throughput (tiles/s) on ideal network outputs of synthetic tiles:
    one thread, ``workers`` threads and ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from stlib.bench import ideal_maps, synthetic_slide

    workers = workers or os.cpu_count() or 1
    side = int(np.ceil(np.sqrt(n_tiles))) * tile_px
    _img, inst, classes = synthetic_slide(side, seed=seed, background_fraction=0.0)
    k = side // tile_px
    maps = [ideal_maps(inst[(i // k) * tile_px:(i // k + 1) * tile_px, (i % k) * tile_px:(i % k + 1) * tile_px],
                        classes, 6) for i in range(n_tiles)]
    _postproc_one(maps[0])  # warm-up
    out: dict[str, Any] = {"tiles": n_tiles, "tile_px": tile_px, "workers": int(workers)}
    t0 = time.perf_counter()
    nuclei = sum(_postproc_one(m) for m in maps)
    out["one_thread_tiles_per_s"] = round(n_tiles / (time.perf_counter() - t0), 2)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(_postproc_one, maps))
        out["threads_tiles_per_s"] = round(n_tiles / (time.perf_counter() - t0), 2)
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:  # torch ran: no fork
        list(pool.map(_postproc_one, maps[:workers]))  # start the processes
        t0 = time.perf_counter()
        list(pool.map(_postproc_one, maps, chunksize=max(1, n_tiles // (4 * workers))))
        out["processes_tiles_per_s"] = round(n_tiles / (time.perf_counter() - t0), 2)
    out["nuclei_per_tile"] = round(nuclei / n_tiles, 1)
    return out


def _run_json(fn: Any, argv: list[str], out: Path) -> dict[str, Any]:
    rc = fn(argv + ["--out", str(out)])
    if rc:
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} {' '.join(argv)} exited with {rc}")
    return json.loads(out.read_text())


def gpu_check(out_dir: str | Path = "benchmarks", *, dry_run: bool = False, compile_: bool = True,
              command: str = "stlib bench gpu-check") -> dict[str, Any]:
    """Run the GPU check (see the module docstring); returns the summary written to ``gpu_check.json``."""
    import torch

    from stlib import bench
    from stlib.utils import machine_info

    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible: run `make gpu-check` on a GPU machine, or pass --dry-run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if dry_run:  # the same code paths, tiny, on the CPU
        train_args = ["--device", "cpu", "--encoder", "small", "--batch", "2", "--steps", "2", "--warmup", "1",
                      "--tile", "64"]
        infer_args = ["--device", "cpu", "--encoder", "small", "--tiles", "4", "--batch", "2", "--tile-px", "256",
                      "--slide-px", "512"]
        keep_up = {"n_tiles": 4, "tile_px": 128, "workers": 2}
    else:
        train_args = ["--device", "cuda", "--encoder", "resnet50", "--batch", "64", "--steps", "30", "--warmup", "3"]
        infer_args = ["--device", "cuda", "--encoder", "resnet50", "--tiles", "512", "--batch", "64",
                      "--slide-px", "8192"]
        keep_up = {"n_tiles": 256, "tile_px": 256, "workers": None}
    parts: dict[str, Any] = {}
    parts["train_eager"] = _run_json(bench.bench_train_main, train_args, out / "gpu_train_eager.json")
    if compile_ and not dry_run:
        parts["train_compile"] = _run_json(bench.bench_train_main, train_args + ["--compile"], out / "gpu_train_compile.json")
    else:
        parts["train_compile"] = {"skipped": "torch.compile needs a GPU run (dry mode skips it)" if dry_run
                                  else "--no-compile"}
    parts["infer"] = _run_json(bench.bench_infer_main, infer_args, out / "gpu_infer.json")
    kp = postproc_keep_up(**keep_up)
    net_tps = 1e3 / max(parts["infer"]["net_ms_per_tile"], 1e-9) * (kp["tile_px"] / parts["infer"]["tile_px"]) ** 2
    kp["network_tiles_per_s_same_tile_size"] = round(net_tps, 2)
    kp["keeps_up_with_threads"] = bool(kp["threads_tiles_per_s"] >= net_tps)
    kp["keeps_up_with_processes"] = bool(kp["processes_tiles_per_s"] >= net_tps)
    kp.update({"device": parts["infer"]["device_name"], "command": command,
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    write_json(out / "gpu_postproc.json", kp)
    parts["postproc_keep_up"] = kp

    def pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: d.get(k) for k in keys if k in d}

    summary = {
        "benchmark": "gpu_check", "dry_run": bool(dry_run), "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": parts["infer"]["device_name"], "torch": torch.__version__,
        "cuda": torch.version.cuda, "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1),
        "train": {k: pick(v, "train_tiles_per_s", "step_s", "precision", "channels_last", "compile",
                          "gpu_busy_fraction", "peak_memory_gb", "peak_memory_kind", "mfu_est", "batch", "model")
                  for k, v in (("eager", parts["train_eager"]), ("compile", parts["train_compile"]))},
        "infer": pick(parts["infer"], "net_ms_per_tile", "postproc_ms_per_tile", "ratio_postproc_net", "tiles_per_s",
                      "precision", "batch", "tile_px"),
        "postproc_keep_up": pick(kp, "one_thread_tiles_per_s", "threads_tiles_per_s", "processes_tiles_per_s",
                                 "network_tiles_per_s_same_tile_size", "keeps_up_with_threads",
                                 "keeps_up_with_processes", "workers"),
        "files": sorted(p.name for p in out.glob("gpu_*.json")),
        "note": ("dry run on the CPU with tiny sizes: checks the code path only, the numbers mean nothing"
                 if dry_run else "measured on the device named above"),
    }
    write_json(out / "gpu_check.json", summary)
    return summary


def cli_main(argv: list[str]) -> int:
    """``stlib bench gpu-check [--dry-run] [--out-dir DIR] [--no-compile]``."""
    p = argparse.ArgumentParser(prog="stlib bench gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU into a temporary folder")
    p.add_argument("--out-dir", default=None, help="where gpu_*.json go (default benchmarks/; dry run: a temp folder)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile training run")
    args = p.parse_args(argv)
    command = "stlib bench gpu-check " + " ".join(argv)
    try:
        if args.dry_run and args.out_dir is None:
            with tempfile.TemporaryDirectory(prefix="stlib-gpu-check-") as td:
                res = gpu_check(td, dry_run=True, compile_=not args.no_compile, command=command)
        else:
            res = gpu_check(args.out_dir or "benchmarks", dry_run=args.dry_run, compile_=not args.no_compile,
                            command=command)
    except RuntimeError as e:
        print(f"stlib bench gpu-check: {e}")
        return 2
    print(json.dumps({k: res[k] for k in ("device", "seconds", "train", "infer", "postproc_keep_up")}, indent=1))
    return 0
