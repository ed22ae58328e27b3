"""Datasets with ground-truth factors."""
from disco.export.data.dsprites import DSprites, render

__all__ = ["DSprites", "render"]
