"""Small shared helpers: errors that name the file and the fix, atomic writes, progress, seeds."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class StlibError(Exception):
    """Base error of stlib. Messages name the file/sample and say what to do."""


class InputError(StlibError, ValueError):
    """Bad or missing input data.

    Parameters
    ----------
    message
        What is wrong.
    path
        The offending file or folder (named in the message).
    sample
        The sample id, when known.
    fix
        What the user should do about it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 sample: str | None = None, fix: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.sample = sample
        self.fix = fix
        super().__init__(format_error(message, path=path, sample=sample, fix=fix))


def format_error(message: str, *, path: str | os.PathLike | None = None, sample: str | None = None,
                 fix: str | None = None, url: str | None = None) -> str:
    """``"sample S: URL: PATH: message -> fix"``: the one shape of stlib's error messages."""
    parts = [f"sample {sample}"] if sample else []
    parts += [str(v) for v in (url, path) if v is not None and v != ""]
    prefix = ": ".join(parts)
    text = f"{prefix}: {message}" if prefix else message
    return f"{text} -> {fix}" if fix else text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing half-written is ever left under the final name: on an exception the temporary
    file (or folder) is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()  # let the writer create it (some writers refuse existing files)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it onto ``path`` when complete.

    An existing ``path`` is replaced only after the new one is complete.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write JSON atomically (sorted keys, NaN-free floats stay as given)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a missing/corrupt file into an :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, fix="check the path or re-run the step that writes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e})", path=path, fix="delete it and re-run the step that writes it") from e


def progress(iterable: Iterable, *, desc: str, total: int | None = None, disable: bool | None = None):
    """tqdm progress bar (to stderr); quiet when ``STLIB_NO_PROGRESS=1``."""
    from tqdm.std import tqdm  # plain text bar: no widget warnings in executed notebooks

    if disable is None:
        disable = os.environ.get("STLIB_NO_PROGRESS", "0") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, mininterval=1.0)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _pool_init(threads: int, initializer: Any = None, initargs: tuple = ()) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def map_processes(fn: Any, items: Iterable[Any], *, workers: int | None = None,
                  threads: int | None = None, initializer: Any = None, initargs: tuple = (),
                  desc: str | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, run in ``workers`` fresh processes (results in order).

    Meant for several small CPU trainings: a network of the demo's size on small crops uses a
    second torch thread poorly (one training step of the demo network, 8 crops of 80 px, on the
    2-core build machine: 0.35 s of CPU with one thread, 0.49 s with two), so one single-thread
    process per core gets through more runs per minute than one process using every core. Each
    run's result does not depend on where it ran (its seeds live in its config; the number of
    torch threads may change the last bits of floating-point sums, nothing else). Processes are
    spawned (never forked: a fork of a process whose OpenMP threads already ran can hang) and
    ``fn`` and the items must be picklable (``fn`` a module-level function). An exception of one
    item is raised here, after the items already running finished.

    Parameters
    ----------
    workers
        Processes; default: one per usable CPU (at most one per item). ``1`` runs everything in
        this process, as does a single item.
    threads
        torch threads of each process; default: the usable CPUs divided among the workers.
    initializer, initargs
        ``initializer(*initargs)`` runs once in each worker process before its first item (e.g. to
        load a model once per process, not once per item); in this process when it runs the items
        itself (``workers`` 1 or a single item).
    desc
        Show progress over the items (:func:`progress`) under this name.
    """
    items = list(items)
    cpus = usable_cpus()
    workers = min(len(items), cpus if workers is None else int(workers))
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        it = items if desc is None else progress(items, desc=desc)
        return [fn(item) for item in it]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = int(threads) if threads else max(1, cpus // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init,
                             initargs=(threads, initializer, tuple(initargs))) as pool:
        results = pool.map(fn, items)
        if desc is not None:
            results = progress(results, desc=desc, total=len(items))
        return list(results)


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and modification time of a file: what a cache key remembers of an input."""
    p = Path(path)
    st = p.stat()
    return {"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(config: Any, files: Iterable[str | os.PathLike] = ()) -> str:
    """The one cache key of stlib's stages: SHA-256 of ``config`` (canonical JSON, keys sorted;
    values JSON cannot hold are written with ``str``) and the :func:`file_fingerprint` of each
    input file, in the order given. A stage keeps its output while the key it recorded is unchanged.
    """
    import hashlib

    payload = {"config": config, "files": [file_fingerprint(f) for f in files]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def repo_root() -> Path:
    """The repository root (folder holding ``data_manifest.yaml``), searched upward from cwd."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "data_manifest.yaml").is_file():
            return p
    pkg = Path(__file__).resolve().parent.parent
    return pkg


def checkout_path(path: str | os.PathLike) -> Path:
    """``path`` as given, or, when a relative path is not found from the working directory, relative to
    the stlib checkout (so data shipped with the project, e.g. ``"realtissue"``, is found from anywhere)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = Path(__file__).resolve().parents[1] / p
    return alt if alt.exists() else p


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a measurement ran on: platform, Python, CPUs (and those this process may use),
    CPU model, numba's threads and the load average; the one such record of benchmarks and runs."""
    import platform

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    try:
        import numba

        numba_threads = int(numba.get_num_threads())
    except Exception:  # pragma: no cover - numba missing or not initialisable
        numba_threads = None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model(),
            "numba_threads": numba_threads,
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def device_name(device: Any) -> str:
    """The CUDA device's name, or the CPU model for a CPU device (``torch.device`` or string)."""
    import torch

    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()


def environment_info() -> dict[str, Any]:
    """Versions and hardware of this run (for the reproducibility record of the book)."""
    import sys
    from importlib import metadata

    pkgs = ["stlib", "numpy", "scipy", "pandas", "torch", "anndata", "scanpy", "squidpy",
            "scikit-image", "geopandas", "shapely", "tifffile", "pyarrow", "papermill", "jupyter-book"]
    versions = {}
    for p in pkgs:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    machine = machine_info()
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": machine["platform"],
        "cpu_count": machine["cpu_count"],
        "cpu_model": machine["cpu_model"],
        "versions": versions,
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_malloc_settings: dict[int, int] = {}


def keep_freed_memory(*, mmap_threshold: int, trim_threshold: int, top_pad: int | None = None) -> bool:
    """Let glibc's malloc keep freed memory in the process for reuse instead of handing it back to
    the kernel; returns whether the setting is in effect (False where the C library has no
    ``mallopt``: macOS, Windows, musl).

    Stages that allocate and free the same large arrays again and again (alignment windows, per-tile
    label maps) otherwise fault the same pages in again, zero-filled, each time: with glibc's
    adaptive thresholds that was a fifth to a quarter of those stages' CPU time on the slide-sized
    benchmark. Each stage passes the thresholds it was measured with (``mmap_threshold``: largest
    request served from the heap; ``trim_threshold``: free memory kept at the top of a heap;
    ``top_pad``: extra memory taken when a heap grows). Only the allocator's bookkeeping changes,
    never a value computed; the setting is process-wide and stays after the call (glibc's adaptive
    mode cannot be switched back on). Repeated calls with the same values do nothing. No library
    does this for us: numpy and numba allocate through ``malloc``.
    """
    want = {_M_MMAP_THRESHOLD: int(mmap_threshold), _M_TRIM_THRESHOLD: int(trim_threshold)}
    if top_pad is not None:
        want[_M_TOP_PAD] = int(top_pad)
    todo = {k: v for k, v in want.items() if _malloc_settings.get(k) != v}
    if not todo:
        return True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = True
    for k, v in todo.items():
        if mallopt(k, v):
            _malloc_settings[k] = v
        else:  # pragma: no cover - refused by the C library
            ok = False
    return ok

