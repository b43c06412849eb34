"""Synthetic cohort in the HEST-1k, raw Xenium and PanNuke layouts, with ground truth.

The cohort is a test bed, not evidence. One tissue simulator draws the architecture and the
nuclei of each field (:mod:`stlib.demo.tissue`), renders H&E in optical density
(:mod:`stlib.demo.render`), derives DAPI-like Xenium nuclei, the true Xenium -> H&E map and
HEST's imperfect registration (:mod:`stlib.demo.registration`) and the transcripts of every
cell (:mod:`stlib.demo.expression`); :mod:`stlib.demo.writers` writes the layouts described in
DEVELOPING.md ("A data root").

The expression is drawn from the generator's own biology (:mod:`stlib.demo.biology`: its own
cell-type catalogue and programmes, defined apart from the labeler's marker files, with knobs for
marker specificity, copy number, cycling, off-vocabulary types, dying cells and the Xenium region);
``preset="easy"`` reproduces the generator before it had one.

Public API: :class:`DemoConfig`, :func:`make_cohort`, :func:`true_he_xy`, :func:`cli_main`, and
for cohorts built on other cells (e.g. real annotated H&E with a simulated Xenium layer)
:func:`simulate_cell_expression` (transcripts of given cells: positions, generator types, organ,
sample), :func:`types_for_classes` (generator types from truth classes), :func:`cell_count_matrix`
and :func:`stlib.demo.sample.place_transcripts`.
"""

from stlib.demo.biology import types_for_classes
from stlib.demo.cohort import GENERATOR_VERSION, cli_main, make_cohort
from stlib.demo.config import FINE_TYPE_TO_CLASS, ORGANS, PRESETS, DemoConfig, cohort_samples, config_for_scale
from stlib.demo.expression import cell_count_matrix, simulate_cell_expression
from stlib.demo.registration import true_he_xy, true_um_from_he

__all__ = ["DemoConfig", "make_cohort", "true_he_xy", "true_um_from_he", "cli_main", "config_for_scale",
           "cohort_samples", "FINE_TYPE_TO_CLASS", "ORGANS", "GENERATOR_VERSION", "PRESETS",
           "simulate_cell_expression", "types_for_classes", "cell_count_matrix"]
