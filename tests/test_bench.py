"""The benchmark commands run and write what the benchmark page shows (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_label_agreement_counts_true_nuclei_by_their_st_label():
    from stlib.bench import label_agreement

    truth = np.zeros((20, 30), np.int32)
    truth[2:6, 2:6] = 5   # covered by an ST nucleus
    truth[2:6, 12:16] = 9  # ignored in the ST maps
    truth[2:6, 22:26] = 2  # background in the ST maps (missed)
    truth[12:16, 2:6] = 7  # ignored in the truth itself: not counted
    t_ign = (truth == 7).astype(np.uint8)
    inst = np.zeros_like(truth)
    inst[2:6, 2:5] = 1  # 3 of 4 columns
    ign = np.zeros_like(truth, np.uint8)
    ign[1:7, 11:17] = 1  # the second nucleus and a rim of 20 background pixels
    c = label_agreement(inst, ign, truth, t_ign)
    assert (c["matched"], c["ignored"], c["background"]) == (1, 1, 1)
    assert c["nucleus_px"] == 48 and c["nucleus_px_bg"] == 4 + 16
    assert c["bg_px"] == 600 - 64 and c["bg_px_ignored"] == 20


def test_unmatched_label_quality_on_small_stores(tmp_path):
    """Two 128-px tiles, one nucleus of three missed by the ST layer: off it is background, on ignored."""
    from test_refine import _unmatched_tile

    from stlib.config import RefineConfig
    from stlib.io.tiles import TileStoreWriter
    from stlib.utils import InputError

    true, img, st = _unmatched_tile()
    paths = {}
    for name, inst in (("st", st), ("truth", true)):
        w = TileStoreWriter(tmp_path / name, tile_px=128, um_per_px=0.25, source=name)
        for k in range(2):
            w.add(image=img, inst=inst, sample="S1", organ="Breast", x0=128.0 * k, y0=0.0,
                  type=(inst > 0).astype(np.uint8) * 2)
        paths[name] = w.close(extra={"refinement": None})
    configs = {"off": RefineConfig(), "on": RefineConfig(unmatched_ignore=True)}
    rows, timing = bench.unmatched_label_quality(paths["st"], paths["truth"], configs, repeats=1)
    off, on = rows
    assert (off["config"], on["config"]) == ("off", "on") and off["n_true"] == on["n_true"] == 6  # 3 per tile
    assert off["background"] == pytest.approx(1 / 3, abs=1e-4) and on["background"] == 0
    assert on["ignored"] == pytest.approx(1 / 3, abs=1e-4) and on["matched"] == off["matched"]
    assert on["n_blobs"] == 2 and on["blob_precision"] == 1.0 and off["n_blobs"] == 0
    assert on["true_bg_px_ignored"] < 0.02 and off["true_bg_px_ignored"] == 0
    assert timing["tiles"] == 2 and timing["cpu_ms_per_tile_on"] > 0
    refined = tmp_path / "refined"
    w = TileStoreWriter(refined, tile_px=128, um_per_px=0.25, source="st")
    for k in range(2):
        w.add(image=img, inst=st, sample="S1", organ="Breast", x0=128.0 * k, y0=0.0)
    w.close(extra={"refinement": {"per_sample": {}}})
    with pytest.raises(InputError, match="already refined"):
        bench.unmatched_label_quality(refined, paths["truth"], configs)
