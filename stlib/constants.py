"""The one table of classes, colours and fixed physical constants used everywhere in stlib.

Every module that needs a class id, a class name or a colour imports it from here, so the
id <-> name mapping cannot drift between label derivation, training, metrics and the book.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np

#: Image-oriented nucleus classes (PanNuke's five plus background). 255 = labelled nucleus
#: whose class is unknown: it counts for segmentation, never for classification.
BACKGROUND: Final = 0
NEOPLASTIC: Final = 1
INFLAMMATORY: Final = 2
CONNECTIVE: Final = 3
DEAD: Final = 4
EPITHELIAL: Final = 5
IGNORE: Final = 255

CLASS_NAMES: Final[dict[int, str]] = {
    BACKGROUND: "Background",
    NEOPLASTIC: "Neoplastic",
    INFLAMMATORY: "Inflammatory",
    CONNECTIVE: "Connective",
    DEAD: "Dead",
    EPITHELIAL: "Epithelial",
}
#: Nucleus classes only (no background), in id order.
NUCLEUS_CLASSES: Final[tuple[int, ...]] = (NEOPLASTIC, INFLAMMATORY, CONNECTIVE, DEAD, EPITHELIAL)
N_TYPES: Final = 6  # background + five classes: the width of the NT head

#: Colours used in every figure and in the QuPath GeoJSON (RGB 0-255), PanNuke-like.
CLASS_COLORS: Final[dict[int, tuple[int, int, int]]] = {
    BACKGROUND: (0, 0, 0),
    NEOPLASTIC: (220, 40, 40),
    INFLAMMATORY: (40, 200, 40),
    CONNECTIVE: (40, 90, 230),
    DEAD: (240, 200, 30),
    EPITHELIAL: (230, 120, 20),
    IGNORE: (150, 150, 150),
}

#: PanNuke masks.npy channel order (channel 5 is background).
PANNUKE_CHANNELS: Final[tuple[str, ...]] = (
    "Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial", "Background",
)
#: PanNuke channel index -> stlib class id.
PANNUKE_CHANNEL_TO_CLASS: Final[dict[int, int]] = {
    0: NEOPLASTIC, 1: INFLAMMATORY, 2: CONNECTIVE, 3: DEAD, 4: EPITHELIAL,
}

#: Nucleus known to be epithelial but not whether neoplastic (CoNSeP's merged "epithelial": healthy
#: and malignant together). Training treats it like :data:`IGNORE` (segmentation only, no class
#: loss); scoring against such a truth merges Neoplastic and Epithelial into one class first
#: (:func:`merge_epithelial`), so a network that says "Neoplastic" there is not counted wrong.
EPITHELIAL_ANY: Final = 254
#: Class ids that mark a nucleus whose class cannot be used for training a 5-class head.
UNKNOWN_CLASSES: Final[tuple[int, ...]] = (IGNORE, EPITHELIAL_ANY)

#: How each annotated source's own class ids map to stlib classes, in one table.
#: ``monuseg``: instances only (every nucleus -> IGNORE, class unknown).
#: ``consep`` (merged, HoVer-Net's 4 classes, the patch export): 1 other -> IGNORE,
#: 2 inflammatory -> Inflammatory, 3 epithelial (healthy and malignant together) -> EPITHELIAL_ANY,
#: 4 spindle-shaped (fibroblast, muscle, endothelial) -> Connective.
#: ``consep_original`` (the 7 classes of CoNSeP's own ``.mat`` labels): 1 other -> IGNORE,
#: 2 inflammatory, 3 healthy epithelial -> Epithelial, 4 dysplastic/malignant epithelial ->
#: Neoplastic, 5 fibroblast, 6 muscle, 7 endothelial -> Connective.
#: ``pannuke``: mask channel -> class (:data:`PANNUKE_CHANNEL_TO_CLASS`).
SOURCE_CLASS_MAPS: Final[dict[str, dict[int, int]]] = {
    "monuseg": {},
    "consep": {1: IGNORE, 2: INFLAMMATORY, 3: EPITHELIAL_ANY, 4: CONNECTIVE},
    "consep_original": {1: IGNORE, 2: INFLAMMATORY, 3: EPITHELIAL, 4: NEOPLASTIC, 5: CONNECTIVE, 6: CONNECTIVE,
                        7: CONNECTIVE},
    "pannuke": dict(PANNUKE_CHANNEL_TO_CLASS),
}

#: Xenium morphology image pixel size (µm/px), as written in experiment.xenium.
XENIUM_PIXEL_SIZE_UM: Final = 0.2125
#: PanNuke-like 40x resolution (µm/px) used for training tiles by default.
TARGET_UM_PER_PX_40X: Final = 0.25
TARGET_UM_PER_PX_20X: Final = 0.5
#: Level-0 pixel size of HEST's Xenium H&E WSIs (about 0.2737 µm/px): the demo slides' and the slide benchmarks'.
HEST_XENIUM_UM_PER_PX: Final = 0.2737

#: Xenium feature names that are not genes (control probes and codewords).
CONTROL_PREFIXES: Final[tuple[str, ...]] = (
    "NegControlProbe_", "NegControlCodeword_", "UnassignedCodeword_", "BLANK_",
    "DeprecatedCodeword_", "antisense_", "Intergenic_Region",
)
#: Transcript quality threshold (Phred-scaled) used by 10x and HEST.
MIN_QV: Final = 20.0


def class_name(class_id: int) -> str:
    """Name of a class id, ``"Ignore"`` for 255; raises ``ValueError`` for anything else."""
    if class_id == IGNORE:
        return "Ignore"
    if class_id == EPITHELIAL_ANY:
        return "Epithelial (neoplastic or not)"
    try:
        return CLASS_NAMES[int(class_id)]
    except KeyError:
        raise ValueError(f"unknown class id {class_id!r}; known: {sorted(CLASS_NAMES)} and {IGNORE}") from None


def merge_epithelial(types: np.ndarray) -> np.ndarray:
    """Class map for scoring against a truth that cannot split epithelial nuclei.

    Neoplastic (1), Epithelial (5) and :data:`EPITHELIAL_ANY` (254) all become Epithelial (5);
    every other value is kept. Apply it to the truth *and* the prediction before computing
    per-class metrics against CoNSeP-like (merged) types.
    """
    import numpy as np

    t = np.asarray(types)
    out = t.copy()
    out[(t == NEOPLASTIC) | (t == EPITHELIAL_ANY)] = EPITHELIAL
    return out


def is_control_feature(name: str) -> bool:
    """True for Xenium control probes / codewords (not genes)."""
    return str(name).startswith(CONTROL_PREFIXES)
