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
    assert "IPKernelApp" not in out + err and "without encryption" not in out + err, err[-2000:]
