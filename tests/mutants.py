"""Deliberately broken implementations, to show that the property tests can fail.

Each mutant patches one function of stlib with a plausible bug (a split that leaks, a
refinement that shrinks masks, an optimizer step that does not update the weights, ...) and
names the tests that must catch it. Not part of the suite (CI never loads it); run

    PYTHONPATH=. python tests/mutants.py            # every mutant: its tests must FAIL
    PYTHONPATH=. python tests/mutants.py split_no_guard refine_shrinks

which runs ``pytest -p mutants`` once per mutant with ``STLIB_MUTANT=<name>`` and prints, per
mutant, whether its tests failed (caught) or passed (a test that cannot see the bug).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: name -> (patch function, tests that must fail, what is broken)
MUTANTS: dict[str, tuple[Callable[[], None], list[str], str]] = {}


def mutant(name: str, tests: list[str], what: str):
    def deco(fn):
        MUTANTS[name] = (fn, tests, what)
        return fn
    return deco


# ----------------------------------------------------------------------------- splits

@mutant("split_no_guard", ["tests/test_derive.py::test_no_true_nucleus_in_a_train_and_a_val_tile"],
        "spatial split without the guard column (train and val tiles touch)")
def _split_no_guard():
    from stlib.labels import derive

    orig = derive.assign_splits

    def broken(meta, **kw):
        kw["guard_tiles"] = 0
        return orig(meta, **kw)
    derive.assign_splits = broken


@mutant("split_heldout_trained", ["tests/test_derive.py::test_heldout_organs_only_in_test"],
        "held-out organs split into train/val like the others")
def _split_heldout():
    from stlib.io import tiles

    orig = tiles.split_by_sample

    def broken(meta, **kw):
        kw["heldout_organs"] = ()
        return orig(meta, **kw)
    tiles.split_by_sample = broken


@mutant("split_differs_between_stores", ["tests/test_derive.py::test_both_stores_share_tiles_and_splits"],
        "the truth store gets a reshuffled split")
def _split_differs():
    import numpy as np

    from stlib.labels import derive

    orig = derive._write_split

    def broken(store, split):
        if str(store).endswith("_truth"):
            split = np.random.default_rng(0).permutation(split)
        return orig(store, split)
    derive._write_split = broken


# ----------------------------------------------------------------------------- labels

@mutant("refine_shrinks", ["tests/test_derive.py::test_refined_masks_are_closer_to_the_truth"],
        "mask refinement that erodes every nucleus by 2 px")
def _refine_shrinks():
    import numpy as np
    from scipy import ndimage as ndi

    from stlib.labels import refine

    orig = refine.refine_label_maps

    def broken(*a, **kw):
        inst, typ, ign, conf, stats = orig(*a, **kw)
        out = np.zeros_like(inst)
        for i in np.unique(inst[inst > 0]):
            out[ndi.binary_erosion(inst == i, iterations=2)] = i
        return out, np.where(out > 0, typ, 0).astype(typ.dtype), ign, np.where(out > 0, conf, 0).astype(conf.dtype), stats
    refine.refine_label_maps = broken


@mutant("labels_shuffled", ["tests/test_derive.py::test_labels_against_the_truth"],
        "the labeler's classes assigned to the wrong cells (shuffled within a sample)")
def _labels_shuffled():
    import numpy as np

    from stlib.labels import classes

    orig = classes.label_cells

    def broken(adata, **kw):
        out = orig(adata, **kw)
        ad = adata if out is None else out
        perm = np.random.default_rng(0).permutation(ad.n_obs)
        for col in ("class", "fine_type", "confidence"):
            ad.obs[col] = ad.obs[col].to_numpy()[perm]
        return out
    classes.label_cells = broken


@mutant("alignment_not_refined", ["tests/test_derive.py::test_labels_against_the_truth"],
        "labels placed with HEST's registration only (the refinement step skipped)")
def _alignment_not_refined():
    from stlib import align

    orig = align.align_and_save

    def broken(*a, **kw):
        kw["refine"] = False
        return orig(*a, **kw)
    align.align_and_save = broken


@mutant("truth_scores_px_as_um", ["tests/test_derive.py::test_truth_scores_of_the_truth_and_of_known_errors"],
        "centroid error reported in H&E pixels as if they were µm")
def _truth_px():
    from stlib.labels import derive

    orig = derive.truth_scores

    def broken(cells, nuclei, d, *, he_um_per_px, **kw):
        return orig(cells, nuclei, d, he_um_per_px=1.0, **kw)
    derive.truth_scores = broken


@mutant("cellvit_class_names_unmapped", ["tests/test_derive.py::test_cellvit_agreement_known_answers"],
        "CellViT class names compared case-sensitively with the wrong table")
def _cellvit_names():
    from stlib.labels import derive

    derive._NAME_TO_CLASS = {k.upper(): v for k, v in derive._NAME_TO_CLASS.items()}


# ----------------------------------------------------------------------------- post-processing

_PP = ["tests/test_postproc.py::test_perfect_maps_recovered_at_pq_098",
       "tests/test_postproc.py::test_noisy_blurred_maps_agree_with_the_hovernet_procedure"]


@mutant("postproc_hv_swapped", _PP, "H and V maps swapped (derivatives taken along the wrong axes)")
def _pp_swapped():
    from stlib.model import postproc as P

    orig = P._instances
    P._instances = lambda np_prob, hv, **kw: orig(np_prob, hv[::-1], **kw)


@mutant("postproc_no_watershed", _PP, "instances = connected components of the NP map (no HV split)")
def _pp_components():
    from scipy import ndimage as ndi

    from stlib.model import postproc as P

    P._instances = lambda np_prob, hv, *, np_thresh, **kw: ndi.label(np_prob >= np_thresh)[0].astype("int32")


@mutant("postproc_sobel_sign", _PP, "Sobel derivative with the wrong sign (inside and between nuclei confused)")
def _pp_sign():
    from stlib.model import postproc as P

    orig = P.sobel_kernels

    def broken(k):
        s, d = orig(k)
        return s, -d
    P.sobel_kernels = broken


@mutant("postproc_small_sobel", _PP, "a 3-px Sobel instead of HoVer-Net's 21 px")
def _pp_small():
    from stlib.model import postproc as P

    orig = P._instances
    P._instances = lambda np_prob, hv, **kw: orig(np_prob, hv, **{**kw, "sobel_ksize": 3})


# ----------------------------------------------------------------------------- plugin / runner

def pytest_configure(config):
    name = os.environ.get("STLIB_MUTANT")
    if name:
        MUTANTS[name][0]()


def main(names: list[str]) -> int:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("STLIB_STRICT", None)
    bad = 0
    for name in names or list(MUTANTS):
        _, tests, what = MUTANTS[name]
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "mutants", "-p", "no:cacheprovider", *tests],
                           env={**env, "STLIB_MUTANT": name}, cwd=repo, capture_output=True, text=True)
        last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or [""]
        # caught: an assertion failed; an error (a crash in a fixture) would not show the test works
        caught = p.returncode == 1 and "failed" in last[0] and "error" not in last[0]
        bad += not caught
        print(f"{'CAUGHT ' if caught else 'MISSED '} {name:32s} {time.perf_counter() - t0:6.1f}s  {what}  [{last[0]}]",
              flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
