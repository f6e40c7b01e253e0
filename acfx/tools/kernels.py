"""The average kernel magnitude matrix of ACNet, Sect. 4.4 (Eq. 9-10).

Per k×k layer, sum |kernel| over filters and input channels, normalise by its largest entry; average the
matrices of all layers. ACNet strengthens the skeleton (centre row and column) relative to the corners.
Kernels are taken after BN folding (collapse with fold_bn=True), for plain and expanded models alike.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..passes.collapse import collapse

__all__ = ["kernel_magnitude", "format_grid", "save_heatmap", "common_kernel_size"]


def _fused_convs(model: nn.Module):
    fused = collapse(model, fold_bn=True)
    return [m for m in fused.modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) >= 2]


def common_kernel_size(model: nn.Module) -> Tuple[int, int]:
    """The most frequent k×k kernel size among the model's convs (ACBlocks counted by their k×k)."""
    sizes = collections.Counter(tuple(m.kernel_size) for m in model.modules()
                                if isinstance(m, nn.Conv2d) and min(m.kernel_size) >= 2)
    if not sizes:
        raise ValueError("the model has no conv with a kernel of at least 2x2")
    return sizes.most_common(1)[0][0]


def kernel_magnitude(model: nn.Module, kernel_size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, int]:
    """(average normalised magnitude matrix, number of layers averaged) over the layers of ``kernel_size``."""
    size = tuple(kernel_size) if kernel_size else common_kernel_size(model)
    matrices = []
    for conv in _fused_convs(model):
        if tuple(conv.kernel_size) != size:
            continue
        magnitude = conv.weight.detach().double().abs().sum(dim=(0, 1))  # [kh, kw]
        matrices.append(magnitude / magnitude.max().clamp_min(1e-30))
    if not matrices:
        raise ValueError(f"the model has no {size[0]}x{size[1]} conv")
    return torch.stack(matrices).mean(0), len(matrices)


def format_grid(matrix: torch.Tensor) -> str:
    return "\n".join("  ".join(f"{v:.3f}" for v in row.tolist()) for row in matrix)


def save_heatmap(matrix: torch.Tensor, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the heat map ({path}) is drawn with matplotlib, which is not installed: "
                           "pip install 'acfx[plot]' (the numbers above are the same)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=150)
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=1)
    for (i, j), v in zip(((i, j) for i in range(matrix.shape[0]) for j in range(matrix.shape[1])),
                         matrix.flatten().tolist()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
