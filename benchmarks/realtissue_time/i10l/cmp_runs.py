"""Compare two run folders file by file: npy byte-identical, parquet frames equal, json equal but
volatile keys (times), h5ad matrices and tables equal."""
import json, sys
from pathlib import Path
import numpy as np, pandas as pd

VOLATILE = ("seconds", "time", "wall", "date", "created", "_s", "elapsed", "cpu", "loadavg", "machine", "when")


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not any(t in k.lower() for t in VOLATILE)}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def compare(a: Path, b: Path) -> list[str]:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    out = []
    if fa != fb:
        out.append(f"file lists differ: {set(fa) ^ set(fb)}")
    stats = {}
    for r in fa:
        pa, pb = a / r, b / r
        if not pb.is_file():
            continue
        kind = pa.suffix
        same_bytes = pa.read_bytes() == pb.read_bytes()
        stats.setdefault(kind, [0, 0])[0] += 1
        if same_bytes:
            stats[kind][1] += 1
            continue
        if kind == ".npy":
            if not np.array_equal(np.load(pa), np.load(pb)):
                out.append(f"{r}: arrays differ")
        elif kind == ".parquet":
            try:
                pd.testing.assert_frame_equal(pd.read_parquet(pa), pd.read_parquet(pb))
            except AssertionError as e:
                out.append(f"{r}: {str(e)[:200]}")
        elif kind == ".json":
            ja, jb = strip(json.loads(pa.read_text())), strip(json.loads(pb.read_text()))
            if ja != jb:
                out.append(f"{r}: json differs beyond time keys")
        elif kind == ".h5ad":
            import anndata
            x, y = anndata.read_h5ad(pa), anndata.read_h5ad(pb)
            try:
                xa = x.X.toarray() if hasattr(x.X, "toarray") else np.asarray(x.X)
                ya = y.X.toarray() if hasattr(y.X, "toarray") else np.asarray(y.X)
                assert np.array_equal(xa, ya), "X"
                pd.testing.assert_frame_equal(x.obs, y.obs)
                pd.testing.assert_frame_equal(x.var, y.var)
                assert sorted(x.obsm) == sorted(y.obsm) and all(np.array_equal(np.asarray(x.obsm[k]), np.asarray(y.obsm[k])) for k in x.obsm), "obsm"
                assert sorted(x.layers) == sorted(y.layers), "layers"
            except AssertionError as e:
                out.append(f"{r}: h5ad differs: {str(e)[:200]}")
        else:
            out.append(f"{r}: bytes differ")
    return out, stats


if __name__ == "__main__":
    diffs, stats = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("files per kind [n, byte-identical]:", stats)
    print("DIFFERENCES:" if diffs else "no differences beyond time keys", *diffs, sep="\n")
