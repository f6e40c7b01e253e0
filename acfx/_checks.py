"""Argument checks shared by the public passes."""
from __future__ import annotations

import copy

import torch.nn as nn

__all__ = ["check_model", "working_copy"]


def check_model(model: object, pass_name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"acfx.{pass_name} expects a torch.nn.Module, got {type(model).__name__}; "
                        "pass the model itself (not its state_dict or a GraphModule's code)")


def working_copy(model: nn.Module, inplace: bool, pass_name: str) -> nn.Module:
    """The model itself (inplace=True) or a deep copy of it, with a clear error if it cannot be copied."""
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise TypeError(f"acfx.{pass_name}: could not deep-copy {type(model).__name__} ({error}); "
                        "pass inplace=True to rewrite the model itself") from error
