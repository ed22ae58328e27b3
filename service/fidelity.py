"""How faithful a reconstruction is: foreground IoU and pixel accuracy of binarised images."""
from __future__ import annotations

import numpy as np


def binarize(pixels: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> bool foreground (threshold at the middle of the range)."""
    return pixels >= (128 if pixels.dtype == np.uint8 else 0.5)


def brightest(pixels: np.ndarray, channel_axis: int) -> np.ndarray:
    """The brightest channel of each pixel: the foreground of a coloured sprite on black is where it
    passes the middle (a colour channel alone may sit below it)."""
    return pixels.max(axis=channel_axis)


def foreground_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image IoU of the foregrounds of two batches of the same shape (N, ...). Empty vs empty is 1."""
    fa, fb = binarize(a).reshape(len(a), -1), binarize(b).reshape(len(b), -1)
    inter, union = (fa & fb).sum(1), (fa | fb).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pixel_accuracy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image fraction of pixels whose binarised values agree."""
    fa, fb = binarize(a).reshape(len(a), -1), binarize(b).reshape(len(b), -1)
    return (fa == fb).mean(1)
