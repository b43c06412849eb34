"""Papermill orchestration: run the study's notebooks for a profile and build the book.

``stlib run --profile demo`` executes ``notebooks/NN_*.ipynb`` in order with the parameters of
``params/{profile}.yaml`` (validated by :mod:`stlib.config`) into ``book/executed/``, then builds
the Jupyter Book. A notebook whose source, parameters, stlib code and upstream notebooks did not
change since its last successful run is skipped; a failing notebook stops the run and the error
names the notebook, the cell and the exception.

Each chapter reads what the chapter before it wrote (:func:`notebook_needs`), except a
self-contained chapter (the real-tissue one, whose cohort and runs live in folders of their own):
with ``jobs`` > 1 it runs beside the chain, in a process of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stlib.config import NOTEBOOK_PARAMS, RealTissueParams, load_params
from stlib.utils import InputError, StlibError, read_json, repo_root, write_json

if TYPE_CHECKING:
    from nbformat import NotebookNode
    from traitlets.config import Config

STATE_FILE = ".run_state.json"


class NotebookFailed(StlibError):
    """A notebook raised; the message names the notebook, the cell and the error."""


@dataclass
class RunReport:
    """What :func:`run_profile` did."""

    profile: str
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    book: Path | None = None


def _code_fingerprint() -> str:
    """Hash of the stlib sources, so a code change re-runs the notebooks; the shipped release pair of the
    real-tissue chapter (``models/realtissue/release.json``, which holds its files' sha256) counts as code."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for p in sorted(pkg.rglob("*")):
        if p.suffix in (".py", ".yaml", ".csv") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(pkg)).encode())
            h.update(p.read_bytes())
    release = pkg.parent / RealTissueParams.release_dir / "release.json"
    if release.is_file():
        h.update(release.read_bytes())
    return h.hexdigest()


def _quiet_env() -> None:
    """Executed notebooks carry results, not progress bars (ours and third-party tqdm bars);
    their kernels get :func:`cpu_thread_env`."""
    os.environ.setdefault("STLIB_NO_PROGRESS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cpu_thread_env()


def cpu_thread_env() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), for the
    processes started from here (notebook kernels, ``stlib`` commands) unless the user set it.

    torch's CPU kernels run on OpenMP threads (one per core), which by default spin-wait between
    parallel regions. A small network on small crops runs thousands of short parallel regions
    per step; on a machine whose cores are busy with other work, a spinning thread burns the CPU
    time the thread it waits for needs. Measured on the 2-core build machine under load ~11
    (one training step of the demo network, 8 crops of 80 px): 9-11 s wall and 2.8-3.3 s CPU
    spinning, 1.1 s wall and 0.44 s CPU passive, 0.9-1.0 s and 0.29 s with one thread. The
    variable is read when the OpenMP runtime starts (when torch is imported), so it must be in
    the environment of the process before that: kernels and sub-commands inherit it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def kernel_config() -> Config:
    """Kernel-manager settings for every notebook kernel stlib starts (papermill, JupyterLab).

    ipykernel >= 7 warns on stderr, once per kernel, when its ZeroMQ sockets run over TCP
    without encryption. jupyter_client provisions CurveZMQ keys for kernels whose kernelspec
    declares support (ipykernel's does) when ``transport_encryption`` is ``"auto"``: the kernel
    traffic is encrypted and the warning is gone, instead of being filtered away. A kernelspec
    without the declaration simply starts unencrypted, as before.

    Returns
    -------
    traitlets.config.Config
        Empty where this libzmq has no CurveZMQ support.
    """
    import zmq
    from traitlets.config import Config

    cfg = Config()
    if zmq.has("curve"):
        cfg.KernelManager.transport_encryption = "auto"
    return cfg


def execute_notebook(src: str | os.PathLike, dst: str | os.PathLike, params: dict[str, Any],
                     cwd: str | os.PathLike) -> None:
    """Run ``src`` with papermill into ``dst`` (the one place stlib calls papermill).

    The kernel runs in ``cwd`` (the repository root, so the parameters' relative paths resolve
    from there) with the settings of :func:`kernel_config`; progress bars and the cell log stay
    out of the terminal. Raises ``papermill.PapermillExecutionError`` when a cell fails.
    """
    import papermill as pm

    pm.execute_notebook(str(src), str(dst), parameters=params, cwd=str(cwd), kernel_name="python3",
                        progress_bar=False, log_output=False, config=kernel_config())


#: tags papermill gives the cell it injects and the cell of the notebook's defaults
INJECTED_TAG, PARAMETERS_TAG = "injected-parameters", "parameters"
#: a code cell with this tag keeps its input visible in the book
SHOW_INPUT_TAG = "show-input"
_ALREADY_HIDDEN = {"hide-input", "hide-cell", "remove-input", "remove-cell"}


def book_tags(nb: NotebookNode) -> bool:
    """Tag an executed notebook for the book (jupyter-book 1.x / myst-nb cell tags).

    * papermill's ``injected-parameters`` cell and the ``parameters`` cell get ``remove-cell``:
      the first is bookkeeping, the second holds the notebook's *defaults*, which the profile
      overrode, so showing it would state values that did not run (they are in
      ``params/{profile}.yaml``, named at the top of every chapter);
    * every other code cell gets ``hide-input``: the reader sees the results, and the code
      behind a "Show code cell source" toggle. A cell tagged ``show-input`` (or already
      hidden/removed by its author) is left as it is.

    Idempotent. Returns whether ``nb`` changed.
    """
    changed = False
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        tags = list(cell.get("metadata", {}).get("tags", []))
        if INJECTED_TAG in tags or PARAMETERS_TAG in tags:
            new = ["remove-cell"]
        elif SHOW_INPUT_TAG in tags or _ALREADY_HIDDEN & set(tags):
            new = []
        else:
            new = ["hide-input"]
        new = [t for t in new if t not in tags]
        if new:
            cell.setdefault("metadata", {})["tags"] = tags + new
            changed = True
    return changed


def apply_book_tags(path: str | os.PathLike) -> bool:
    """:func:`book_tags` on the notebook file ``path``, rewritten (atomically) only if it changed."""
    import nbformat

    from stlib.utils import atomic_path

    nb = nbformat.read(str(path), as_version=4)
    if not book_tags(nb):
        return False
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))
    return True


def fingerprint(notebook: Path, params: dict[str, Any], upstream: str, code: str) -> str:
    """Fingerprint of one notebook run: its source, parameters, code and upstream runs."""
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(upstream.encode())
    h.update(code.encode())
    return h.hexdigest()


def notebook_names(root: Path | None = None) -> list[str]:
    """Notebook stems in execution order (those present in ``notebooks/``)."""
    root = root or repo_root()
    return [n for n in NOTEBOOK_PARAMS if (root / "notebooks" / f"{n}.ipynb").is_file()]


#: chapters that read nothing another chapter writes, as long as their own folders (these parameters)
#: lie apart from the profile's ``data_dir`` and ``run_dir``: the real-tissue chapter builds its cohort
#: from the shipped real subset (or a source of its own) in ``rt_data_dir`` and trains in ``rt_run_dir``.
#: A profile that points them into the study's folders (the realtissue profile) keeps it in the chain.
SELF_CONTAINED: dict[str, tuple[str, ...]] = {"07_real_tissue": ("rt_data_dir", "rt_run_dir")}


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents or a in b.parents


def notebook_needs(names: list[str], params: dict[str, dict[str, Any]], root: Path) -> dict[str, tuple[str, ...]]:
    """The notebooks each one waits for (and whose fingerprints are part of its own).

    A chapter needs the chapter before it in the chain (which needs the one before, and so on); a
    :data:`SELF_CONTAINED` chapter whose own folders lie apart from ``data_dir`` and ``run_dir``
    (neither inside the other) needs none and is not part of the chain.
    """
    def folder(v: Any) -> Path:
        return (root / str(v)).resolve()

    needs: dict[str, tuple[str, ...]] = {}
    prev: str | None = None
    for n in names:
        own = SELF_CONTAINED.get(n)
        p = params[n]
        if own and all(p.get(k) for k in (*own, "data_dir", "run_dir")) and not any(
                _inside(folder(p[k]), folder(p[d])) for k in own for d in ("data_dir", "run_dir")):
            needs[n] = ()
            continue
        needs[n] = (prev,) if prev else ()
        prev = n
    return needs


def default_jobs() -> int:
    """Notebooks run at once by default: 2 where the process may use 2 or more CPUs, else 1."""
    from stlib.utils import usable_cpus

    return 2 if usable_cpus() >= 2 else 1


def _failure(e: Any) -> dict[str, Any]:
    """What the run reports of a failing cell (:class:`papermill.PapermillExecutionError`), as plain data."""
    return {"cell_index": e.cell_index, "exec_count": e.exec_count, "ename": e.ename, "evalue": e.evalue}


def _execute_in_child(src: str, dst: str, params: dict[str, Any], cwd: str) -> dict[str, Any] | None:
    """:func:`execute_notebook` in a worker process; a failing cell comes back as a dict (papermill's
    exception does not survive pickling), any other error as a RuntimeError naming it."""
    import papermill as pm

    try:
        execute_notebook(src, dst, params, cwd)
        apply_book_tags(dst)
    except pm.PapermillExecutionError as e:
        return _failure(e)
    except Exception as e:  # noqa: BLE001 - re-raised in the parent with its type and message
        raise RuntimeError(f"{type(e).__name__}: {e}") from None
    return None


def run_profile(profile: str = "demo", *, only: list[str] | None = None, force: bool = False,
                build: bool = True, overrides: dict[str, Any] | None = None,
                root: str | os.PathLike | None = None, executed_dir: str | os.PathLike | None = None,
                params_dir: str | os.PathLike | None = None, jobs: int | None = None, log=print) -> RunReport:
    """Execute the notebooks of ``profile`` in order, then build the book.

    Parameters
    ----------
    profile
        ``demo``, ``workshop``, ``paper`` or a params YAML path.
    only
        Notebook stems to run (their order is kept); default all.
    force
        Re-run notebooks even when their fingerprint is unchanged.
    build
        Build the Jupyter Book afterwards.
    overrides
        Parameter values applied to every notebook (``-p key=value``).
    jobs
        Notebooks executed at once (default :func:`default_jobs`). With more than one, a chapter
        whose needs (:func:`notebook_needs`) are done starts in a worker process beside the others;
        ``1`` runs them one by one in this process. The executed notebooks are the same either way.
    """
    import papermill as pm

    root = Path(root) if root is not None else repo_root()
    out_dir = Path(executed_dir) if executed_dir is not None else root / "book" / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    state = read_json(state_path) if state_path.is_file() else {}
    report = RunReport(profile=str(profile))
    code = _code_fingerprint()
    _quiet_env()
    names = notebook_names(root)
    overrides = dict(overrides or {})
    known = {f.name for cls in NOTEBOOK_PARAMS.values() for f in fields(cls)}
    unknown_keys = sorted(set(overrides) - known)
    if unknown_keys:
        raise InputError(f"unknown parameter(s) {unknown_keys} in overrides",
                         fix=f"known parameters: {sorted(known)}")
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise StlibError(f"unknown notebook(s) {sorted(unknown)}; available: {names}")
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    params: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = {f.name for f in fields(NOTEBOOK_PARAMS[name])}
        params[name] = load_params(profile, name, overrides={k: v for k, v in overrides.items() if k in mine},
                                   params_dir=params_dir)
    needs = notebook_needs(names, params, root)
    fps: dict[str, str] = {}
    for name in names:  # a notebook's fingerprint holds those of the notebooks it needs (and theirs)
        fps[name] = fingerprint(root / "notebooks" / f"{name}.ipynb", params[name],
                                "".join(fps[u] for u in needs[name]), code)

    todo: list[str] = []
    for name in names:
        if only and name not in only:
            continue
        entry, dst = state.get(name, {}), out_dir / f"{name}.ipynb"
        if not force and entry.get("fingerprint") == fps[name] and entry.get("profile") == str(profile) \
                and dst.is_file():
            log(f"[stlib run] {name}: unchanged, skipped")
            apply_book_tags(dst)  # a copy executed before the book tags existed gets them too
            report.skipped.append(name)
            continue
        todo.append(name)

    def finish(name: str, t0: float, failure: dict[str, Any] | None) -> None:
        tmp, dst = out_dir / f".{name}.running.ipynb", out_dir / f"{name}.ipynb"
        if failure is not None:
            failed = out_dir / f"{name}.failed.ipynb"
            if tmp.exists():
                os.replace(tmp, failed)
            state.pop(name, None)
            write_json(state_path, state)
            cell = _source_cell_number(failed, failure["cell_index"])
            raise NotebookFailed(
                f"notebook {name} failed in cell {cell} of notebooks/{name}.ipynb (1-based, "
                f"execution count {failure['exec_count']}): {failure['ename']}: {failure['evalue']} -- the "
                f"executed copy with the traceback is {failed}")
        os.replace(tmp, dst)
        (out_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)
        report.seconds[name] = round(time.perf_counter() - t0, 1)
        report.executed.append(name)
        state[name] = {"fingerprint": fps[name], "profile": str(profile), "seconds": report.seconds[name]}
        write_json(state_path, state)
        log(f"[stlib run] {name}: done in {report.seconds[name]} s")

    if jobs == 1 or len(todo) < 2:
        for name in todo:
            log(f"[stlib run] {name}: executing ({profile})")
            tmp = out_dir / f".{name}.running.ipynb"
            t0 = time.perf_counter()
            failure = None
            try:
                execute_notebook(root / "notebooks" / f"{name}.ipynb", tmp, params[name], root)
                apply_book_tags(tmp)
            except pm.PapermillExecutionError as e:
                failure = _failure(e)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finish(name, t0, failure)
    else:
        _run_side_by_side(todo, needs, jobs, root, out_dir, params, profile, finish, log)
    report.executed.sort(key=names.index)
    if build:
        report.book = build_book(root)
        log(f"[stlib run] book: {report.book}")
    return report


def _run_side_by_side(todo: list[str], needs: dict[str, tuple[str, ...]], jobs: int, root: Path, out_dir: Path,
                      params: dict[str, dict[str, Any]], profile: str, finish: Any, log: Any) -> None:
    """Run ``todo`` in up to ``jobs`` worker processes, each notebook once the ones it needs are done
    (in the order of ``todo`` among those ready). The first failure stops new starts; notebooks
    already running finish (and are kept), then it is raised."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting = list(todo)
    running: dict[Any, tuple[str, float]] = {}
    error: BaseException | None = None
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
    try:
        while waiting or running:
            if error is None:
                for name in [n for n in waiting if not any(u in waiting or u in {v[0] for v in running.values()}
                                                           for u in needs[n])]:
                    if len(running) >= jobs:
                        break
                    others = ", ".join(v[0] for v in running.values())
                    log(f"[stlib run] {name}: executing ({profile})" + (f", beside {others}" if others else ""))
                    fut = pool.submit(_execute_in_child, str(root / "notebooks" / f"{name}.ipynb"),
                                      str(out_dir / f".{name}.running.ipynb"), params[name], str(root))
                    running[fut] = (name, time.perf_counter())
                    waiting.remove(name)
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name, t0 = running.pop(fut)
                try:
                    finish(name, t0, fut.result())
                except BaseException as e:  # noqa: BLE001 - the first one is raised once the others finish
                    (out_dir / f".{name}.running.ipynb").unlink(missing_ok=True)
                    if error is None:
                        error = e
                        if waiting:
                            log(f"[stlib run] {name} failed: not starting {', '.join(waiting)}")
                        waiting.clear()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for name in [v[0] for v in running.values()]:
            (out_dir / f".{name}.running.ipynb").unlink(missing_ok=True)
        raise
    pool.shutdown(wait=True)
    if error is not None:
        raise error


def _source_cell_number(executed: Path, cell_index: int) -> int:
    """1-based number of the failing cell in the *source* notebook (papermill injects a cell)."""
    import nbformat

    try:
        cells = nbformat.read(str(executed), as_version=4).cells
    except Exception:  # noqa: BLE001 - best effort, the raw index is still useful
        return cell_index + 1
    added = ("injected-parameters", "papermill-error-cell-tag")
    src = [c for c in cells if not any(t in c.get("metadata", {}).get("tags", []) for t in added)]
    # papermill's cell_index counts the executed notebook's cells before its error markers
    plain = [c for c in cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    if 0 <= cell_index < len(plain):
        target = plain[cell_index]
        for i, c in enumerate(src):
            if c is target:
                return i + 1
    return cell_index + 1


def build_book(root: str | os.PathLike | None = None, *, strict: bool = True) -> Path:
    """Build the Jupyter Book (notebooks are not re-executed: ``execute_notebooks: off``)."""
    root = Path(root) if root is not None else repo_root()
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(root), "--path-output", str(root)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise StlibError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    return root / "_build" / "html" / "index.html"


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise StlibError(f"-p expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def cli_main(argv: list[str]) -> int:
    """``stlib run --profile demo|workshop|paper [--only NB ...] [--force] [--no-build] [-p k=v] [--show-config]
    [--executed-dir DIR] [--jobs N]``."""
    ap = argparse.ArgumentParser(prog="stlib run", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", help="demo | workshop | paper | path to a params YAML")
    ap.add_argument("--only", nargs="+", help="run only these notebooks (stems, e.g. 02_labels)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks even if unchanged")
    ap.add_argument("--no-build", action="store_true", help="do not build the book")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter of every notebook (YAML value)")
    ap.add_argument("--show-config", action="store_true",
                    help="print the resolved config of every stage (YAML) and exit; runs nothing")
    ap.add_argument("--executed-dir", default=None,
                    help="folder of the executed notebooks (default book/executed; e.g. a run of its own that must "
                         "not replace the book's copies)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="notebooks executed at once (default: 2 with 2 or more CPUs, else 1); a self-contained "
                         "chapter (the real-tissue one) runs beside the chain of the others")
    args = ap.parse_args(argv)
    if args.show_config:
        from stlib.config import show_config

        print(show_config(args.profile), end="")
        return 0
    report = run_profile(args.profile, only=args.only, force=args.force, build=not args.no_build,
                         overrides=_parse_overrides(args.param), executed_dir=args.executed_dir, jobs=args.jobs)
    print(f"executed: {report.executed or '-'}; skipped: {report.skipped or '-'}")
    return 0


def read_glued(path: str | os.PathLike) -> dict[str, Any]:
    """Values a notebook glued with ``myst_nb.glue`` (their plain-text form, parsed when numeric)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            meta = (o.get("metadata") or {}).get("scrapbook")
            if not meta:
                continue
            data = o.get("data", {})
            text = next((v for k, v in data.items() if k.endswith("text/plain")), None)
            if text is None:
                continue
            text = "".join(text) if isinstance(text, list) else str(text)
            try:
                out[meta["name"]] = float(text.strip().strip("'\""))
            except ValueError:
                out[meta["name"]] = text.strip().strip("'\"")
    return out


def _batch_task(notebook: str, profile: str, overrides: dict[str, Any], out_path: str, root: str,
                params_dir: str | None) -> dict[str, Any]:
    """One batch job (runs on a Dask worker): execute a notebook, return its glued values."""
    import papermill as pm

    _quiet_env()
    params = load_params(profile, notebook, overrides=overrides, params_dir=params_dir)
    src = Path(root) / "notebooks" / f"{notebook}.ipynb"
    t0 = time.perf_counter()
    row: dict[str, Any] = {"notebook": notebook, **{f"param:{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                     for k, v in overrides.items()}}
    try:
        execute_notebook(src, out_path, params, root)
        row.update({"status": "ok", **read_glued(out_path)})
    except pm.PapermillExecutionError as e:
        row.update({"status": "failed", "error": f"cell {e.cell_index}: {e.ename}: {e.evalue}"})
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["executed"] = out_path
    return row


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a parameter grid ``{name: [values]}`` as a list of override dicts."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def run_batch(notebook: str, jobs: list[dict[str, Any]], *, profile: str = "demo",
              out_dir: str | os.PathLike = "runs/batch", scheduler: str | None = None,
              n_workers: int = 2, root: str | os.PathLike | None = None,
              params_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Run ``notebook`` once per job (parameter overrides) on dask.distributed; one row per job.

    Parameters
    ----------
    jobs
        Parameter overrides per run, e.g. ``[{"samples": ["A"]}, {"samples": ["B"]}]``. Each job
        runs with its own ``run_dir`` (``out_dir/{notebook}__NNN_run``) unless it sets one.
    scheduler
        Address of an existing Dask scheduler; default a ``LocalCluster`` of ``n_workers``
        single-threaded processes on this machine.

    Returns
    -------
    DataFrame with the overrides (``param:*``), ``status``, ``seconds``, ``executed`` and every
    value the notebook glued. The table is also written to ``out_dir/results.csv``.
    """
    from dask.distributed import Client, LocalCluster

    root = Path(root) if root is not None else repo_root()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:  # validate every job before starting anything
        load_params(profile, notebook, overrides=job, params_dir=params_dir)
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = []
        for i, job in enumerate(jobs):
            out_path = str((out / f"{notebook}__{i:03d}.ipynb").resolve())
            # every job writes into its own run folder: concurrent jobs never share a tile store
            job = {"run_dir": str((out / f"{notebook}__{i:03d}_run").resolve()), **job}
            futures.append(client.submit(_batch_task, notebook, profile, job, out_path, str(root),
                                         None if params_dir is None else str(params_dir), pure=False))
        rows = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    table = pd.DataFrame(rows)
    from stlib.utils import atomic_path

    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def batch_main(argv: list[str]) -> int:
    """``stlib batch NOTEBOOK --profile P (--samples ID ... | --grid key=v1,v2 ...) [--scheduler ADDR]``."""
    import yaml

    ap = argparse.ArgumentParser(prog="stlib batch",
                                 description="Run a notebook over samples or a parameter grid on dask.distributed.")
    ap.add_argument("notebook", help="notebook stem, e.g. 02_labels")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--samples", nargs="+", help="one run per sample id (sets `samples`)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="parameter grid; repeat for a cartesian product")
    ap.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a LocalCluster)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    ap.add_argument("--out", default="runs/batch", help="folder for executed notebooks and results.csv")
    args = ap.parse_args(argv)
    grid: dict[str, list[Any]] = {}
    for item in args.grid:
        if "=" not in item:
            raise StlibError(f"--grid expects key=v1,v2, got {item!r}")
        k, v = item.split("=", 1)
        grid[k] = [yaml.safe_load(x) for x in v.split(",")]
    if args.samples:
        grid["samples"] = [[s] for s in args.samples]
    if not grid:
        raise StlibError("stlib batch needs --samples or --grid")
    table = run_batch(args.notebook, expand_grid(grid), profile=args.profile, out_dir=args.out,
                      scheduler=args.scheduler, n_workers=args.workers)
    print(table.to_string(index=False))
    failed = int((table["status"] != "ok").sum())
    print(f"{len(table) - failed} ok, {failed} failed; table: {Path(args.out) / 'results.csv'}")
    return 1 if failed else 0


__all__ = ["run_profile", "build_book", "RunReport", "NotebookFailed", "notebook_names", "cli_main",
           "run_batch", "batch_main", "expand_grid", "read_glued", "execute_notebook", "kernel_config",
           "book_tags", "apply_book_tags", "cpu_thread_env"]
