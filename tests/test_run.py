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
