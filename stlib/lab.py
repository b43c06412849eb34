"""JupyterLab on the notebooks of a profile: ``stlib lab --profile demo|workshop|paper`` (``make lab``).

The study's notebooks stay clean in ``notebooks/``. ``stlib lab`` writes a working copy of each
into the git-ignored workspace ``lab/{profile}/``, with its ``parameters`` cell filled with the
profile's values (``params/{profile}.yaml`` through :mod:`stlib.config`, exactly what
``stlib run`` would give papermill), so a workshop participant edits the parameters in the
notebook itself. A first cell moves the kernel to the repository root, where ``stlib run`` runs
its notebooks, so relative paths in the parameters mean the same in both.

JupyterLab then serves the repository on 127.0.0.1 without opening a browser. The access token
goes to the server through its environment (not the command line, which other users can see)
and is never printed: the server logs ``token=...``, and the way in is a file readable only by
the user (in Jupyter's runtime folder) that opens the workspace with the token. A workspace copy
the user edited is never overwritten; ``--reset`` rewrites it after moving the edited copy aside.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from stlib.config import NOTEBOOK_PARAMS, load_params, params_path
from stlib.utils import InputError, StlibError, atomic_path, read_json, repo_root, write_json

if TYPE_CHECKING:
    from nbformat import NotebookNode

#: the workspace folder under the repository root (git-ignored); one sub-folder per profile
WORKSPACE = "lab"
STATE_FILE = ".lab_state.json"
#: tag of the cell ``stlib lab`` adds in front of the parameters
LAB_TAG = "stlib-lab"


def profile_name(profile: str) -> str:
    """``demo`` -> ``demo``; a params YAML path -> its stem (the workspace sub-folder)."""
    p = Path(profile)
    return p.stem if p.suffix in (".yaml", ".yml") else str(profile)


def workspace_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """``{root}/lab/{profile}``: where ``stlib lab`` puts the working copies of a profile."""
    root = Path(root) if root is not None else repo_root()
    return root / WORKSPACE / profile_name(profile)


def parameters_source(params: dict[str, Any], profile: str, source: str = "") -> str:
    """Source of the filled ``parameters`` cell (papermill's own Python rendering of the values).

    ``source`` names the params file in the cell's comment (default ``params/{profile}.yaml``).
    """
    from papermill.translators import translate_parameters

    body = translate_parameters("python3", "python", params, comment="Parameters").split("\n", 1)[1]
    source = source or f"params/{profile_name(profile)}.yaml"
    head = (f"# Parameters of profile {profile_name(profile)!r} ({source}, validated by stlib.config).\n"
            "# Edit them here for this session; `stlib run -p key=value` or the params file make a "
            "change permanent.\n")
    return head + body.rstrip("\n")


def lab_notebook(nb: NotebookNode, params: dict[str, Any], profile: str, root: str | os.PathLike,
                 source: str = "") -> None:
    """Turn a study notebook (``nbformat`` node, changed in place) into its workspace copy.

    The ``parameters`` cell gets the profile's values; a cell in front of it moves the kernel to
    ``root``. A notebook without a ``parameters`` cell gets one at the top, as papermill does.
    """
    import nbformat

    cells = nb.cells
    idx = next((i for i, c in enumerate(cells)
                if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if idx is None:
        cell = nbformat.v4.new_code_cell("", id="stlib-lab-parameters")
        cell.metadata["tags"] = ["parameters"]
        cells.insert(0, cell)
        idx = 0
    cells[idx].source = parameters_source(params, profile, source)
    cells[idx].outputs = []
    cells[idx].execution_count = None
    chdir = nbformat.v4.new_code_cell(
        "# stlib lab: run from the repository root, as `stlib run` does, so that the relative paths\n"
        "# of the parameters (data_dir, run_dir, ...) resolve the same way.\n"
        f"import os\nos.chdir({str(Path(root).resolve())!r})", id="stlib-lab-chdir")
    chdir.metadata["tags"] = [LAB_TAG]
    cells.insert(idx, chdir)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Workspace:
    """What :func:`prepare_workspace` did."""

    folder: Path
    notebooks: list[Path] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    moved_aside: list[Path] = field(default_factory=list)


def prepare_workspace(profile: str = "demo", *, root: str | os.PathLike | None = None,
                      workspace: str | os.PathLike | None = None,
                      params_dir: str | os.PathLike | None = None,
                      overrides: dict[str, Any] | None = None, reset: bool = False,
                      log: Callable[[str], Any] = print) -> Workspace:
    """Write the parameterised working copies of the study's notebooks for ``profile``.

    Parameters
    ----------
    profile
        ``demo``, ``workshop``, ``paper`` or a params YAML path.
    root
        Repository root (notebooks under ``notebooks/``); default :func:`stlib.utils.repo_root`.
    workspace
        Target folder; default ``{root}/lab/{profile}``.
    overrides
        Parameter values that win over the profile (as ``stlib run -p``), applied to every
        notebook that has the parameter.
    reset
        Rewrite copies the user edited too; the edited copy is first renamed to
        ``NAME.edited-YYYYmmdd-HHMMSS.ipynb`` (nothing is lost).

    Returns
    -------
    Workspace
        The folder, the notebook paths in study order and what was written or kept.

    Notes
    -----
    A copy is rewritten when it is missing or when the user has not changed it since it was
    written (then it follows the notebook and the profile); an edited copy is kept and a note
    says when its notebook or parameters changed since.
    """
    import nbformat

    from stlib.run import notebook_names

    root = Path(root) if root is not None else repo_root()
    folder = Path(workspace) if workspace is not None else workspace_dir(profile, root)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    state = read_json(state_path) if state_path.is_file() else {}
    overrides = dict(overrides or {})
    out = Workspace(folder=folder)
    names = notebook_names(root)
    if not names:
        raise StlibError(f"no study notebooks found under {root / 'notebooks'}")
    known = {f.name for name in names for f in fields(NOTEBOOK_PARAMS[name])}
    if set(overrides) - known:
        raise InputError(f"unknown parameter(s) {sorted(set(overrides) - known)}",
                         fix=f"known parameters: {sorted(known)}")
    ppath = params_path(profile, params_dir)
    source = ppath.relative_to(root).as_posix() if ppath.is_relative_to(root) else str(ppath)
    for name in names:
        mine = {f.name for f in fields(NOTEBOOK_PARAMS[name])}
        params = load_params(profile, name, overrides={k: v for k, v in overrides.items() if k in mine},
                             params_dir=params_dir)
        src = root / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(str(src), as_version=4)
        lab_notebook(nb, params, profile, root, source)
        text = nbformat.writes(nb) + "\n"
        origin = _sha(src.read_bytes() + json.dumps(params, sort_keys=True).encode())
        dst = folder / f"{name}.ipynb"
        out.notebooks.append(dst)
        entry = state.get(name, {})
        if dst.is_file():
            current = _sha(dst.read_bytes())
            edited = current != entry.get("written")
            if edited and not reset:
                out.kept.append(name)
                if entry.get("origin") != origin:
                    log(f"[stlib lab] {dst.name}: kept your edited copy; notebooks/{name}.ipynb or its "
                        f"parameters changed since it was written (`stlib lab --reset` rewrites it and "
                        f"keeps yours as {name}.edited-*.ipynb)")
                continue
            if edited:
                aside = folder / f"{name}.edited-{time.strftime('%Y%m%d-%H%M%S')}.ipynb"
                os.replace(dst, aside)
                out.moved_aside.append(aside)
                log(f"[stlib lab] {dst.name}: your edited copy is now {aside.name}")
            elif current == _sha(text.encode()):
                continue  # up to date, untouched
        with atomic_path(dst) as tmp:
            tmp.write_text(text, encoding="utf-8")
        state[name] = {"origin": origin, "written": _sha(text.encode())}
        out.written.append(name)
    write_json(state_path, state)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    """A running JupyterLab started by :func:`start_lab`; :meth:`stop` ends it."""

    process: subprocess.Popen
    url: str  #: address of the workspace, without the token
    port: int
    open_file: Path  #: private HTML file that opens :attr:`url` with the token
    token: str = field(repr=False)

    def request(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 10.0) -> Any:
        """Call the server's REST API (``path`` like ``/api/contents/lab/demo``); returns parsed JSON."""
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - local server
            raw = r.read()
        return json.loads(raw) if raw else None

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the server down (SIGTERM: kernels are shut down too), kill it if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.open_file.unlink(missing_ok=True)

    def __enter__(self) -> LabServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _open_file_html(url: str) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"refresh\" content=\"0;url={url}\"></head>"
            f"<body><p><a href=\"{url}\">Open JupyterLab</a></p></body></html>\n")


def start_lab(folder: str | os.PathLike, *, root: str | os.PathLike | None = None, port: int | None = None,
              token: str | None = None, timeout: float = 120.0,
              stdout: IO | int | None = None) -> LabServer:
    """Start JupyterLab on 127.0.0.1 serving ``root``, opened at ``folder``; wait until it answers.

    Parameters
    ----------
    folder
        Folder inside ``root`` the lab opens at (the workspace of a profile).
    port
        TCP port; default a free one.
    token
        Access token; default ``$JUPYTER_TOKEN`` or a new random one. It reaches the server
        through the environment and is written only to the user-private :attr:`LabServer.open_file`.
    timeout
        Seconds to wait for the server to answer.
    stdout
        Where the server's log goes (a file, ``subprocess.DEVNULL``; default the terminal).
    """
    from jupyter_core.paths import jupyter_runtime_dir

    from stlib.run import kernel_config

    root = Path(root).resolve() if root is not None else repo_root()
    folder = Path(folder).resolve()
    try:
        rel = folder.relative_to(root).as_posix()
    except ValueError:
        raise StlibError(f"the workspace {folder} is not inside the served folder {root}") from None
    port = port or free_port()
    token = token or os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(32)
    env = {**os.environ, "JUPYTER_TOKEN": token}
    env.pop("JUPYTER_TOKEN_FILE", None)
    default_url = f"/lab/tree/{rel}"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={root}", f"--LabApp.default_url={default_url}"]
    if kernel_config().KernelManager.get("transport_encryption"):
        cmd.append("--KernelManager.transport_encryption=auto")  # see stlib.run.kernel_config
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")  # containers and CI run as root
    url = f"http://127.0.0.1:{port}{default_url}"
    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    open_file = runtime / f"stlib-lab-{port}-open.html"
    fd = os.open(open_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_open_file_html(f"{url}?token={token}"))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=True)  # Ctrl-C reaches stlib, which stops the server cleanly
    server = LabServer(process=proc, url=url, port=port, open_file=open_file, token=token)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            server.stop()
            raise StlibError(f"JupyterLab exited with status {proc.returncode} before answering on port {port} "
                             "(is the port taken? try --port)")
        try:
            server.request("/api/status", timeout=2.0)
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise StlibError(f"JupyterLab did not answer on 127.0.0.1:{port} within {timeout:.0f} s") from None
            time.sleep(0.25)


def cli_main(argv: list[str]) -> int:
    """``stlib lab --profile demo|workshop|paper [--port N] [--reset] [--no-start] [-p key=value]``."""
    from stlib.run import _parse_overrides

    ap = argparse.ArgumentParser(prog="stlib lab", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", help="demo | workshop | paper | path to a params YAML")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--reset", action="store_true",
                    help="rewrite edited working copies too (yours are renamed NAME.edited-*.ipynb)")
    ap.add_argument("--no-start", action="store_true", help="only write the working copies")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter in the working copies (YAML value)")
    args = ap.parse_args(argv)
    root = repo_root()
    ws = prepare_workspace(args.profile, root=root, overrides=_parse_overrides(args.param), reset=args.reset)
    rel = ws.folder.relative_to(root) if ws.folder.is_relative_to(root) else ws.folder
    print(f"[stlib lab] {rel}/: {len(ws.notebooks)} notebooks with the parameters of "
          f"{profile_name(args.profile)} ({len(ws.written)} written, {len(ws.kept)} of yours kept)", flush=True)
    if args.no_start:
        return 0
    server = start_lab(ws.folder, root=root, port=args.port or None)

    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        print(f"[stlib lab] JupyterLab: {server.url}\n"
              f"[stlib lab] to log in, open {server.open_file.as_uri()} in a browser on this machine\n"
              "[stlib lab] (it holds the access token, readable only by you; set JUPYTER_TOKEN to choose it)\n"
              "[stlib lab] Ctrl-C stops the server", flush=True)
        server.process.wait()
    except KeyboardInterrupt:
        print("\n[stlib lab] stopping JupyterLab", flush=True)
    finally:
        server.stop()
    return 0


__all__ = ["WORKSPACE", "Workspace", "LabServer", "prepare_workspace", "start_lab", "lab_notebook",
           "parameters_source", "workspace_dir", "profile_name", "free_port", "cli_main"]
