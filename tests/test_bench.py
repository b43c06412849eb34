"""The benchmark commands run and write what the benchmark page shows (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json

from stlib import bench


def test_bench_refine_cli_writes_json(tmp_path):
    out = tmp_path / "refine.json"
    assert bench.cli_main(["refine", "--n-tiles", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "refine" and res["n_tiles"] == 3
    assert res["nuclei_per_tile"] > 5 and res["tiles_per_s"] > 0
    assert res["machine"]["cpu_count"] >= 1 and res["command"].startswith("stlib bench refine")


def test_bench_labels_small(tmp_path):
    out = tmp_path / "labels.json"
    assert bench.cli_main(["labels", "--nuclei", "300", "--baseline-nuclei", "20", "--tile-px", "256",
                           "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["nuclei_kept"] == 300 and res["instances_in_tiles"] >= 300 and res["speedup"] > 0


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    """`make gpu-check`'s script, in its CPU dry mode (tiny sizes): every part runs and is recorded."""
    from stlib.gpu_check import cli_main

    out = tmp_path / "gpu"
    assert cli_main(["--dry-run", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["device"] and summary["command"].startswith("stlib bench gpu-check")
    assert {"gpu_train_eager.json", "gpu_infer.json", "gpu_postproc.json"} <= set(summary["files"])
    assert summary["train"]["eager"]["train_tiles_per_s"] > 0
    assert summary["infer"]["net_ms_per_tile"] > 0 and summary["infer"]["postproc_ms_per_tile"] > 0
    kp = summary["postproc_keep_up"]
    assert kp["one_thread_tiles_per_s"] > 0 and kp["processes_tiles_per_s"] > 0
    assert isinstance(kp["keeps_up_with_processes"], bool)


def test_gpu_check_without_gpu_refuses_plainly(tmp_path, monkeypatch, capsys):
    import torch

    from stlib.gpu_check import cli_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.glob("gpu_*.json"))


def test_bench_derive_small_slide(tmp_path, capsys):
    """The whole-slide derivation benchmark on a tiny slide: every stage timed (wall and CPU, printed),
    references run."""
    out = tmp_path / "derive.json"
    assert bench.cli_main(["derive", "--work-dir", str(tmp_path / "work"), "--nuclei", "1500", "--side-mm", "0.6",
                           "--ref-tiles", "3", "--ref-crop-mm", "0.3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["nuclei"] > 1000 and res["seconds"] > 0
    assert set(res["stages"]) == {"alignment", "aligned_nuclei", "tile_store"}
    assert set(res["stages_cpu_s"]) == set(res["stages"]) and all(v > 0 for v in res["stages_cpu_s"].values())
    assert {"masks", "tile_images", "mask_refinement", "store_writing"} <= set(res["tile_stages_cpu_s"])
    printed = capsys.readouterr().out
    assert all(k in printed for k in res["stages"]) and "cpu s" in printed
    assert {"masks", "tile_images", "mask_refinement", "store_writing", "slide_decoding"} <= set(res["tile_stages_busy_s"])
    assert {"inputs", "haematoxylin_images", "tile_measurements"} <= set(res["alignment_stages"])
    assert res["references"]["tiles"]["identical_tiles"] == res["references"]["tiles"]["tiles"]
    assert res["alignment_check"]["median_error_um_aligned"] < res["alignment_check"]["median_error_um_initial"]
    assert res["tile_store"]["tiles"] > 0 and res["load_average_1_5_15min_before"]
    assert not (tmp_path / "work" / "run").exists()  # the tile store is removed unless --keep


def test_slide_sample_found_again_after_its_folder_moved(tmp_path):
    """The cached sample is reused from wherever its folder now is (no stale absolute paths)."""
    from stlib.bench_slide import make_slide_sample

    first = make_slide_sample(tmp_path / "a", n_nuclei=200, side_mm=0.25)
    (tmp_path / "a").rename(tmp_path / "b")
    again = make_slide_sample(tmp_path / "b", n_nuclei=200, side_mm=0.25)
    assert again["seconds"] == first["seconds"]  # not regenerated
    assert again["hest_dir"] == str(tmp_path / "b" / "hest")
    assert again["truth_dir"] == str(tmp_path / "b" / "truth")
    assert (tmp_path / "b" / "hest" / "wsis" / "BENCH_SLIDE.tif").is_file()
