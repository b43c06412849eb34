"""The papermill runner: order, skip-if-unchanged, failures named, batch on a LocalCluster."""

import nbformat
import pytest
import yaml

from stlib import run as strun


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'demo'\nseed = 0\ndata_dir = ''\nrun_dir = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


@pytest.fixture
def study(tmp_path, monkeypatch):
    # the library's own source is part of the fingerprint; pin it so the test sees only its inputs
    monkeypatch.setattr(strun, "_code_fingerprint", lambda: "code-v1")
    root = tmp_path / "study"
    (root / "params").mkdir(parents=True)
    (root / "params" / "demo.yaml").write_text(yaml.safe_dump({
        "common": {"profile": "demo", "data_dir": str(tmp_path / "d"), "run_dir": str(tmp_path / "r")}}))
    _notebook(root / "notebooks" / "00_data.ipynb",
              "from myst_nb import glue\nglue('twice_seed', 2 * seed)\nopen('marker.txt', 'a').write('x')")
    _notebook(root / "notebooks" / "01_alignment.ipynb", "x = 1")
    return root


def test_run_profile_executes_in_order_then_skips_unchanged(study):
    rep = strun.run_profile("demo", root=study, params_dir=study / "params", build=False, log=lambda *_: None)
    assert rep.executed == ["00_data", "01_alignment"]
    exe = study / "book" / "executed"
    assert strun.read_glued(exe / "00_data.ipynb") == {"twice_seed": 0.0}
    assert (study / "marker.txt").read_text() == "x"  # notebooks run with the repo root as cwd
    rep2 = strun.run_profile("demo", root=study, params_dir=study / "params", build=False, log=lambda *_: None)
    assert rep2.executed == [] and rep2.skipped == ["00_data", "01_alignment"]
    # a parameter change re-runs that notebook and everything downstream
    rep3 = strun.run_profile("demo", root=study, params_dir=study / "params", build=False,
                             overrides={"seed": 3}, log=lambda *_: None)
    assert rep3.executed == ["00_data", "01_alignment"]
    assert strun.read_glued(exe / "00_data.ipynb") == {"twice_seed": 6.0}


def test_failing_notebook_names_cell_and_error_and_stops(study):
    _notebook(study / "notebooks" / "00_data.ipynb", "raise ValueError('bad tile size 7')")
    with pytest.raises(strun.NotebookFailed, match=r"00_data failed in cell 2 of notebooks/00_data.ipynb .*ValueError: bad tile size 7"):
        strun.run_profile("demo", root=study, params_dir=study / "params", build=False, log=lambda *_: None)
    exe = study / "book" / "executed"
    assert (exe / "00_data.failed.ipynb").is_file()
    assert not (exe / "00_data.ipynb").exists()
    assert not (exe / "01_alignment.ipynb").exists()  # the run stopped


def test_unknown_parameter_is_rejected_before_running(study):
    from stlib.utils import InputError

    with pytest.raises(InputError, match="unknown parameter.*sead"):
        strun.run_profile("demo", root=study, params_dir=study / "params", build=False,
                          overrides={"sead": 1}, log=lambda *_: None)


def test_batch_on_local_cluster_of_two_workers(study, tmp_path):
    table = strun.run_batch("00_data", strun.expand_grid({"seed": [1, 2, 5]}), profile="demo",
                            out_dir=tmp_path / "batch", n_workers=2, root=study, params_dir=study / "params")
    assert list(table["status"]) == ["ok", "ok", "ok"]
    assert sorted(table["twice_seed"]) == [2.0, 4.0, 10.0]
    assert (tmp_path / "batch" / "results.csv").is_file()


def test_expand_grid():
    assert strun.expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_executed_notebooks_are_tagged_for_the_book(study):
    strun.run_profile("demo", root=study, params_dir=study / "params", build=False, log=lambda *_: None)
    nb = nbformat.read(str(study / "book" / "executed" / "00_data.ipynb"), as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    # papermill's injected cell and the defaults cell are removed from the book, the code is hidden
    assert any("injected-parameters" in t and "remove-cell" in t for t in tags)
    assert any("parameters" in t and "remove-cell" in t for t in tags)
    body = [c for c in nb.cells if "glue" in c.source]
    assert body and "hide-input" in body[0].metadata["tags"] and "remove-cell" not in body[0].metadata["tags"]
    # the committed notebook stays clean
    src = nbformat.read(str(study / "notebooks" / "00_data.ipynb"), as_version=4)
    assert [c.metadata.get("tags", []) for c in src.cells] == [["parameters"], []]


def test_book_tags_respect_the_author_and_are_idempotent():
    nb = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_code_cell("a = 1"), nbformat.v4.new_code_cell("b = 2"),
             nbformat.v4.new_code_cell("c = 3"), nbformat.v4.new_code_cell("d = 4"),
             nbformat.v4.new_markdown_cell("text")]
    cells[0].metadata["tags"] = ["injected-parameters"]
    cells[1].metadata["tags"] = ["show-input"]
    cells[2].metadata["tags"] = ["remove-input"]
    nb.cells = cells
    assert strun.book_tags(nb) is True
    assert [c.metadata.get("tags") for c in nb.cells] == [
        ["injected-parameters", "remove-cell"], ["show-input"], ["remove-input"], ["hide-input"], None]
    assert strun.book_tags(nb) is False


def test_notebook_kernels_print_no_transport_warning(study, capfd):
    """`make book` output: no per-notebook "[IPKernelApp] WARNING | Kernel is running over TCP ..."."""
    strun.run_profile("demo", root=study, params_dir=study / "params", build=False, log=lambda *_: None)
    out, err = capfd.readouterr()
    # the transport warning itself; jupyter_client interrupts every kernel at shutdown, and a kernel that is
    # not yet idle then logs "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel" (a race of its own)
    assert "[IPKernelApp] WARNING" not in out + err and "without encryption" not in out + err, err[-2000:]


def _rt_params(tmp_path, **kw):
    p = {"data_dir": str(tmp_path / "d"), "run_dir": str(tmp_path / "r"), "rt_data_dir": str(tmp_path / "rtd"),
         "rt_run_dir": str(tmp_path / "rtr")}
    p.update(kw)
    return p


def test_needs_put_the_real_tissue_chapter_beside_the_chain_only_when_its_folders_lie_apart(tmp_path):
    names = ["00_data", "01_alignment", "07_real_tissue"]
    apart = {n: _rt_params(tmp_path) for n in names}
    assert strun.notebook_needs(names, apart, tmp_path) == {
        "00_data": (), "01_alignment": ("00_data",), "07_real_tissue": ()}
    # the realtissue profile: the chapter's cohort is the study's own -> it waits for the chain
    shared = {n: _rt_params(tmp_path, rt_data_dir=str(tmp_path / "d")) for n in names}
    assert strun.notebook_needs(names, shared, tmp_path)["07_real_tissue"] == ("01_alignment",)
    nested = {n: _rt_params(tmp_path, rt_run_dir=str(tmp_path / "r" / "realtissue")) for n in names}
    assert strun.notebook_needs(names, nested, tmp_path)["07_real_tissue"] == ("01_alignment",)
    # a self-contained chapter in the middle does not break the chain after it
    mid = ["00_data", "07_real_tissue", "01_alignment"]
    assert strun.notebook_needs(mid, apart, tmp_path)["01_alignment"] == ("00_data",)


def _rendezvous(me, other):
    """Notebook body that only finishes when the other notebook runs at the same time."""
    return (f"import pathlib, time\npathlib.Path({me!r}).write_text('here')\nt = time.time()\n"
            f"while not pathlib.Path({other!r}).exists():\n"
            f"    assert time.time() - t < 120, 'the other notebook did not run beside this one'\n"
            f"    time.sleep(0.2)\n")


def _with_real_tissue_chapter(study, tmp_path, body):
    (study / "params" / "demo.yaml").write_text(yaml.safe_dump({
        "common": {"profile": "demo", "data_dir": str(tmp_path / "d"), "run_dir": str(tmp_path / "r")},
        "07_real_tissue": {"rt_data_dir": str(tmp_path / "rtd"), "rt_run_dir": str(tmp_path / "rtr")}}))
    _notebook(study / "notebooks" / "07_real_tissue.ipynb", body)


def test_the_self_contained_chapter_runs_beside_the_chain_with_two_jobs(study, tmp_path):
    a, b = str(tmp_path / "chain.here"), str(tmp_path / "rt.here")
    _notebook(study / "notebooks" / "01_alignment.ipynb", _rendezvous(a, b))
    _with_real_tissue_chapter(study, tmp_path, _rendezvous(b, a))
    logs = []
    rep = strun.run_profile("demo", root=study, params_dir=study / "params", build=False, jobs=2, log=logs.append)
    assert rep.executed == ["00_data", "01_alignment", "07_real_tissue"]  # notebook order, whatever finished first
    assert any("beside" in line for line in logs), logs
    state = strun.read_json(study / "book" / "executed" / strun.STATE_FILE)
    assert set(state) == {"00_data", "01_alignment", "07_real_tissue"}
    # unchanged -> all skipped; a change upstream of the chain does not re-run the self-contained chapter
    _notebook(study / "notebooks" / "00_data.ipynb", "y = 2")
    _notebook(study / "notebooks" / "01_alignment.ipynb", "x = 1")
    rep2 = strun.run_profile("demo", root=study, params_dir=study / "params", build=False, jobs=2,
                             log=lambda *_: None)
    assert rep2.executed == ["00_data", "01_alignment"] and rep2.skipped == ["07_real_tissue"]


def test_a_failure_beside_a_running_chapter_keeps_its_result_and_stops_the_chain(study, tmp_path):
    # 00 finishes only once the runner has recorded 07's failure (its .failed copy), so 01 could only
    # start if a failure did not stop new starts
    failed = study / "book" / "executed" / "07_real_tissue.failed.ipynb"
    _notebook(study / "notebooks" / "00_data.ipynb",
              f"import pathlib, time\nt = time.time()\nwhile not pathlib.Path({str(failed)!r}).exists()"
              f" and time.time() - t < 120:\n    time.sleep(0.2)\n")
    _with_real_tissue_chapter(study, tmp_path, "raise ValueError('no annotated images')")
    with pytest.raises(strun.NotebookFailed, match=r"07_real_tissue failed in cell 2 .*ValueError: no annotated"):
        strun.run_profile("demo", root=study, params_dir=study / "params", build=False, jobs=2, log=lambda *_: None)
    exe = study / "book" / "executed"
    assert (exe / "00_data.ipynb").is_file()  # it was running: it finished and is kept
    assert (exe / "07_real_tissue.failed.ipynb").is_file()
    assert not (exe / "01_alignment.ipynb").exists()  # not started after the failure
    assert not list(exe.glob(".*.running.ipynb"))


def test_one_job_and_two_jobs_give_the_same_notebooks(study, tmp_path):
    _with_real_tissue_chapter(study, tmp_path, "from myst_nb import glue\nglue('rt_seed', seed + 1)")
    out = {}
    for jobs in (1, 2):
        exe = tmp_path / f"exe{jobs}"
        rep = strun.run_profile("demo", root=study, params_dir=study / "params", build=False, jobs=jobs,
                                executed_dir=exe, log=lambda *_: None)
        assert rep.executed == ["00_data", "01_alignment", "07_real_tissue"]
        out[jobs] = {n: strun.read_glued(exe / f"{n}.ipynb") for n in rep.executed}
        fps = strun.read_json(exe / strun.STATE_FILE)
        out[jobs]["fp"] = {n: fps[n]["fingerprint"] for n in fps}
    assert out[1] == out[2] and out[1]["07_real_tissue"] == {"rt_seed": 1.0}
