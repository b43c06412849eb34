"""stlib.utils.cache_key: the one cache key of the stages (config + input-file fingerprints)."""

from __future__ import annotations

import os

from stlib.utils import cache_key, file_fingerprint


def test_key_follows_config_and_inputs(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"1234")
    b.write_bytes(b"xy")
    k = cache_key({"tile_um": 100.0, "refine": True}, [a, b])
    assert k == cache_key({"refine": True, "tile_um": 100.0}, [a, b])  # key order of the config is irrelevant
    assert k != cache_key({"tile_um": 50.0, "refine": True}, [a, b])  # a parameter changed
    assert k != cache_key({"tile_um": 100.0, "refine": True}, [b, a])  # inputs are positional
    assert k != cache_key({"tile_um": 100.0, "refine": True}, [a])
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the input was rewritten
    assert k != cache_key({"tile_um": 100.0, "refine": True}, [a, b])
    assert file_fingerprint(b) == {"name": "b.parquet", "size": 2, "mtime_ns": b.stat().st_mtime_ns}


def test_stages_use_it():
    """align, labels and the tile stores key their outputs with cache_key (no private variants)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "stlib"
    for rel in ("align.py", "labels/derive.py"):
        src = (root / rel).read_text(encoding="utf-8")
        assert "cache_key(" in src and "hashlib" not in src and "argparse.Namespace(" not in src, rel
