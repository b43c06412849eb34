"""Deliberately broken implementations, to show that the property tests can fail.

Each mutant patches one function of stlib with a plausible bug (a split that leaks, a
refinement that shrinks masks, an optimizer step that does not update the weights, ...) and
names the tests that must catch it. Not part of the suite (CI never loads it); run

    PYTHONPATH=. python tests/mutants.py            # every mutant: its tests must FAIL
    PYTHONPATH=. python tests/mutants.py split_no_guard refine_shrinks

which runs the mutant's tests once per mutant with ``STLIB_MUTANT=<name>`` and prints, per
mutant, whether its tests failed (caught) or passed (a test that cannot see the bug). The
patch is applied at interpreter start by a ``sitecustomize`` module put first on
``PYTHONPATH``, so it reaches subprocesses too (the DDP ranks started by torchrun).
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
    from stlib.tiles import stage

    orig = stage.assign_splits

    def broken(meta, **kw):
        kw["guard_tiles"] = 0
        return orig(meta, **kw)
    stage.assign_splits = broken


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

    from stlib.tiles import stage

    orig = stage._write_split

    def broken(store, split):
        if str(store).endswith("_truth"):
            split = np.random.default_rng(0).permutation(split)
        return orig(store, split)
    stage._write_split = broken


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


@mutant("labeler_tables_rotated", ["tests/test_labeler_independent.py::test_cells_of_the_panel_annotation_get_their_class",
                                   "tests/test_celltypes.py::test_assign_fine_types_accuracy",
                                   "tests/test_classes.py::test_class_accuracy_and_f1"],
        "the labeler's marker table with its cell-type names rotated (markers of one type credited to another)")
def _tables_rotated():
    from stlib.labels import celltypes, classes

    orig = celltypes.load_markers

    def broken(*a, **kw):
        mk = orig(*a, **kw)
        keys = list(mk)
        return {k: mk[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
    celltypes.load_markers = broken
    classes.load_markers = broken  # (classes binds the name at import)


@mutant("labeler_programmes_swapped", ["tests/test_classes.py::test_one_tumour_population_with_cycling_evidence_is_neoplastic",
                                       "tests/test_classes.py::test_dead_is_ignore_by_default_and_the_proxy_is_opt_in"],
        "the labeler's proliferation and apoptosis gene lists swapped")
def _programmes_swapped():
    from stlib.labels import celltypes, classes

    orig = celltypes.load_programs

    def broken(*a, **kw):
        prog = orig(*a, **kw)
        return {**prog, "proliferation": prog["apoptosis"], "apoptosis": prog["proliferation"]}
    celltypes.load_programs = broken
    classes.load_programs = broken


# ----------------------------------------------------------------------------- demo statistics

_STATS = ["tests/test_demo_stats.py::test_windows_hold_over_seeds", "tests/test_demo.py::test_expression_statistics",
          "tests/test_demo.py::test_dapi_polygons_missing_extra"]


@mutant("demo_low_qv_rate_off", _STATS, "generator whose low-qv rate is 1.3x the knob")
def _low_qv():
    import dataclasses

    from stlib.demo import sample

    orig = sample.place_transcripts

    def broken(*args, **kw):
        args = list(args)
        i = next(i for i, a in enumerate(args) if hasattr(a, "low_qv_fraction"))
        args[i] = dataclasses.replace(args[i], low_qv_fraction=args[i].low_qv_fraction * 1.3)
        return orig(*args, **kw)
    sample.place_transcripts = broken


def _scale_demo_knob(name: str, factor: float) -> None:
    """Make the demo generator use ``factor`` times the knob ``name`` of its DemoConfig."""
    import dataclasses

    from stlib.demo import sample

    orig = sample.simulate_sample

    def broken(spec, cfg, **kw):
        return orig(spec, dataclasses.replace(cfg, **{name: factor * getattr(cfg, name)}), **kw)
    sample.simulate_sample = broken


@mutant("demo_missing_rate_off", _STATS, "generator that drops twice the knob's share of DAPI nuclei")
def _missing():
    _scale_demo_knob("missing_fraction", 2.0)


@mutant("demo_library_off", ["tests/test_demo.py::test_expression_statistics",
                               "tests/test_demo_stats.py::test_windows_hold_over_seeds"],
        "generator whose transcripts per cell are 1.4x the knob (the old 50-200 window passed it)")
def _library():
    _scale_demo_knob("tx_per_cell_median", 1.4)


@mutant("demo_dapi_shift_px_as_um", ["tests/test_demo.py::test_dapi_polygons_missing_extra",
                                     "tests/test_demo_stats.py::test_windows_hold_over_seeds"],
        "DAPI outline shift knob (µm) used as H&E px: outlines 3.7x too close (the old IoU 0.6-0.9 window passed it)")
def _dapi_shift():
    from stlib.demo import sample

    orig = sample.dapi_outlines

    def broken(v, rng, *, shift_px, **kw):
        return orig(v, rng, shift_px=shift_px * 0.2737, **kw)
    sample.dapi_outlines = broken


@mutant("demo_control_rate_off", ["tests/test_demo.py::test_expression_statistics",
                                  "tests/test_demo_stats.py::test_windows_hold_over_seeds"],
        "generator with 1.5x the knob's control probes (the old share < 3 % window passed it)")
def _controls():
    import dataclasses

    from stlib.demo import sample

    orig = sample.place_transcripts

    def broken(*args, **kw):
        args = [dataclasses.replace(a, control_fraction=1.5 * a.control_fraction) if hasattr(a, "control_fraction")
                else a for a in args]
        return orig(*args, **kw)
    sample.place_transcripts = broken


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


# ----------------------------------------------------------------------------- alignment

_ALIGN = ["tests/test_align_demo.py::test_alignment_from_a_15um_offset_on_every_demo_sample"]


@mutant("align_not_refined", _ALIGN, "alignment that keeps the initial map (refinement skipped)")
def _align_skip():
    from stlib import align

    orig = align.align_nuclei
    align.align_nuclei = lambda *a, **kw: orig(*a, **{**kw, "refine": False})


@mutant("align_shift_sign", _ALIGN, "phase-correlation shifts applied with the wrong sign")
def _align_sign():
    from stlib import align

    orig = align._measure_nodes_batched

    def broken(res, *a, **kw):
        orig(res, *a, **kw)
        res["dx_px"] *= -1
        res["dy_px"] *= -1
    align._measure_nodes_batched = broken


@mutant("align_damped_updates", _ALIGN, "each refinement iteration applies only a fifth of the measured shift")
def _align_damped():
    from stlib import align

    orig = align._measure_nodes_batched

    def broken(res, *a, **kw):
        orig(res, *a, **kw)
        res["dx_px"] *= 0.2
        res["dy_px"] *= 0.2
    align._measure_nodes_batched = broken


_CAPTURE = "tests/test_align_demo.py::"


@mutant("align_capture_halved", [_CAPTURE + "test_alignment_recovers_up_to_the_capture_range"],
        "phase correlation that accepts shifts up to an eighth of the window (capture range 12.5 µm)")
def _align_capture():
    import numpy as np

    from stlib import align

    orig = align._measure_nodes_batched

    def broken(res, h, mask, hmask, blurred, node_work, counts, win_px, **kw):
        orig(res, h, mask, hmask, blurred, node_work, counts, win_px, **kw)
        far = np.hypot(res["dx_px"], res["dy_px"]) > win_px / 8.0 * kw["f"]
        res["dx_px"][far] = np.nan
        res["dy_px"][far] = np.nan
    align._measure_nodes_batched = broken


@mutant("align_never_excludes", [_CAPTURE + "test_beyond_the_capture_range_the_region_is_excluded"],
        "alignment QC that never excludes a region (a failed map is passed on as if it were right)")
def _align_never_excludes():
    from stlib import align

    orig = align._tile_table

    def broken(*a, **kw):
        tiles, _excluded, field_ = orig(*a, **kw)
        return tiles, [], field_
    align._tile_table = broken


@mutant("align_verdict_never_fails",
        [_CAPTURE + "test_beyond_the_capture_range_no_nucleus_is_silently_misplaced",
         "tests/test_align_verdict.py::test_labels_refuse_a_failed_sample_and_say_how_to_fix_it"],
        "no sample-level verdict: every alignment is judged ok (the issue-15 defect)")
def _align_verdict_never_fails():
    from stlib import align

    orig = align.alignment_verdict

    def broken(*a, **kw):
        return {**orig(*a, **kw), "status": "ok", "reasons": []}
    align.alignment_verdict = broken


@mutant("labels_ignore_verdict", ["tests/test_align_verdict.py::test_labels_refuse_a_failed_sample_and_say_how_to_fix_it"],
        "the label stage uses the nuclei of a sample whose alignment failed")
def _labels_ignore_verdict():
    from stlib import align

    orig = align.check_alignment

    def broken(result, **kw):
        return orig(result, **{**kw, "accept_failed": True})
    align.check_alignment = broken


# ----------------------------------------------------------------------------- evaluation

_EV = "tests/test_evaluate_props.py::"


@mutant("score_tiles_ignore_unused", [_EV + "test_score_tiles_removes_ignored_pixels_from_truth_and_prediction"],
        "score_tiles that scores excluded regions too")
def _ignore_unused():
    from stlib import evaluate

    orig = evaluate.score_tiles
    evaluate.score_tiles = lambda truth, preds, **kw: orig({k: v for k, v in truth.items() if k != "ignore"},
                                                          preds, **kw)


@mutant("score_tiles_ignore_truth_only", [_EV + "test_score_tiles_removes_ignored_pixels_from_truth_and_prediction"],
        "ignore mask applied to the truth but not to the prediction")
def _ignore_truth_only():
    import numpy as np

    from stlib import evaluate, metrics

    orig = metrics.evaluate_pair
    state = {}

    def score(truth, preds, **kw):
        state["raw"] = [p for p, _ in preds]
        state["i"] = 0
        return orig_score(truth, preds, **kw)

    def pair(t, q, *a, **kw):
        q = state["raw"][state["i"]]
        state["i"] += 1
        return orig(t, np.asarray(q), *a, **kw)
    orig_score = evaluate.score_tiles
    evaluate.score_tiles = score
    metrics.evaluate_pair = pair


@mutant("segment_and_score_misordered", [_EV + "test_segment_and_score_with_an_oracle_and_an_empty_network"],
        "predictions scored against the truth of another image (order reversed)")
def _misordered():
    from stlib import infer

    orig = infer.segment_tiles
    infer.segment_tiles = lambda *a, **kw: orig(*a, **kw)[::-1]


@mutant("class_head_features_misaligned", [_EV + "test_classification_head_learns_the_label_set_it_is_given"],
        "frozen features of each tile paired with the nucleus ids in the wrong order")
def _features_misaligned():
    from stlib import evaluate

    orig = evaluate.nucleus_features

    def broken(*a, **kw):
        return [(ids, f[::-1]) for ids, f in orig(*a, **kw)]
    evaluate.nucleus_features = broken


# ----------------------------------------------------------------------------- training

_TRAIN = ["tests/test_train.py::test_overfitting_a_handful_of_tiles_halves_the_loss_and_beats_the_untrained_net"]
_DDP = ["tests/test_train.py::test_ddp_two_processes_match_one_process_with_the_same_global_batch"]


@mutant("train_step_no_update", _TRAIN, "optimizer step that does not update the weights")
def _no_update():
    import torch

    torch.optim.AdamW.step = lambda self, closure=None: None


@mutant("train_grad_zeroed_before_step", _TRAIN, "gradients cleared between backward and the optimizer step")
def _zeroed():
    import torch

    orig = torch.optim.AdamW.step

    def broken(self, closure=None):
        self.zero_grad(set_to_none=True)
        return orig(self, closure)
    torch.optim.AdamW.step = broken


@mutant("train_lr_schedule_zero", _TRAIN, "learning-rate schedule that is 0 after the first step")
def _lr_zero():
    from stlib.train import loop

    orig = loop._lr_lambda
    loop._lr_lambda = lambda config: (lambda step: orig(config)(step) if step == 0 else 0.0)


@mutant("ddp_ranks_share_tiles", _DDP, "every DDP rank trains on the same half of the global batch")
def _ddp_same_tiles():
    import torch

    from stlib import train

    def draw(self, global_batch):
        idx = torch.multinomial(self.weights, global_batch, replacement=True, generator=self.generator)
        self.draws += 1
        return idx[: global_batch // self.world_size].numpy()
    train.BalancedSampler.draw = draw


@mutant("ddp_augmentation_unsharded", _DDP, "every DDP rank applies the first rank's augmentation parameters")
def _ddp_aug():
    from stlib.train import loop

    loop.shard_params = lambda params, rank, world_size: {k: v[: len(v) // world_size] for k, v in params.items()}


# ----------------------------------------------------------------------------- runner

def apply(name: str) -> None:
    """Apply mutant ``name`` (called by the generated ``sitecustomize``)."""
    MUTANTS[name][0]()


_SITECUSTOMIZE = """
import os
import sys

if os.environ.get("STLIB_MUTANT"):
    sys.path.insert(0, {tests!r})
    import mutants

    mutants.apply(os.environ["STLIB_MUTANT"])
"""


def main(names: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stlib-mutants-") as site:
        return _run(names, Path(site))


def _run(names: list[str], site: Path) -> int:
    repo = Path(__file__).resolve().parents[1]
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(tests=str(repo / "tests")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo), os.environ.get("PYTHONPATH", "")])}
    env.pop("STLIB_STRICT", None)
    bad = 0
    for name in names or list(MUTANTS):
        _, tests, what = MUTANTS[name]
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                           env={**env, "STLIB_MUTANT": name}, cwd=repo, capture_output=True, text=True)
        last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or [""]
        # caught: an assertion failed; an error (a crash in a fixture) would not show the test works
        caught = p.returncode == 1 and "failed" in last[0] and "error" not in last[0]
        bad += not caught
        why = next((ln[1:].strip() for ln in p.stdout.splitlines() if ln.startswith("E ")), "")
        print(f"{'CAUGHT ' if caught else 'MISSED '} {name:32s} {time.perf_counter() - t0:6.1f}s  {what}  [{last[0]}]"
              + (f"\n         {why[:160]}" if why else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
