"""Synthetic cohort in the HEST-1k, raw Xenium and PanNuke layouts, with ground truth.

The cohort is a test bed, not evidence. One tissue simulator draws the architecture and the
nuclei of each field (:mod:`stlib.demo.tissue`), renders H&E in optical density
(:mod:`stlib.demo.render`), derives DAPI-like Xenium nuclei, the true Xenium -> H&E map and
HEST's imperfect registration (:mod:`stlib.demo.registration`) and the transcripts of every
cell (:mod:`stlib.demo.expression`); :mod:`stlib.demo.writers` writes the layouts described in
DEVELOPING.md ("A data root").

Public API: :class:`DemoConfig`, :func:`make_cohort`, :func:`true_he_xy`, :func:`cli_main`.
"""

from stlib.demo.cohort import GENERATOR_VERSION, cli_main, make_cohort
from stlib.demo.config import FINE_TYPE_TO_CLASS, ORGANS, DemoConfig, cohort_samples, config_for_scale
from stlib.demo.registration import true_he_xy, true_um_from_he

__all__ = ["DemoConfig", "make_cohort", "true_he_xy", "true_um_from_he", "cli_main", "config_for_scale",
           "cohort_samples", "FINE_TYPE_TO_CLASS", "ORGANS", "GENERATOR_VERSION"]
