"""stlib.align on demo-like slides: JPEG, another stain, defocus, missing nuclei, a 15 µm start.

Every sample of a small generated cohort (its slides carry the generator's JPEG compression,
per-slide stain jitter, an out-of-focus area, DAPI outlines that differ from the H&E nuclei,
nuclei missed by Xenium and Xenium nuclei not in the section) is re-stained with stain vectors
other than the ones :mod:`stlib.align` deconvolves, blurred over a further sixth of its area
and JPEG-compressed again (tests/independent.py). The alignment starts from the true affine
map displaced by 15 µm in a random direction (about three times HEST's registration error),
and must end within a bound of the truth for every sample, and never move a nucleus further
from its true place than the initial map did unless it excluded the region. The same holds at
25 µm, the capture range the tile window implies, and no sample is judged failed there; at 50 µm
the regions are excluded and every sample is judged failed (:func:`stlib.align.alignment_verdict`),
so the label stage uses none of its nuclei (tests/test_align_verdict.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from independent import SKIMAGE_E, SKIMAGE_H, STAINS, angle_deg, defocus, jpeg, render_od
from test_align import ArraySlide

from stlib.align import Transform, align_nuclei, alignment_error_um, fit_hest_registration, in_excluded_region
from stlib.io.hest import HestSample

OFFSET_UM = 15.0


def restain(rgb: np.ndarray, stain: str, seed: int) -> np.ndarray:
    """The slide re-rendered with other stain vectors, a defocused corner and JPEG again.

    Optical densities are unmixed with the demo's nominal H / E / residual basis (close to,
    not equal to, each slide's jittered vectors) and rendered with ``STAINS[stain]``."""
    basis = np.stack([SKIMAGE_H, SKIMAGE_E, np.cross(SKIMAGE_H, SKIMAGE_E)])
    od = -np.log10(np.clip(rgb.astype(float), 1, 255) / 255.0)
    conc = np.clip(od @ np.linalg.inv(basis), 0, None)
    out = render_od(conc[..., 0], conc[..., 1], stain=stain, seed=seed)
    H, W = out.shape[:2]
    blurred = np.zeros((H, W), bool)
    blurred[: H // 3, W // 2:] = True
    return jpeg(defocus(out, blurred, 2.0), 70)


@pytest.fixture(scope="module")
def cohort(small_cohort) -> Path:
    """The session's small demo cohort (tests/conftest.py)."""
    return small_cohort


def _offset(transform: dict, um: float, angle: float) -> np.ndarray:
    A = np.asarray(transform["xenium_um_to_he_px"], float)
    px = um * Transform(A).px_per_um
    return np.array([[1, 0, px * np.cos(angle)], [0, 1, px * np.sin(angle)], [0, 0, 1.0]]) @ A


def test_stains_used_here_differ_from_the_deconvolved_ones():
    for h, e in STAINS.values():
        assert angle_deg(h, SKIMAGE_H) > 5 and angle_deg(e, SKIMAGE_E) > 5


@pytest.fixture(scope="module")
def prepared(cohort) -> list[tuple]:
    """Per sample: id, re-stained slide, Xenium nuclei (µm, via HEST's registration), truth map, centroids."""
    out = []
    for k, sid in enumerate(sorted(p.name for p in (cohort / "truth").iterdir())):
        s = HestSample(cohort / "hest", sid)
        with s.wsi() as w:
            rgb = w.read_level(0)
        slide = ArraySlide(restain(rgb, "blue" if k % 2 else "macenko", seed=k))
        # the Xenium nuclei in µm, as the HEST route gets them (polygons registered by HEST)
        tx = s.transcripts(min_qv=None, genes_only=False, columns=["x_location", "y_location", "he_x", "he_y"])
        M_hest = fit_hest_registration(tx, sample=sid)
        nuclei_um = Transform(np.linalg.inv(M_hest)).warp_geometries(s.nuclei().geometry.values)
        truth = json.loads((cohort / "truth" / sid / "transform.json").read_text())
        pts = shapely.get_coordinates(shapely.centroid(nuclei_um))
        out.append((sid, slide, nuclei_um, truth, pts))
    return out


def _align_from(prepared, offset_um: float):
    """Per sample: (id, error before, error after (µm), in an excluded region, status) from ``offset_um`` off the truth."""
    rng = np.random.default_rng(0)
    for sid, slide, nuclei_um, truth, pts in prepared:
        initial = _offset(truth, offset_um, rng.uniform(0, 2 * np.pi))
        res = align_nuclei(slide, nuclei_um, initial, sample=sid, route="hest")
        before = alignment_error_um(initial, truth, pts)
        after = alignment_error_um(res, truth, pts)
        xy = res.transform.apply_xy(pts)
        yield sid, before, after, in_excluded_region(res, xy[:, 0], xy[:, 1]), res.status


def _recovered(prepared, offset_um: float) -> None:
    assert len(prepared) == 6
    for sid, before, after, excluded, status in _align_from(prepared, offset_um):
        assert np.median(before) > 0.8 * offset_um, (sid, np.median(before))
        assert status == "ok", sid  # the sample-level flag does not fire on a recovered map
        assert excluded.mean() < 0.5, (sid, excluded.mean())
        kept = after[~excluded]
        # the DAPI outlines differ from the H&E nuclei (dapi_shift_um 0.45 µm sd, size, jitter):
        # the map is judged at the nucleus scale, not to the pixel
        assert np.median(kept) < 1.0 and np.percentile(kept, 95) < 2.0, (sid, np.median(kept), kept.max())
        # never worse than the initial map, unless the region is excluded
        worse = (after > before) & ~excluded
        assert not worse.any(), (sid, int(worse.sum()))


def test_alignment_from_a_15um_offset_on_every_demo_sample(prepared):
    _recovered(prepared, OFFSET_UM)


#: Capture range. Nothing in the code or the book states one; it follows from the phase
#: correlation, which accepts a tile's shift only up to a quarter of its window
#: (``max_shift = win_px / 4`` in :func:`stlib.align._measure_nodes_batched`): 25 µm with the
#: default 100 µm tiles on slides under 600 µm (larger slides add coarse 200 / 400 µm windows,
#: i.e. 50 / 100 µm). Measured on this cohort (seed 3, 640 px, angles of rng 0; load ~10):
#: 5, 15, 25 µm: every sample recovered (median 0.3-0.5 µm, <= 20 % excluded); 35 µm: one sample
#: of six recovered, the others 94-100 % excluded; 50 µm: none recovered, 96-100 % excluded.
CAPTURE_UM = 25.0
BEYOND_UM = 50.0


def test_alignment_recovers_up_to_the_capture_range(prepared):
    """A quarter of the 100 µm tile window: the largest initial error the refinement is built to take."""
    _recovered(prepared, CAPTURE_UM)


def test_beyond_the_capture_range_the_region_is_excluded(prepared):
    """Twice the capture range: the map is not recovered, and (almost) every nucleus lies in an
    excluded region, so the label stage drops it instead of training on misplaced masks."""
    for sid, before, after, excluded, _ in _align_from(prepared, BEYOND_UM):
        assert np.median(before) > 0.8 * BEYOND_UM, (sid, np.median(before))
        # not recovered: still beyond the range (if this fails, the range grew: move CAPTURE_UM / BEYOND_UM)
        assert np.median(after) > 3.0, (sid, np.median(after))
        assert excluded.mean() >= 0.9, (sid, excluded.mean())


def test_beyond_the_capture_range_no_nucleus_is_silently_misplaced(prepared):
    """Excluding tiles is not enough beyond the capture range: a few lock onto a wrong phase-correlation
    peak and keep 0-4 % of a sample's nuclei 30-80 µm from their place (issue 15). The sample-level
    verdict fires on every such sample, and a failed sample's nuclei are not used at all."""
    statuses = {}
    for sid, before, after, excluded, status in _align_from(prepared, BEYOND_UM):
        statuses[sid] = status
        if status == "ok":  # used by the label stage: then no nucleus may be far from its place
            kept = after[~excluded]
            assert not (kept > 3.0).any(), (sid, int((kept > 3.0).sum()), float(np.max(kept, initial=0)))
    # and here the flag fires on every sample (none is recovered, see the test above)
    assert set(statuses.values()) == {"failed"}, statuses
