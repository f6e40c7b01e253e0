"""Argument checks shared by the public passes: clear errors before anything is touched."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from ..layers.module_copies import copy_modes

__all__ = ["check_model", "check_flags", "refuse_wrapped", "working_copy"]


def check_model(model: object, pass_name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"acfx.{pass_name} expects a torch.nn.Module, got {type(model).__name__}; "
                        "pass the model itself (not its state_dict or a GraphModule's code)")
    if isinstance(model, torch.jit.ScriptModule):  # its compiled code runs, not the modules a pass would swap
        raise TypeError(f"acfx.{pass_name}: the model is a TorchScript module (torch.jit.script or torch.jit.trace), "
                        f"whose compiled code would not run the modules acfx swaps in; call acfx.{pass_name} on the "
                        "Python model before scripting it, then script the result")
    _refuse_unmaterialised(model, pass_name)


def _refuse_unmaterialised(model: nn.Module, pass_name: str) -> None:
    """A lazy conv or norm not yet run has no shape to match or fuse, and an uninitialized buffer cannot even be
    copied; other lazy modules (a LazyLinear head) are never read by a pass and stay lazy."""
    lazy = nn.parameter.UninitializedTensorMixin
    for name, module in model.named_modules():
        buffers = any(isinstance(t, lazy) for t in module.buffers(recurse=False))
        params = any(isinstance(t, lazy) for t in module.parameters(recurse=False))
        if buffers or (params and isinstance(module, (_ConvNd, _NormBase))):
            raise ValueError(f"acfx.{pass_name}: module '{name or '<model>'}' ({type(module).__name__}) has uninitialized "
                             "lazy parameters; run one forward pass on an example input to materialise them first")


def check_flags(pass_name: str, **flags: object) -> None:
    """Boolean arguments must be booleans: ``inplace="no"`` would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"acfx.{pass_name}: {name} must be True or False, got {value!r} "
                            f"({type(value).__name__})")


def _wrappers():
    """(class, name, attribute holding the wrapped module) of the wrappers a pass must not rewrite."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    found = [(DistributedDataParallel, "DistributedDataParallel", "model.module"),
             (DataParallel, "DataParallel", "model.module")]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        found.append((FullyShardedDataParallel, "FullyShardedDataParallel", "model.module"))
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    try:  # FSDP2's fully_shard swaps the module's class for a subclass of FSDPModule
        from torch.distributed.fsdp import FSDPModule
        found.append((FSDPModule, "fully_shard (FSDP2)", "<the module before fully_shard>"))
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        from torch._dynamo.eval_frame import OptimizedModule
        found.append((OptimizedModule, "torch.compile", "model._orig_mod"))
    except ImportError:  # pragma: no cover
        pass
    return found


def refuse_wrapped(model: nn.Module, pass_name: str) -> None:
    """A model wrapped in DDP, FSDP, DataParallel or torch.compile registered its parameters with the
    wrapper (DDP's reducer, FSDP's flat parameters, compiled graphs): new branches would be invisible to it,
    and ranks would silently drift apart. The fix is to transform the module inside, then wrap it."""
    wrappers = _wrappers()
    for name, module in model.named_modules():
        for cls, kind, inner in wrappers:
            if not isinstance(module, cls):
                continue
            where = f" (at '{name}')" if name else ""
            raise TypeError(
                f"acfx.{pass_name}: the model is wrapped in {kind}{where}, which would not know of the modules "
                f"acfx swaps in (their parameters would be neither synchronised nor compiled). Call "
                f"acfx.{pass_name} on the module inside ({inner}) first, then wrap the result.")


def working_copy(model: nn.Module, inplace: bool, pass_name: str) -> nn.Module:
    """The model itself (inplace=True) or a deep copy of it, with a clear error if it cannot be copied.

    A copy must be the same model: some classes copy themselves into another state (a GraphModule comes back
    in train mode, torchvision's feature extractors included, whatever mode they were in), so every module's
    training flag is set back to the input's, and a copy whose modules differ from the input's is refused.
    """
    if inplace:
        return model
    try:
        copied = copy.deepcopy(model)
    except Exception as error:
        raise TypeError(f"acfx.{pass_name}: could not deep-copy {type(model).__name__} ({error}); "
                        "pass inplace=True to rewrite the model itself") from error
    if copy_modes(model, copied):
        return copied
    raise TypeError(f"acfx.{pass_name}: a deep copy of {type(model).__name__} does not have the modules the model has "
                    "(its __deepcopy__ changes it); pass inplace=True to rewrite the model itself")
