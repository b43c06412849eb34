"""The public annotated sets of data_manifest.yaml (MoNuSeg, CoNSeP) fetched into
``{data_dir}/annotations/`` from a local mirror (``../shared/realdata``, network never used), and
read from there as the held-out organs' manual truth (issue 11 item 2)."""

from __future__ import annotations

import shutil

import pytest

from stlib.utils import InputError


def test_download_annotated_sets_from_a_mirror_root(realdata, tmp_path, monkeypatch):
    from stlib.io import download
    from stlib.io.annotations import detect_layout
    from stlib.io.manifest import load_manifest

    def no_network(*a, **k):  # the mirror must be enough
        raise AssertionError("network used")

    monkeypatch.setattr(download, "download_file", no_network)
    listed = [n for n in load_manifest().annotated_he if n in download.ANNOTATED_SETS]
    assert listed == ["monuseg", "consep"]
    got = download.download_annotated_sets(tmp_path / "annotations", mirror=realdata)
    assert list(got) == listed
    mon = {p.stem for p in (tmp_path / "annotations" / "monuseg" / "images").glob("*.tif")}
    assert mon == {f["name"] for f in load_manifest().annotated_he["monuseg"]["files"]}
    assert detect_layout(got["monuseg"]) == "monuseg" and detect_layout(got["consep"]) == "consep_patches"
    n_consep = len(list((realdata / "nuclei-consep" / "images").iterdir()))
    assert len(list((got["consep"] / "images").iterdir())) == n_consep
    # a second call finds everything in place (checksummed) and changes nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "annotations").rglob("*") if p.is_file() and p.name != "SOURCE.md"}
    download.download_annotated_sets(tmp_path / "annotations", names=["monuseg"], mirror=realdata)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_fetched_sets_are_manual_truth_of_the_heldout_organs(realdata, tmp_path):
    """What notebook 04 does with the folder: the held-out organs' images of both sets."""
    from stlib.evaluate import manual_truth_folder, restrict_reference
    from stlib.io.download import download_annotated
    from stlib.io.manifest import load_manifest

    man = load_manifest()
    out = tmp_path / "annotations"
    download_annotated("monuseg", out / "monuseg", mirror=realdata)
    kidney = [f["name"] for f in man.annotated_he["monuseg"]["files"] if f["organ"] == "Kidney"]
    ref = restrict_reference(manual_truth_folder(out / "monuseg", organ_of=man.organ_of_pannuke_tissue()),
                             ["Kidney", "Bowel", "Liver", "Skin"])
    assert kidney and set(kidney) <= {n.split("/")[-1] for n in ref.meta["image"]}
    assert set(ref.meta["organ"]) <= {"Kidney", "Bowel", "Liver", "Skin"}
    assert ref.kind == "manual" and ref.domain == "routine H&E"


def test_cli_download_with_a_mirror_root(realdata, tmp_path, capsys):
    from stlib.cli import main

    name = "TCGA-B0-5710-01Z-00-DX1"
    rc = main(["download", "monuseg", "--out", str(tmp_path / "m"), "--mirror", str(realdata), "--names", name])
    assert rc == 0
    assert (tmp_path / "m" / "images" / f"{name}.tif").is_file()
    assert (tmp_path / "m" / "annotations" / f"{name}.xml").is_file()
    assert str(tmp_path / "m") in capsys.readouterr().out


def test_annotated_mirror_errors_name_the_folder(tmp_path):
    from stlib.io.download import annotated_mirror, download_annotated

    with pytest.raises(InputError, match="unknown annotated set"):
        download_annotated("lizard", tmp_path / "x", mirror=tmp_path)
    with pytest.raises(InputError, match="mirror folder not found") as e:
        annotated_mirror(tmp_path / "nowhere", "monuseg")
    assert "nowhere" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a CoNSeP copy"):
        download_annotated("consep", tmp_path / "c", mirror=empty)


def test_consep_archive_layout_is_read_split_by_split(realdata, tmp_path):
    """`stlib download consep` without a mirror unpacks CoNSeP/Train|Test/Images|Labels: the
    evaluation reads that folder too (built here from the patch export's own files)."""
    import numpy as np
    from scipy.io import savemat

    from stlib.io.annotations import detect_layout, read_annotations, read_consep_patches

    src = read_consep_patches(realdata / "nuclei-consep", images=["train_5"])[0]
    for split, stem in (("Train", "train_1"), ("Test", "test_1")):
        d = tmp_path / "consep" / "CoNSeP" / split
        (d / "Images").mkdir(parents=True)
        (d / "Labels").mkdir()
        from PIL import Image

        Image.fromarray(src.image).save(d / "Images" / f"{stem}.png")
        savemat(d / "Labels" / f"{stem}.mat", {"inst_map": src.inst.astype(np.int32),
                                                "inst_type": np.ones((int(src.inst.max()), 1), np.int32)})
    assert detect_layout(tmp_path / "consep") == "consep_archive"
    got = read_annotations(tmp_path / "consep")
    assert [a.name for a in got] == ["train_1", "test_1"]
    assert all(a.organ == "Bowel" and a.inst.max() == src.inst.max() for a in got)
    shutil.rmtree(tmp_path / "consep")
