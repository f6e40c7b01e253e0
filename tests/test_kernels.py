"""The average kernel magnitude matrix (ACNet Sect. 4.4) against a hand computation."""
import torch
import torch.nn as nn

import acfx
from acfx.tools.kernels import kernel_magnitude


def test_matrix_is_the_mean_of_per_layer_normalised_magnitudes():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Conv2d(3, 1, 3, bias=False), nn.Conv2d(1, 1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(54.0).view(3, 2, 3, 3) - 20)
        model[1].weight.copy_(torch.randn(1, 3, 3, 3))
    expected = []
    for conv in model[:2]:
        a = conv.weight.abs().sum(dim=(0, 1))
        expected.append(a / a.max())
    matrix, layers = kernel_magnitude(model)
    assert layers == 2
    assert torch.allclose(matrix, torch.stack(expected).mean(0).double())


def test_expanded_model_is_measured_on_its_fused_kernels():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    expanded = acfx.expand(plain).eval()
    with torch.no_grad():  # make the asymmetric branches dominate: the skeleton must come out strongest
        expanded[0].hor.weight.mul_(50)
        expanded[0].ver.weight.mul_(50)
    matrix, _ = kernel_magnitude(expanded)
    skeleton = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert matrix[skeleton].min() > matrix[~skeleton].max()
