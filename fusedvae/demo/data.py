"""The demo's data, shipped with scikit-learn (no download): digits and photo patches, split into train and test."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits_data", "load_photo_patches"]


def load_digits_data(seed: int, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], upsampled to 16x16: ``(train, test)`` float32 [B,1,16,16]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return _split(images, seed, test_fraction)


def load_photo_patches(seed: int, patch: int = 16, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """Non-overlapping RGB patches of scikit-learn's two sample photographs: ``(train, test)`` uint8 ``[B,3,p,p]``.

    Each 427x640 photograph is cut into a grid of ``patch`` x ``patch`` crops from its
    top-left corner (the remainder at the right and bottom edges is dropped); the
    crops of both photographs are split at random (from ``seed``) into train and
    test, ``round(test_fraction * total)`` of them in the test set. Values are the
    photographs' 8-bit intensities, 0..255. ``patch=16`` gives 2080 patches (1664 / 416),
    ``patch=32`` 520 (416 / 104), ``patch=64`` 120 (96 / 24).
    """
    from sklearn.datasets import load_sample_images

    if patch < 1:
        raise ValueError(f"load_photo_patches: patch must be >= 1, got {patch}")
    patches = []
    for img in load_sample_images().images:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
        _, h, w = t.shape
        if patch > min(h, w):
            raise ValueError(f"load_photo_patches: patch must be at most {min(h, w)} (a photograph is {h}x{w}), "
                             f"got {patch}")
        t = t[:, : h - h % patch, : w - w % patch]
        p = t.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, h/p, w/p, p, p]
        patches.append(p.permute(1, 2, 0, 3, 4).reshape(-1, 3, patch, patch))
    return _split(torch.cat(patches).contiguous(), seed, test_fraction)


def _split(data: Tensor, seed: int, test_fraction: float) -> Tuple[Tensor, Tensor]:
    """A random permutation (from ``seed``) of ``data``'s rows cut into ``(train, test)``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(data.shape[0], generator=g)
    n_test = int(round(test_fraction * data.shape[0]))
    return data[perm[n_test:]].contiguous(), data[perm[:n_test]].contiguous()


def _as_float(x: Tensor) -> Tensor:
    """uint8 images as float32 value/255 in [0, 1]; any other dtype unchanged."""
    return x.float() / 255 if x.dtype == torch.uint8 else x
