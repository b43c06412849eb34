"""Labels from spatial transcriptomics: nuclear masks (:mod:`~stlib.labels.masks`), cell types
(:mod:`~stlib.labels.celltypes`), image-oriented classes (:mod:`~stlib.labels.classes`) and the
per-sample derivation + tile stores (:mod:`~stlib.labels.derive`). Import the sub-modules."""
