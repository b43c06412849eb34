"""The inference engine: the network on batches of tiles and the post-processing workers.

:func:`load_inference_model` reads ``model.pt`` and its training resolution; :func:`predict_tiles`
runs the network on a stack of tiles; :func:`run_pipeline` predicts batches (bf16 autocast +
channels_last on CUDA, fp32 on CPU) while a thread pool (or, with ``processes=True``, a process
pool: on a GPU the network outruns what GIL-bound threads can post-process) post-processes the
previous ones; :func:`segment_tiles` applies it to independent tiles. Slides (tiling, resolution,
stitching) are :mod:`stlib.infer.slide`.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.config import resolve_device
from stlib.constants import CLASS_NAMES
from stlib.model import postproc
from stlib.model.net import load_model, to_input
from stlib.utils import InputError


@dataclass
class ModelInfo:
    """A network ready for inference and what it was trained for.

    Attributes
    ----------
    model
        The network (eval mode); ``forward`` returns ``{"np", "hv", "nt"}`` logits.
    um_per_px
        Pixel size (µm) of the training tiles: images are resampled to it.
    tile_px
        Training tile size; the default inference tile.
    class_names
        Class id -> name of the NT head (from the model file).
    source
        The model file, or a description.
    encoder
        Encoder name (``"small"``, ``"resnet50"``) when known.
    postproc
        Post-processing settings stored with the model (``np_thresh``, ``marker_thresh``,
        ``min_size``, ``mode``, ``marker_h``, ``hv_weight``; :func:`stlib.train.checkpoint.write_postproc`);
        empty = HoVer-Net's.
    """

    model: torch.nn.Module
    um_per_px: float
    tile_px: int = 256
    class_names: dict[int, str] = field(default_factory=lambda: dict(CLASS_NAMES))
    source: str = "<in-memory model>"
    encoder: str | None = None
    postproc: dict[str, Any] = field(default_factory=dict)
    #: per-image stain normalisation the network was trained with (:mod:`stlib.model.stain`; the
    #: model file's ``config["stain_norm"]``, absent = ``"none"``), applied by :func:`stlib.infer.infer_image`
    stain_norm: str = "none"


def load_inference_model(path: str | os.PathLike, *, device: str = "cpu") -> ModelInfo:
    """Load ``model.pt`` written by :mod:`stlib.train` for inference.

    Parameters
    ----------
    path
        The model file.
    device
        Where the weights go (``"auto"`` allowed).

    Raises
    ------
    InputError
        Missing/corrupt file, another class set (from :func:`stlib.model.net.load_model`), or
        no training resolution stored in the file.
    """
    path = Path(path)
    dev = resolve_device(device)
    model, config = load_model(path, map_location=dev)
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # old (non-zip) serialisation cannot be memory-mapped
        meta = torch.load(path, map_location="cpu", weights_only=True)
    um = meta.get("um_per_px")
    if um is None or not float(um) > 0:
        raise InputError("model file does not say at which resolution (um_per_px) it was trained", path=path,
                         fix="use a model.pt written by `stlib train`, or pass the model object with "
                             "model_um_per_px=")
    names = {int(k): str(v) for k, v in (meta.get("class_names") or CLASS_NAMES).items()}
    return ModelInfo(model=model, um_per_px=float(um), tile_px=int(meta.get("tile_px") or 256),
                     class_names=names, source=str(path), encoder=config.get("encoder"),
                     postproc=dict(meta.get("postproc") or {}),
                     stain_norm=str((meta.get("config") or {}).get("stain_norm", "none")))


def as_model_info(model_or_path: Any, device: str, model_um_per_px: float | None) -> ModelInfo:
    """A :class:`ModelInfo` from a model file, a ``ModelInfo`` or a network module (whose training resolution
    comes from ``model_um_per_px`` or its ``um_per_px`` attribute); ``model_um_per_px`` overrides."""
    if isinstance(model_or_path, ModelInfo):
        info = model_or_path
    elif isinstance(model_or_path, torch.nn.Module):
        um = model_um_per_px if model_um_per_px is not None else getattr(model_or_path, "um_per_px", None)
        if um is None:
            raise InputError("the model's training resolution is unknown",
                             fix="pass model_um_per_px= (e.g. 0.25 for a 40x model) or a model.pt path")
        enc = getattr(getattr(model_or_path, "net_config", None), "encoder", None)
        info = ModelInfo(model=model_or_path, um_per_px=float(um),
                         tile_px=int(getattr(model_or_path, "tile_px", 256)), encoder=enc)
    else:
        info = load_inference_model(model_or_path, device=device)
    if model_um_per_px is not None:
        info.um_per_px = float(model_um_per_px)
    return info


def prepare_model(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``dev`` (channels_last on CUDA), ready for :func:`forward`."""
    model.eval()
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def forward(model: torch.nn.Module, images: np.ndarray, dev: torch.device, amp: bool,
            classify: bool = True) -> dict[str, np.ndarray]:
    """One batch through the network: softmax NP (channel 1), HV, softmax NT as float32 numpy.

    ``classify=False``: a :class:`~stlib.model.net.HoVerNet` runs without its NT decoder (a third
    of the decoders' compute) and ``tp_prob`` is ``None``; other modules run whole."""
    from stlib.model.net import HoVerNet

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images))
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
        x = to_input(x)  # uint8 travels, the float conversion happens on the device
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(amp and dev.type == "cuda")):
            out = model(x) if classify or not isinstance(model, HoVerNet) else model(x, heads=("np", "hv"))
        np_prob = torch.softmax(out["np"].float(), dim=1)[:, 1]
        hv = out["hv"].float()
        tp = torch.softmax(out["nt"].float(), dim=1).cpu().numpy() if classify else None
        return {"np_prob": np_prob.cpu().numpy(), "hv": hv.cpu().numpy(), "tp_prob": tp}


def check_images(images: Any) -> np.ndarray:
    """``images`` as a ``(B, H, W, 3)`` uint8 array; ``ValueError`` otherwise."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
    return images


def predict_tiles(model: torch.nn.Module, images: np.ndarray, *, device: str = "auto", batch_size: int = 16,
                  amp: bool = True) -> dict[str, np.ndarray]:
    """Network outputs of a stack of RGB tiles.

    Parameters
    ----------
    model
        A :class:`~stlib.model.net.HoVerNet` (or any module with the same outputs). It is put
        in eval mode and moved to ``device``.
    images
        ``(B, H, W, 3)`` uint8 RGB.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    batch_size
        Tiles per forward pass.
    amp
        bf16 autocast on CUDA (ignored on CPU, which runs fp32).

    Returns
    -------
    dict
        ``np_prob`` ``(B, H, W)`` nucleus probability, ``hv`` ``(B, 2, H, W)``, ``tp_prob``
        ``(B, C, H, W)`` class probabilities (softmax over the NT head), all float32.
    """
    images = check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(resolve_device(device))
    model = prepare_model(model, dev)
    parts = [forward(model, images[i:i + batch_size], dev, amp) for i in range(0, len(images), batch_size)]
    if not parts:
        h, w = images.shape[1:3]
        return {"np_prob": np.zeros((0, h, w), np.float32), "hv": np.zeros((0, 2, h, w), np.float32),
                "tp_prob": np.zeros((0, 0, h, w), np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def default_workers() -> int:
    """Post-processing workers by default: the CPUs this process may use, minus one, between 1 and 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n - 1))


def prefetch(it: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (tile reading overlaps the GPU)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", done))
        except BaseException as e:  # re-raised in the consumer
            q.put(("error", e))

    t = threading.Thread(target=fill, daemon=True, name="stlib-infer-reader")
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class Timing:
    """Seconds spent in the network, in post-processing and reading tiles, and tiles processed."""

    net_s: float = 0.0
    postproc_s: float = 0.0
    read_s: float = 0.0
    n_tiles: int = 0


def _timed_call(work: Callable[..., Any], key: Any, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = work(key, a, b, c)
    return res, time.perf_counter() - t0


def run_pipeline(model: torch.nn.Module, batches: Iterable[tuple[list[Any], np.ndarray]],
                 work: Callable[[Any, np.ndarray, np.ndarray, np.ndarray], Any], *, dev: torch.device,
                 amp: bool, workers: int, timing: Timing, processes: bool = False,
                 classify: bool = True) -> Iterator[tuple[Any, Any]]:
    """Predict batches on ``dev`` while a pool runs ``work`` on the previous ones.

    Yields ``(key, work(key, np_prob, hv, tp_prob))`` in input order. At most two batches of
    network outputs wait for post-processing, which bounds memory. The pool holds ``workers``
    threads, or with ``processes=True`` worker processes (``spawn``; ``work`` must pickle): the
    post-processing libraries hold the GIL, so only processes add CPU cores to it (for a GPU,
    whose network outruns one core). ``classify=False``: ``tp_prob`` is ``None`` (:func:`forward`).
    """
    def timed(key: Any, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[Any, float]:
        return _timed_call(work, key, a, b, c)

    if workers > 0 and processes:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        submit = functools.partial(pool.submit, _timed_call, work)
    elif workers > 0:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="stlib-postproc")
        submit = functools.partial(pool.submit, timed)
    else:
        pool = None
    pending: deque[list[tuple[Any, Future | tuple[Any, float]]]] = deque()

    def collect(items: list[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        for key, fut in items:
            res, dt = fut.result() if isinstance(fut, Future) else fut
            timing.postproc_s += dt
            yield key, res

    try:
        for keys, imgs in batches:
            t0 = time.perf_counter()
            out = forward(model, imgs, dev, amp, classify)
            timing.net_s += time.perf_counter() - t0
            timing.n_tiles += len(keys)
            items = []
            for j, key in enumerate(keys):
                args = (key, out["np_prob"][j], out["hv"][j], None if out["tp_prob"] is None else out["tp_prob"][j])
                items.append((key, submit(*args) if pool else timed(*args)))
            pending.append(items)
            while len(pending) > (2 if pool else 0):
                yield from collect(pending.popleft())
        while pending:
            yield from collect(pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def segment_tiles(model: torch.nn.Module, images: np.ndarray, *, device: str = "auto", batch_size: int = 16,
                  amp: bool = True, workers: int = 0, **postproc_kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nucleus instances and classes of independent tiles (no stitching).

    Parameters
    ----------
    model, images, device, batch_size, amp
        As in :func:`predict_tiles`.
    workers
        Post-processing threads; while they work on one batch the next batch is predicted.
        0 = post-process in the calling thread.
    **postproc_kwargs
        Passed to :func:`stlib.model.postproc.hovernet_postprocess` (``np_thresh``, ...).

    Returns
    -------
    list
        One ``(inst, type)`` per tile: ``inst`` (H, W) int32 ids 1..n, ``type`` (H, W) uint8.
    """
    images = check_images(images)
    dev = torch.device(resolve_device(device))
    model = prepare_model(model, dev)

    def batches() -> Iterator[tuple[list[int], np.ndarray]]:
        for i in range(0, len(images), batch_size):
            yield list(range(i, min(i + batch_size, len(images)))), images[i:i + batch_size]

    def work(_k: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inst, typ, _ = postproc.hovernet_postprocess(a, b, c, **postproc_kwargs)
        return inst, typ

    return [r for _, r in run_pipeline(model, batches(), work, dev=dev, amp=amp, workers=workers, timing=Timing())]
