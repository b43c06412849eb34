"""stlib: spatial transcriptomics as labels for H&E nuclei analysis."""

__version__ = "0.1.0"
