"""Tests of stlib.io.manifest and of the shipped data_manifest.yaml."""

from __future__ import annotations

import pytest
import yaml

from stlib.io.manifest import HELD_OUT_ORGANS, KNOWN_ORGANS, TRAIN_ORGANS, load_manifest
from stlib.utils import InputError


def test_shipped_manifest(repo):
    m = load_manifest(repo / "data_manifest.yaml")
    assert len(m.samples) == 59 and m.samples["id"].is_unique
    assert set(m.samples["organ"]) == set(KNOWN_ORGANS) and len(KNOWN_ORGANS) == 13
    assert m.organs("held-out") == sorted(HELD_OUT_ORGANS) == ["Bowel", "Kidney", "Liver", "Skin"]
    assert m.organs("train") == sorted(TRAIN_ORGANS) and len(TRAIN_ORGANS) == 9
    assert len(m.train_ids()) + len(m.heldout_ids()) == 59
    assert not set(m.train_ids()) & set(m.heldout_ids())
    assert (m.samples["pixel_size_um"] > 0).all()
    assert m.sample("TENX95")["organ"] == "Breast"
    assert m.pannuke_folds() == [1, 2, 3]
    assert m.pannuke["licence"] == "CC BY-NC-SA 4.0" and m.pannuke["n_tissues"] == 19
    assert all(f["sha256"] is None for f in m.pannuke["folds"])  # unknown, said so in the note
    assert m.hest["repo"] == "MahmoodLab/hest" and m.hest["version"] == "v1.1.0"
    assert m.demo["generator"] == "stlib.demo" and m.demo["seed"] == 0
    assert m.demo_organs("train") == ["Breast", "Lung", "Pancreas", "Prostate"]
    assert m.demo_organs("held-out") == ["Bowel", "Skin"]


def _write(tmp_path, samples, **extra):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"samples": samples, **extra}))
    return p


def _s(i="S1", organ="Lung", role="train", px=0.27):
    return {"id": i, "organ": organ, "role": role, "pixel_size_um": px}


def test_unknown_organ_names_file_sample_fix(tmp_path):
    p = _write(tmp_path, [_s(), _s("S2", organ="Spleen")])
    with pytest.raises(InputError) as ei:
        load_manifest(p)
    msg = str(ei.value)
    assert "m.yaml" in msg and "S2" in msg and "Spleen" in msg and "->" in msg


@pytest.mark.parametrize("samples,match", [
    ([_s(), _s("S2", role="test")], "role"),
    ([_s(), _s("S1")], "duplicate"),
    ([_s(), _s("S2", organ="Lung", role="held-out")], "both train and held-out"),
    ([_s(px=0)], "positive"),
    ([_s(px="abc")], "positive"),
    ([{"id": "S1", "organ": "Lung", "role": "train"}], "missing"),
    ([{**_s(), "colour": "red"}], "unknown field"),
    ([], "non-empty"),
])
def test_validation_errors(tmp_path, samples, match):
    with pytest.raises(InputError, match=match):
        load_manifest(_write(tmp_path, samples))


def test_demo_block_validated(tmp_path):
    p = _write(tmp_path, [_s()], demo={"organs": {"train": ["Lung"], "held-out": ["Lung"]}})
    with pytest.raises(InputError, match="demo organ"):
        load_manifest(p)
    p = _write(tmp_path, [_s()], demo={"organs": {"train": ["Atlantis"]}})
    with pytest.raises(InputError, match="Atlantis"):
        load_manifest(p)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_manifest(tmp_path / "none.yaml")
    (tmp_path / "b.yaml").write_text("samples: [unclosed")
    with pytest.raises(InputError, match="YAML"):
        load_manifest(tmp_path / "b.yaml")
