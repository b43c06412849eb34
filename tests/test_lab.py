"""`stlib lab` / `make lab`: parameterised working copies, and JupyterLab started headless."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import skip_or_fail

from stlib import lab
from stlib.utils import InputError

REPO = Path(__file__).resolve().parents[1]


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'demo'\nseed = 0\ndata_dir = ''\nrun_dir = ''\nsteps = 300")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    (root / "params").mkdir(parents=True)
    (root / "data_manifest.yaml").write_text("{}\n")
    (root / "params" / "demo.yaml").write_text(yaml.safe_dump({
        "common": {"profile": "demo", "seed": 7, "data_dir": "data/demo", "run_dir": "runs/demo"},
        "03_training": {"steps": 80}}))
    _notebook(root / "notebooks" / "00_data.ipynb", "open('marker.txt', 'w').write(f'{seed} {data_dir}')")
    _notebook(root / "notebooks" / "03_training.ipynb", "x = steps")
    return root


def _cells(path: Path):
    return nbformat.read(str(path), as_version=4).cells


def test_workspace_copies_carry_the_profile_parameters(study):
    ws = lab.prepare_workspace("demo", root=study, params_dir=study / "params", log=lambda *_: None)
    assert ws.folder == study / "lab" / "demo"
    assert [p.name for p in ws.notebooks] == ["00_data.ipynb", "03_training.ipynb"]
    cells = _cells(ws.folder / "03_training.ipynb")
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    assert "steps = 80" in params.source and "seed = 7" in params.source  # profile, not notebook defaults
    assert "steps = 300" not in params.source
    chdir = cells[cells.index(params) - 1]
    assert chdir.metadata["tags"] == [lab.LAB_TAG] and str(study.resolve()) in chdir.source
    # the committed notebook is untouched
    assert "steps = 300" in _cells(study / "notebooks" / "03_training.ipynb")[1].source
    # overrides as in `stlib run -p`, checked against the schema
    lab.prepare_workspace("demo", root=study, params_dir=study / "params", overrides={"steps": 5},
                          log=lambda *_: None)
    assert "steps = 5" in _cells(ws.folder / "03_training.ipynb")[2].source
    with pytest.raises(InputError, match="stepz"):
        lab.prepare_workspace("demo", root=study, params_dir=study / "params", overrides={"stepz": 5})


def test_workspace_copy_runs_from_the_repository_root(study):
    """Run in its own folder (as JupyterLab does), the copy still sees the paths `stlib run` sees."""
    from nbclient import NotebookClient

    ws = lab.prepare_workspace("demo", root=study, params_dir=study / "params", log=lambda *_: None)
    nb = nbformat.read(str(ws.folder / "00_data.ipynb"), as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(ws.folder)}}).execute()
    assert (study / "marker.txt").read_text() == "7 data/demo"


def test_edited_copies_are_kept_and_reset_moves_them_aside(study):
    quiet = dict(root=study, params_dir=study / "params")
    notes: list[str] = []
    ws = lab.prepare_workspace("demo", log=notes.append, **quiet)
    again = lab.prepare_workspace("demo", log=notes.append, **quiet)
    assert again.written == [] and notes == []  # unchanged copies are not rewritten
    mine = ws.folder / "03_training.ipynb"
    nb = nbformat.read(str(mine), as_version=4)
    nb.cells[2].source = nb.cells[2].source.replace("steps = 80", "steps = 12")
    nbformat.write(nb, str(mine))
    edited = mine.read_text()
    rep = lab.prepare_workspace("demo", overrides={"seed": 1}, log=notes.append, **quiet)
    assert rep.kept == ["03_training"] and mine.read_text() == edited
    assert any("03_training.ipynb: kept your edited copy" in n for n in notes)
    rep = lab.prepare_workspace("demo", reset=True, log=notes.append, **quiet)
    assert "03_training" in rep.written and "steps = 80" in mine.read_text()
    assert len(rep.moved_aside) == 1 and rep.moved_aside[0].read_text() == edited


def test_workspace_is_git_ignored_and_not_in_the_book():
    assert "/lab/" in (REPO / ".gitignore").read_text().splitlines()
    assert "lab" in yaml.safe_load((REPO / "_config.yml").read_text())["exclude_patterns"]


def _execute_over_websocket(server: lab.LabServer, kernel_id: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a lab kernel through the server's websocket, as the browser does; its stdout."""
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels",
                                     header=[f"Authorization: token {server.token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        # done = the shell reply and the iopub "idle" that follows every output (either may come first)
        out, seen, deadline = [], set(), time.monotonic() + timeout
        while time.monotonic() < deadline and seen != {"reply", "idle"}:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            elif kind == "execute_reply":
                seen.add("reply")
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                seen.add("idle")
        assert seen == {"reply", "idle"}, f"the lab kernel did not finish in {timeout} s"
        return "".join(out)
    finally:
        ws.close()


def test_lab_starts_headless_lists_the_notebooks_and_stops(study, tmp_path, monkeypatch):
    """What `make lab` does, headless: the server answers on 127.0.0.1, lists the workspace
    notebooks, runs a kernel in the workspace copy, keeps the token out of its log, and stops."""
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "jupyter" / sub))
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    ws = lab.prepare_workspace("demo", root=study, params_dir=study / "params", log=lambda *_: None)
    log_path = tmp_path / "lab.log"
    with open(log_path, "w") as log:
        server = lab.start_lab(ws.folder, root=study, port=lab.free_port(), timeout=120, stdout=log)
        try:
            assert server.url == f"http://127.0.0.1:{server.port}/lab/tree/lab/demo"
            listing = server.request("/api/contents/lab/demo")
            assert sorted(c["name"] for c in listing["content"]) == ["00_data.ipynb", "03_training.ipynb"]
            # the token is required, lives only in a user-private file, and is never printed
            import urllib.error
            import urllib.request

            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/contents/lab/demo", timeout=10)
            assert server.open_file.stat().st_mode & 0o077 == 0
            assert server.token in server.open_file.read_text()
            # a kernel of the lab runs the workspace copy's first cells like `stlib run` would
            kernel = server.request("/api/kernels", method="POST",
                                    body={"name": "python3", "path": "lab/demo/03_training.ipynb"})
            cells = _cells(ws.folder / "03_training.ipynb")
            code = "\n".join(c.source for c in cells if c.cell_type == "code"
                             and set(c.metadata.get("tags", [])) & {lab.LAB_TAG, "parameters"})
            out = _execute_over_websocket(server, kernel["id"], code + "\nimport os; print(os.getcwd(), steps)")
            assert out.split() == [str(study.resolve()), "80"]
        finally:
            server.stop()
    assert server.process.returncode is not None and not server.open_file.exists()
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    text = log_path.read_text()
    assert "Jupyter Server" in text and "127.0.0.1" in text
    assert server.token not in text
    assert "without encryption" not in text  # lab kernels use CurveZMQ too (stlib.run.kernel_config)


def test_stlib_lab_command_serves_the_workspace_and_stops_on_sigterm(study, tmp_path):
    """`make lab` runs `stlib lab --profile P`: the same, through the console script."""
    import os
    import signal
    import urllib.request

    exe = Path(sys.executable).parent / "stlib"
    if not exe.exists():
        skip_or_fail("the stlib console script is not installed in this environment")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    env.pop("JUPYTER_TOKEN", None)
    port = lab.free_port()
    proc = subprocess.Popen([str(exe), "lab", "--profile", "demo", "--port", str(port)], cwd=study, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        out = "".join(lines)
        assert f"JupyterLab: http://127.0.0.1:{port}/lab/tree/lab/demo" in out, out
        open_file = Path(out.split("open file://", 1)[1].split()[0])
        token = open_file.read_text().split("token=", 1)[1].split('"', 1)[0]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/lab/demo",
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            names = sorted(c["name"] for c in json.loads(r.read())["content"])
        assert names == ["00_data.ipynb", "03_training.ipynb"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert token not in out + rest
    assert not open_file.exists()
    with pytest.raises(OSError):  # the server went with the command
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
