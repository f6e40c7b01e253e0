"""Whole re-parameterisable models, their repositories' own deploy forms, and what a forward dispatches.

Shared by the tests (test_rep_blocks.py, test_rep_models.py) and benchmarks/rep_deploy.py, which times the
collapsed models beside these deploy forms.
"""
import collections
import copy
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import randomize_bn
from rep_blocks import DBBResNet18, RepVGG


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(model: nn.Module, x: torch.Tensor) -> collections.Counter:
    """The aten ops one forward of ``model`` dispatches, by name."""
    with torch.no_grad(), _Ops() as ops:
        model(x)
    return ops.counts


def trained(block: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its init (zero-initialised ones included) and random BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.1)
    return randomize_bn(block, seed).eval()


def own_deploy_form(model: nn.Module) -> nn.Module:
    """Every block of tests/rep_blocks.py with its repository's own deploy conversion applied."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "deploy"):
                setattr(module, child_name, child.deploy())
    return model


def timm_deploy_form(model: nn.Module) -> nn.Module:
    from timm.utils import reparameterize_model
    return reparameterize_model(model)


def ultralytics_deploy_form(model: nn.Module) -> nn.Module:
    """ultralytics' own conversions of its rep blocks, as its BaseModel.fuse() applies them (RepConv,
    RepVGGDW: fused, forward_fuse; Conv2: its 1x1 added into the 3x3, the BN kept), without the BN folding
    into every Conv that fuse() also does (acfx's fold_bn)."""
    from ultralytics.nn.modules.block import RepVGGDW
    from ultralytics.nn.modules.conv import Conv2, RepConv
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        if isinstance(module, Conv2):
            module.fuse_convs()
        elif isinstance(module, RepConv):
            module.fuse_convs()
            module.forward = module.forward_fuse
        elif isinstance(module, RepVGGDW):
            module.fuse()
            module.forward = module.forward_fuse
    return deployed


def _mobileone_s0() -> nn.Module:
    import timm
    return timm.create_model("mobileone_s0", num_classes=10)


def _ultralytics_neck() -> nn.Module:
    from ultralytics.nn.modules import block
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), block.RepC3(16, 32, n=2), nn.Upsample(scale_factor=2),
                         block.RepC3(32, 16, n=1))


# name: (builder of the train-time form, its repository's deploy conversion)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module]]] = {
    "repvgg_a0": (RepVGG, own_deploy_form),
    "dbb_resnet18": (DBBResNet18, own_deploy_form),
    "mobileone_s0": (_mobileone_s0, timm_deploy_form),
    "yolo_repc3_neck": (_ultralytics_neck, ultralytics_deploy_form),
}
