"""The block expand puts in a conv's slot, holding its branches, and the module left in the BatchNorm's slot.

A block is a shared padding of its input plus branches, summed. Each branch is data (:class:`Branch`):
where it reads the shared input and the modules it runs on it, in order; the forward, the alternative
forwards (stacked.py, recompute.py), fusion and the recorded layout all iterate the branches. The ACB of
ACNet is the block with a k×k, a 1×k and a k×1 branch, each conv → BN; RepVGG's recipe adds a 1×1 conv →
BN ("point") and a BN of the input itself ("identity", no conv).

An ACB and its NormTail are a pair built together by expand. In training the block outputs the sum of its
normalised branches and the tail passes it on (as a new tensor: the BN it replaces never returned its
input). In eval the block outputs what the single conv it collapses into outputs (the sum without its
per-channel shift) and the tail adds the shift, so that the tensor in the conv's slot and the one in the
BN's slot mean the same before and after collapse. Each of the pair can fuse itself from its own children
(``fuse()``: the conv, and the BN of the original kind holding the shift), which is what timm's
``reparameterize_model`` calls, and what :func:`acfx.collapse` uses for acfx's own blocks.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx._symbolic_trace as _fx_trace
import torch.nn as nn

from .cfg_links import restore_cfg
from .forwards import alternative_forward
from .fusion import fit, fuse_pair
from .geometry import Window
from .layout import BlockLayout, BranchLayout, layout_difference
from .linear_map import Inexact, add
from .module_copies import hollow_copy
from .norms import fusion_dtype
from .padding import crop_sides
from .recipe import MAX_BRANCHES

# ACBlock's TorchScript forward spells out the repeated k×k branches square_1 … square_7.
assert MAX_BRANCHES == 8
from .recorded_layout import RecordedLayout
from .stage_maps import branch_bias, branch_map

# True inside fx.symbolic_trace; older torch only has is_fx_tracing, which export sets too.
_symbolic_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", _fx_trace.is_fx_tracing)

__all__ = ["Branch", "ACBlock", "NormTail"]


def _sides(window: Window) -> Tuple[int, int, int, int]:
    return (window.top, window.bottom, window.left, window.right)


@dataclasses.dataclass(frozen=True)
class Branch:
    """One summed branch of a block: its layout (where it reads the shared input and sits in the kernel) and
    the modules it runs, in order, with their names in the block."""

    layout: BranchLayout
    names: Tuple[str, ...]
    modules: Tuple[nn.Module, ...]

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def conv(self) -> Optional[nn.Module]:
        """The branch's conv, when it is one conv followed by at most a BN (the ACB's branches)."""
        return self.modules[0] if self.modules and not _is_norm(self.modules[0]) else None

    @property
    def norm(self) -> Optional[nn.Module]:
        """The BN after the branch's conv (None: the conv's output is summed as it is)."""
        return self.modules[1] if len(self.modules) == 2 and _is_norm(self.modules[1]) else None

    @property
    def conv_norm(self) -> bool:
        """The branch is one conv, or one conv and the BN after it (what the stacked and recompute forwards
        compute)."""
        return self.conv is not None and len(self.modules) == (2 if self.norm is not None else 1)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class ACBlock(RecordedLayout):
    """Branches on one input, summed: ACNet's k×k, 1×k and k×1 convolutions, each with its own BN (if any).

    Built by :func:`acfx.expand` from a :class:`~acfx.layers.layout.BlockLayout` (where each branch reads and
    sits in the k×k kernel) and the modules of each branch; :func:`acfx.collapse` fuses it back into one
    convolution. ``pad`` is the padding the branches share (None when every branch pads by itself);
    ``template`` a copy without tensors of the conv the block replaces, which fusion refills.

    ``impl`` picks how the forward is computed: ``"branches"`` (the reference, as written below),
    ``"stacked"`` (one conv, one BN, one sum: :mod:`acfx.layers.stacked`) or ``"recompute"`` (the branches, keeping
    less for backward: :mod:`acfx.layers.recompute`); set it with :func:`acfx.set_exact_impl`. Tracing and
    TorchScript always see the branches.

    The ``layout`` buffer records how the branch kernels add up (offsets, even-side split, crops, padding):
    a checkpoint of a block built with other options (placement, branches, norm) is refused on loading.
    """

    __jit_unused_properties__ = ["offsets", "hor_crop", "ver_crop"]
    # Branch modules TorchScript's forward reads by name (None where the block has no such branch).
    _SCRIPTED = ("square_bn", "hor", "hor_bn", "ver", "ver_bn", "point", "point_bn", "identity_bn", "chain_pre", "chain_pre_bn",
                 "chain", "chain_bn", "avg_pre", "avg_pre_bn", "avg", "avg_bn") + tuple(
                     f"square_{i}{bn}" for i in range(1, MAX_BRANCHES) for bn in ("", "_bn"))
    __jit_ignored_attributes__ = ["plan", "_stages", "_crops"]

    def __init__(self, layout: BlockLayout, stages: Mapping[str, Sequence[Tuple[str, nn.Module]]],
                 pad: Optional[nn.Module] = None, template: Optional[nn.Module] = None) -> None:
        """``stages``: for each branch of ``layout`` (by name), its modules with their names in the block, in
        the order the branch runs them (the first branch's first module is the conv the block replaces)."""
        super().__init__()
        self.impl = "branches"
        self.pad = pad
        self.plan = layout
        # Each branch's module names in the block, in the order the branch runs them.
        names: List[Tuple[str, ...]] = []
        for branch in layout.branches:
            for name, module in stages.get(branch.name, ()):
                self.add_module(name, module)
            names.append(tuple(name for name, _ in stages.get(branch.name, ())))
        for name in self._SCRIPTED:  # TorchScript reads absent branches as None constants
            if name not in self._modules:
                setattr(self, name, None)
        # The identity branch without a BN of its own (norm="sum") adds the input as it is.
        self.plain_identity = layout.branch("identity") is not None and not stages.get("identity")
        self._stages: Tuple[Tuple[str, ...], ...] = tuple(names)
        # Each branch's crop of the shared input as (top, bottom, left, right): plain tuples, which compilers read.
        self._crops: Tuple[Tuple[int, int, int, int], ...] = tuple(_sides(b.crop) for b in layout.branches)
        # The geometry of the conv this block computes, for code that reads it off the module in the slot
        # (timm's ConvNormAct.in_channels, ...). There is no single ``weight``: see fused() / fuse().
        square = self._modules[names[0][0]]
        self.in_channels, self.out_channels = square.in_channels, square.out_channels
        self.kernel_size: Tuple[int, int] = tuple(layout.kernel_size)
        self.stride, self.dilation, self.groups = tuple(square.stride), tuple(square.dilation), square.groups
        for name in ("hor", "ver", "point", "identity", "chain", "avg") + tuple(f"square_{i}" for i in
                                                                               range(1, MAX_BRANCHES)):
            branch = layout.branch(name)
            setattr(self, name + "_sides", _sides(branch.crop) if branch is not None else (0, 0, 0, 0))
        # Outside the module tree (a tuple): not in state_dict, named_modules or .to().
        self._template = (template,) if template is not None else ()
        self._tail: tuple = ()  # the NormTail in the BN's slot, set by NormTail
        # A plain flag (compilers read it without a look at the tail): a NormTail adds the eval shift.
        self.paired = False
        self._register_layout(next((t.device for t in self.parameters()), None))

    def tail(self) -> Optional["NormTail"]:
        """The NormTail in the BN's slot after this block (None: the block's output is its own)."""
        return self._tail[0] if self._tail else None

    def unlink_tail(self) -> None:
        """Drop the links between this block and its NormTail (collapse does, once it has replaced both): they
        refer to each other, a cycle only Python's cyclic collector frees."""
        tail = self.tail()
        if tail is not None and tail.block() is self:
            tail._block = ()
        self._tail = ()

    # -- the branches -------------------------------------------------------------------------------------
    @torch.jit.unused
    def branches(self) -> List[Branch]:
        """The branches, in the order they are summed (the first holds the conv the block replaced)."""
        return [Branch(layout, names, tuple(self._modules[n] for n in names))
                for layout, names in zip(self.plan.branches, self._stages)]

    def primary_conv(self) -> nn.Module:
        """The conv of the first branch: the one that shares the replaced conv's weight."""
        return self._modules[self._stages[0][0]]

    def primary_norm(self) -> Optional[nn.Module]:
        """The BN of the first branch (it shares the replaced BN's parameters and statistics), if any."""
        names = self._stages[0]
        return self._modules[names[1]] if len(names) > 1 else None

    def has_norms(self) -> bool:
        """Whether the branches have BNs of their own (norm="branch"), read off the first branch."""
        return len(self._stages[0]) > 1

    @property
    def offsets(self) -> Dict[str, Tuple[int, int]]:
        """(row, column) of each branch's kernel in the k×k kernel."""
        return self.plan.offsets

    @property
    def hor_crop(self) -> Window:
        return self.plan.branch("hor").crop if self.plan.branch("hor") else Window()

    @property
    def ver_crop(self) -> Window:
        return self.plan.branch("ver").crop if self.plan.branch("ver") else Window()

    def branch_names(self) -> List[str]:
        return [branch.name for branch in self.plan.branches]

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return self._eager_forward(x)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branches written out for TorchScript, which cannot iterate named children nor pass modules."""
        if self.pad is not None:
            x = self.pad(x)
        out = self.square(x)
        if self.square_bn is not None:
            out = self.square_bn(out)
        if self.square_1 is not None:
            y = self.square_1(crop_sides(x, self.square_1_sides))
            if self.square_1_bn is not None:
                y = self.square_1_bn(y)
            out = out + y
        if self.square_2 is not None:
            y = self.square_2(crop_sides(x, self.square_2_sides))
            if self.square_2_bn is not None:
                y = self.square_2_bn(y)
            out = out + y
        if self.square_3 is not None:
            y = self.square_3(crop_sides(x, self.square_3_sides))
            if self.square_3_bn is not None:
                y = self.square_3_bn(y)
            out = out + y
        if self.square_4 is not None:
            y = self.square_4(crop_sides(x, self.square_4_sides))
            if self.square_4_bn is not None:
                y = self.square_4_bn(y)
            out = out + y
        if self.square_5 is not None:
            y = self.square_5(crop_sides(x, self.square_5_sides))
            if self.square_5_bn is not None:
                y = self.square_5_bn(y)
            out = out + y
        if self.square_6 is not None:
            y = self.square_6(crop_sides(x, self.square_6_sides))
            if self.square_6_bn is not None:
                y = self.square_6_bn(y)
            out = out + y
        if self.square_7 is not None:
            y = self.square_7(crop_sides(x, self.square_7_sides))
            if self.square_7_bn is not None:
                y = self.square_7_bn(y)
            out = out + y
        if self.hor is not None:
            y = self.hor(crop_sides(x, self.hor_sides))
            if self.hor_bn is not None:
                y = self.hor_bn(y)
            out = out + y
        if self.ver is not None:
            y = self.ver(crop_sides(x, self.ver_sides))
            if self.ver_bn is not None:
                y = self.ver_bn(y)
            out = out + y
        if self.point is not None:
            y = self.point(crop_sides(x, self.point_sides))
            if self.point_bn is not None:
                y = self.point_bn(y)
            out = out + y
        if self.identity_bn is not None:
            out = out + self.identity_bn(crop_sides(x, self.identity_sides))
        elif self.plain_identity:
            out = out + crop_sides(x, self.identity_sides)
        if self.chain is not None:
            y = self.chain_pre(crop_sides(x, self.chain_sides))
            if self.chain_pre_bn is not None:
                y = self.chain_pre_bn(y)
            y = self.chain(y)
            if self.chain_bn is not None:
                y = self.chain_bn(y)
            out = out + y
        if self.avg is not None:
            y = self.avg_pre(crop_sides(x, self.avg_sides))
            if self.avg_pre_bn is not None:
                y = self.avg_pre_bn(y)
            y = self.avg(y)
            if self.avg_bn is not None:
                y = self.avg_bn(y)
            out = out + y
        return out

    @torch.jit.unused
    def _branch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward: each branch on its crop of the shared input, summed."""
        if self.pad is not None:
            x = self.pad(x)
        out: Optional[torch.Tensor] = None
        for sides, names in zip(self._crops, self._stages):
            y = crop_sides(x, sides)
            for name in names:
                y = self._modules[name](y)
            out = y if out is None else out + y
        return out

    @torch.jit.unused
    def conv_norm_pairs(self) -> Optional[List[Tuple[Tuple[int, int, int, int], nn.Module, Optional[nn.Module]]]]:
        """(crop sides, conv, BN or None) of each branch when every branch is a conv and at most a BN (what the
        stacked and recompute forwards compute); None otherwise. Plain tuples: compilers read them."""
        pairs = []
        for sides, names in zip(self._crops, self._stages):
            modules = [self._modules[name] for name in names]
            if not modules or _is_norm(modules[0]) or len(modules) > 2 or (len(modules) == 2 and not _is_norm(modules[1])):
                return None
            pairs.append((sides, modules[0], modules[1] if len(modules) == 2 else None))
        return pairs

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if _symbolic_tracing():
            return self._branch_forward(x)  # collapse and fx tools see the branches
        other = alternative_forward(self) if self.impl != "branches" else None
        out = other(self, x) if other is not None else self._branch_forward(x)
        if not self.training and self.paired:
            # the NormTail after the block adds it back; in the output's dtype (a BN in float32 after a half
            # conv gives a half output)
            out = out - self.eval_shift().to(out.dtype).view(1, -1, 1, 1)
        return out

    # -- fusion -------------------------------------------------------------------------------------------
    @torch.jit.unused
    def fused(self, prefix: str = "") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(kernel, bias) of the one conv this block computes in eval, in the fusion dtype (float64)."""
        primary = self.primary_conv()
        like = torch.empty(0, dtype=fusion_dtype(primary.weight.device), device=primary.weight.device)
        with torch.no_grad():
            maps = []
            for branch in self.branches():
                found = branch_map(branch.modules, [f"{prefix}{n}" for n in branch.names], branch.layout.crop,
                                   self.in_channels, like)
                if isinstance(found, Inexact):
                    raise _changed_block(f"its branch {prefix}{branch.name} is not a linear map ({found.reason})",
                                         prefix)
                maps.append(found)
            summed = add(maps)
            if not isinstance(summed, Inexact):
                summed = fit(summed, self.kernel_size, self.plan.fused_window)
            if isinstance(summed, Inexact):
                raise _changed_block(f"its branches do not add up to one conv ({summed.reason})", prefix)
        return summed.kernel, summed.bias

    def eval_shift(self) -> torch.Tensor:
        """The per-channel shift of the eval output [C_out] (the bias of the one conv the branches make), in the
        block's dtype. Plain tensor arithmetic, so that export and compile see through it: Σ β − (μ − b)·γ/σ
        over conv(→BN) branches; a longer branch (DBB's) gives the bias of its map."""
        primary = self.primary_conv()
        shift = torch.zeros_like(primary.weight[:, 0, 0, 0])
        for names, crop in zip(self._stages, self.plan.branches):
            modules = [self._modules[name] for name in names]
            if len(modules) > 2 or (len(modules) == 2 and _is_norm(modules[0])):
                found = branch_bias(modules, names, self.in_channels, primary.weight)
                if isinstance(found, Inexact):
                    raise _changed_block(f"its branch {'→'.join(names)} is not a linear map ({found.reason})", "")
                shift = shift + found
                continue
            conv = modules[0] if modules and not _is_norm(modules[0]) else None
            norm = modules[-1] if modules and _is_norm(modules[-1]) else None
            bias = conv.bias if conv is not None else None
            if norm is None:
                if bias is not None:
                    shift = shift + bias
                continue
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            mean = norm.running_mean if bias is None else norm.running_mean - bias
            shift = shift - mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
        return shift

    def fuse(self) -> nn.Module:
        """The conv this block becomes in eval (with :class:`NormTail.fuse` in the BN's slot: the original pair).

        The hook ``timm.utils.reparameterize_model`` calls, so timm's ``--reparam`` collapses acfx models into
        the original architecture; :func:`acfx.collapse` does the same.
        """
        conv, _ = fuse_pair(self)
        restore_cfg(self)
        return conv

    def template(self) -> Optional[nn.Module]:
        return self._template[0] if self._template else None

    # -- checkpoints --------------------------------------------------------------------------------------
    def layout_values(self) -> List[int]:
        """How the branch kernels add up (BlockLayout.record), saved as the ``layout`` buffer."""
        return self.plan.record({branch.name: bool(branch.modules) and _is_norm(branch.modules[-1])
                                 for branch in self.branches()})

    def layout_problem(self, saved: torch.Tensor) -> Optional[str]:
        return layout_difference(saved, torch.tensor(self.layout_values()))

    def extra_repr(self) -> str:
        kinds = self.branch_names()[1:]
        return f"branches={kinds}, bn_per_branch={self.has_norms()}"


def _changed_block(what: str, prefix: str) -> ValueError:
    """The error for a block whose branches are not what expand built: a module of it was replaced since."""
    where = f"the ACBlock at '{prefix[:-1]}'" if prefix else "an ACBlock"
    return ValueError(f"acfx: {where} cannot be fused: {what}. expand builds every branch as a linear map of the "
                      "block's window; if a module of the block was replaced after expand, put back one of the same "
                      "kind and geometry (or load the trained state_dict into a freshly expanded model and collapse "
                      "that); otherwise this is a bug in acfx, please report it")


class NormTail(nn.Module):
    """What stays in a BatchNorm's slot once expand moved its normalisation into the ACB before it.

    For timm's norm-act layers that is the drop and the activation they apply after normalising; for a
    plain BN nothing else. It returns a new tensor (as the BN did), adds the block's shift in eval (see the
    module docstring), and remembers the BN's class and configuration (a copy without parameters, outside
    the module tree) so that collapse can put back a BN of the same kind.
    """

    __jit_unused_properties__ = ["norm_type"]

    def __init__(self, norm: nn.Module, children: Dict[str, nn.Module], block: Optional[ACBlock] = None) -> None:
        super().__init__()
        for name in ("drop", "act"):
            if name in children:
                self.add_module(name, children[name])
            else:
                setattr(self, name, None)  # TorchScript reads these as constants
        # Tuples keep the template and the block out of named_modules(), state_dict() and .to().
        self._norm_template = (hollow_copy(norm),)
        self._block = (block,) if block is not None else ()
        if block is not None:
            block._tail = (self,)
            block.paired = True

    @property
    def norm_type(self) -> type:
        return type(self._norm_template[0])

    def block(self) -> Optional[ACBlock]:
        return self._block[0] if self._block else None

    def restore(self, params: Dict[str, torch.Tensor], training: bool,
                requires_grad: bool) -> nn.Module:
        """A BN of the original kind holding ``params`` (weight, bias, running_mean, running_var,
        num_batches_tracked), with this tail's drop/act as its children."""
        norm = hollow_copy(self._norm_template[0])
        for name in ("weight", "bias"):
            norm.register_parameter(name, nn.Parameter(params[name], requires_grad)
                                    if name in params else None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            norm.register_buffer(name, params[name])
        for name, child in self.named_children():
            norm.add_module(name, child)
        norm.train(training)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = x.clone()
        else:
            x = self._take(x)
        if self.drop is not None:
            x = self.drop(x)
        if self.act is not None:
            x = self.act(x)
        return x

    @torch.jit.unused
    def _take(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block()
        if block is None or block.training or _symbolic_tracing():
            return x.clone()
        return x + block.eval_shift().to(x.dtype).view(1, -1, 1, 1)  # in x's dtype, as a BN gives

    def fuse(self) -> nn.Module:
        """The BN of the original kind this slot holds again once its block is fused (its ``fuse()``)."""
        _, norm = fuse_pair(self.block())
        if norm is None:
            raise ValueError("acfx: this NormTail has no block to fuse with (built by an older acfx); use "
                             "acfx.collapse on the whole model")
        return norm


    def extra_repr(self) -> str:
        return f"was={self.norm_type.__name__}"
