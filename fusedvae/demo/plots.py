"""Pictures with matplotlib (Agg backend, imported on first use): labelled rows of images as one PNG."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from .data import _as_float

__all__ = ["image_grid"]


def _plt():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mosaic(images: Tensor, pad: int = 1) -> "object":
    """``[n, C, H, W]`` in [0, 1] → one ``[H, n*(W+pad)-pad, C]`` (or 2-D for C=1) numpy row.

    ``images`` may require grad or live on another device; uint8 images are read as value/255.
    """
    images = _as_float(images.detach().cpu())
    n, c, h, w = images.shape
    canvas = torch.ones(c, h, n * (w + pad) - pad)
    for i in range(n):
        canvas[:, :, i * (w + pad): i * (w + pad) + w] = images[i].clamp(0, 1)
    return canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[Tuple[str, Tensor]], path: str, title: str) -> None:
    """Write one PNG (``path``, 110 dpi, 9 inches wide) with one labelled row of images per ``(label, images)``.

    ``images`` is a ``[n, C, H, W]`` tensor with C = 1 (drawn grey) or 3 (RGB), values
    in [0, 1] (clamped; uint8 is read as value/255), on any device. The rows may hold
    different numbers of images; the first row's ``n``, ``H`` and ``W`` set the row
    height. Labels may hold newlines; ``title`` goes above the rows.
    """
    plt = _plt()
    n, _, h, w = rows[0][1].shape
    fig_w, label_w = 9.0, 1.9
    row_h = (fig_w - label_w - 0.2) * h / (n * (w + 1)) + 0.12
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w, row_h * len(rows) + 0.45))
    if len(rows) == 1:
        axes = [axes]
    for ax, (label, imgs) in zip(axes, rows):
        ax.imshow(_mosaic(imgs), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=label_w / fig_w, right=0.99, top=1 - 0.35 / (row_h * len(rows) + 0.45),
                        bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)
