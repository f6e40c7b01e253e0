"""torch.fx tracing of user models, whole or in the largest parts that trace, leaving no trace in them.

acfx uses the graph only to find patterns; it never hands a GraphModule back. Convs and BatchNorms are
always leaves (so they show up as module calls, custom subclasses included), and so are timm's own leaf
modules and functions when timm is installed, and the user's leaf modules.

Tracing runs a model's forward on Proxies, and user code keeps what it is given: a forward that caches
its input, a feature hook that stores its output (timm's FeatureHooks) would keep Proxies in the user's
model. So the model traced is a skeleton copy (new module objects sharing the tensors), and module hooks
do not run while tracing. What hooks would have observed counts as used, though: a value only a feature
hook reads is still part of what the model computes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions, get_notrace_modules

from ..layers.convs import conv_kind, extra_state, instance_override
from ..layers.hooks import hooks_of
from ..layers.module_copies import copy_modes
from ..layers.norms import is_batch_norm
from .border_writes import AssignableProxy, fold_border_writes
from .known_layers import bias_padded_norm
from .untraced_reach import Reach, reach_of, reach_reason

__all__ = ["AcfxTracer", "TracedPart", "UntracedPart", "trace_parts", "live_nodes", "module_calls",
           "shared_module_names", "tied_tensor_names", "mutates"]

# (number of positional arguments, keyword names) of one module call.
CallForm = Tuple[int, Tuple[str, ...]]


def _timm_leaves() -> Tuple[Tuple[type, ...], Tuple]:
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


def _proxies_in(value) -> List[fx.Proxy]:
    if isinstance(value, fx.Proxy):
        return [value]
    if isinstance(value, (tuple, list)):
        return [p for v in value for p in _proxies_in(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _proxies_in(v)]
    return []


class AcfxTracer(fx.Tracer):
    """An fx tracer with acfx's, timm's and the user's leaf modules, that runs no module hooks and records
    the values the hooks would have observed (``observed``)."""

    def __init__(self, leaf_types: Sequence[Type[nn.Module]] = (),
                 opaque_types: Sequence[Type[nn.Module]] = (), read_layers: bool = False) -> None:
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(leaf_types) + timm_modules
        # timm's own leaves (not acfx's, not the caller's): called as modules, but collapse reads their insides
        # as parts of their own (see trace_parts).
        own = tuple(leaf_types) + tuple(opaque_types)
        self.timm_leaves = tuple(t for t in timm_modules if not any(issubclass(t, o) for o in own))
        # Traced through even when timm or the user names them as leaves.
        self.opaque_types = tuple(opaque_types)
        # collapse reads layers: a conv subclass whose forward acfx does not know is traced into (DBB's
        # identity-based 1x1 computes its kernel there), and layers that do not trace but that acfx knows the
        # computation of (DBB's BNAndPadLayer, known_layers.py) are leaves.
        self.read_layers = read_layers
        self.observed: Set[fx.Node] = set()
        # How each module (qualified name) was called, leaves and traced-through modules alike.
        self.call_forms: Dict[str, List[CallForm]] = {}

    def trace(self, root, concrete_args=None):
        if self.read_layers and isinstance(root, nn.Module):
            for module in root.modules():  # recognised before tracing patches nn.Module calls (it runs them)
                bias_padded_norm(module)
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        # collapse reads item assignments (border_writes.py); expand's sites never see one
        return AssignableProxy(node, self) if self.read_layers else super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.opaque_types and isinstance(m, self.opaque_types):
            return False
        if self.read_layers and isinstance(m, nn.Conv2d) and conv_kind(m) is None and _traceable_conv(m):
            return False
        if self.read_layers and bias_padded_norm(m) is not None:
            return True
        if isinstance(m, (nn.Conv2d,) + self.leaf_types) or is_batch_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def reads_into(self, m: nn.Module) -> bool:
        """Whether ``m``, a leaf of this trace, is traced as a part of its own too (collapse reads layers: a
        timm leaf with convs inside, whose forward fx cannot trace as part of the model's, e.g. a shape-
        dependent window attention)."""
        return self.read_layers and isinstance(m, self.timm_leaves) and not isinstance(m, nn.Conv2d) and \
            not is_batch_norm(m) and any(isinstance(c, nn.Conv2d) for c in m.modules())

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:  # a module outside the traced hierarchy
            path = None
        if path is not None:
            self.call_forms.setdefault(path, []).append((len(args), tuple(sorted(kwargs))))
        hooks = hooks_of(m)
        if not (hooks.forward_pre or hooks.forward):
            return super().call_module(m, forward, args, kwargs)
        # The module's own forward, without its hooks (they would be handed Proxies).
        out = super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)
        self.observed.update(p.node for p in _proxies_in((args, kwargs, out)))
        return out


def _traceable_conv(conv: nn.Module) -> bool:
    """A conv subclass with a forward of its own, whose parameters and children are a conv's (its forward is
    then the whole story, and tracing it shows what it computes)."""
    return type(conv).forward is not nn.Conv2d.forward and not extra_state(conv) and not instance_override(conv)


@dataclasses.dataclass
class TracedPart:
    """A submodule that traced: its qualified name in the model ("" for the model), the module (the user's,
    not the copy that was traced) and its graph."""

    name: str
    module: nn.Module
    graph: fx.Graph
    # Nodes that hooks would observe: used, even where nothing in the graph uses them.
    observed: Set[fx.Node] = dataclasses.field(default_factory=set)
    # How each module (name relative to the part) was called.
    call_forms: Dict[str, List[CallForm]] = dataclasses.field(default_factory=dict)
    # Tensors the forward computed outside the graph and uses as constants (e.g. a view of a BN buffer).
    constants: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    _live: Optional[Set[fx.Node]] = dataclasses.field(default=None, repr=False)

    def attribute(self, target: str):
        """What a ``get_attr`` target of the graph names: a constant of the trace, else the module's attribute."""
        if target in self.constants:
            return self.constants[target]
        obj = self.module
        for name in target.split("."):
            obj = getattr(obj, name)
        return obj

    def qualify(self, target: str) -> str:
        """The name in the whole model of a module the part's graph calls as ``target``."""
        if not target:
            return self.name
        return f"{self.name}.{target}" if self.name else target

    @property
    def live(self) -> Set[fx.Node]:
        """Nodes the output, a hook or an in-place operation depends on, computed once."""
        if self._live is None:
            modules = dict(self.module.named_modules())
            mutating = {n for n in self.graph.nodes if mutates(n, modules)}
            self._live = live_nodes(self.graph, self.observed | mutating)
        return self._live

    def call_form_reason(self, target: str) -> Optional[str]:
        """Why the module ``target`` (relative to the part) is not called as ``module(x)`` (None: it is)."""
        for count, keywords in self.call_forms.get(target, ()):
            if keywords:
                return f"called with keyword arguments {list(keywords)}; acfx rewrites calls of the form module(x)"
            if count != 1:
                return f"called with {count} positional arguments; acfx rewrites calls of the form module(x)"
        return None

    def use_reason(self, target: str, owners: Sequence, fused: Set[fx.Node] = frozenset()) -> Optional[str]:
        """Why module ``target`` (relative to the part) may be used other than by its calls ``module(x)`` in
        the graph: another call form, a direct read of its tensors, or code tracing does not see reaching it
        (``owners``: untraced parts and hook owners, see untraced_reach). Reads among ``fused`` (nodes a fusion
        replaces with everything that uses them) are not other uses."""
        return (self.call_form_reason(target) or self.attribute_reason(target, fused)
                or reach_reason(self.qualify(target), self.module.get_submodule(target), owners))

    def attribute_reason(self, target: str, fused: Set[fx.Node] = frozenset()) -> Optional[str]:
        """Why code of the part reads the parameters or buffers of module ``target`` directly (None: it does not)."""
        prefix = f"{target}."
        read = sorted({n.target for n in self.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)
                       and n not in fused and n.users})  # a read nothing uses computes nothing
        if read:
            return (f"the forward reads {self.qualify(read[0])} directly, which the rewritten module does not hold "
                    "under that name")
        module = self.module.get_submodule(target)
        own = {_storage(t) for t in list(module.parameters()) + list(module.buffers())} - {None}
        if any(_storage(t) in own for t in self.constants.values()):
            return "the forward reads a parameter or buffer of it directly, which the rewritten module does not hold"
        return None


@dataclasses.dataclass
class UntracedPart:
    """A submodule that did not trace (and whose children were traced instead, where they could be)."""

    name: str
    error: str
    # What its code may reach below its children (untraced_reach).
    reach: Reach = Reach()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def skeleton_copy(root: nn.Module) -> Optional[nn.Module]:
    """New module objects with the same structure, attributes and hooks, sharing every tensor (nothing is
    copied that holds data); None if the model cannot be copied."""
    memo = {id(t): t for t in root.state_dict(keep_vars=True).values()}
    for module in root.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                memo[id(tensor)] = tensor
    try:
        copied = copy.deepcopy(root, memo)
    except Exception:  # any object deepcopy refuses: trace the model itself, with its state restored after
        return None
    return copied if copy_modes(root, copied) else None


class _RestoreState:
    """Puts back every module's attributes as they were before tracing (when no copy could be traced)."""

    def __init__(self, root: nn.Module) -> None:
        self.saved = [(m, dict(m.__dict__)) for m in root.modules()]

    def __enter__(self) -> "_RestoreState":
        return self

    def __exit__(self, *exc) -> None:
        for module, state in self.saved:
            if module.__dict__ != state:
                module.__dict__.clear()
                module.__dict__.update(state)


def trace_parts(root: nn.Module, make_tracer, skip: Tuple[type, ...] = (), training: Optional[bool] = None
                ) -> Tuple[List[TracedPart], List[UntracedPart]]:
    """Trace ``root``; where a module does not trace, trace its children instead, recursively.

    ``make_tracer()`` returns a fresh tracer per attempt. Modules of a ``skip`` type are not descended into.
    A leaf module the tracer reads into (``AcfxTracer.reads_into``) is traced as a part of its own as well:
    called as one module from the graph around it, read inside as a model of its own.
    ``training``: the mode to trace in (fx records one path of a forward that branches on self.training);
    None for the model's own. The graphs are of a skeleton copy of ``root``; the parts name ``root``'s own
    modules, whose mode is left as it was.
    """
    traced: List[TracedPart] = []
    untraced: List[UntracedPart] = []
    copied = skeleton_copy(root)
    subject = copied if copied is not None else root
    real = dict(root.named_modules(remove_duplicate=False))  # a module under two names is at both

    def visit(name: str, module: nn.Module) -> None:
        tracer = make_tracer()
        try:
            if "forward" in module.__dict__:  # fx would trace the class's forward, not the one that runs
                raise _NotTraceable("its forward is replaced on the instance; fx traces the class's forward")
            graph = tracer.trace(module)
            fold_border_writes(graph)
        except Exception as error:  # any failure of symbolic tracing means: try the children
            reach = reach_of(root, name)
            untraced.append(UntracedPart(name, _first_line(error), reach))
            for child_name, child in _children(module, reach, _path(name)):
                if not isinstance(child, skip) and not tracer.is_leaf_module(child, child_name):
                    visit(f"{name}.{child_name}" if name else child_name, child)
            return
        constants = {n.target: getattr(tracer.root, n.target) for n in graph.nodes
                     if n.op == "get_attr" and n.target.startswith("_tensor_constant")}
        traced.append(TracedPart(name, real[name], graph, set(tracer.observed), dict(tracer.call_forms),
                                 {k: v for k, v in constants.items() if isinstance(v, torch.Tensor)}))
        # A leaf the tracer reads into is a part of its own (each once, however often it is called).
        for target in dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"):
            inner = module.get_submodule(target)
            if tracer.reads_into(inner) and not isinstance(inner, skip):
                visit(f"{name}.{target}" if name else target, inner)

    with _RestoreState(root) if copied is None else contextlib.nullcontext():
        if training is not None:  # the flag itself: a train() the user overrode may act on shared tensors
            for module in subject.modules():
                if copied is not None and module.training != training:
                    _switch_dual_graph(module, training)
                module.training = training
        try:
            visit("", subject)
        finally:
            visit = None  # noqa: F841 (a recursive closure is a cycle holding ``real``, every module of root)
            if copied is not None:
                _drop_tensors(copied)
    return traced, untraced


def _drop_tensors(copied: nn.Module) -> None:
    """Empty a traced skeleton copy of the tensors it shares with the model. The copy is garbage once traced,
    but a cycle in it (an ACBlock and its NormTail refer to each other; so may a model's own modules) would
    keep them, the model's weights, from being freed until Python's cyclic collector runs: after a pass that
    replaced them, a second model's worth of memory (GPU memory included)."""
    for module in copied.modules():
        module._parameters.clear()
        module._buffers.clear()


def _switch_dual_graph(module: nn.Module, training: bool) -> None:
    """torchvision's feature extractors (DualGraphModule) run another graph in each mode: their train()
    swaps ``graph``. On the traced copy (a class of its own, as every GraphModule has) the swap is done here,
    since train() itself is never called."""
    graphs = vars(module)
    if isinstance(module, fx.GraphModule) and isinstance(graphs.get("train_graph"), fx.Graph) \
            and isinstance(graphs.get("eval_graph"), fx.Graph):
        module.graph = graphs["train_graph"] if training else graphs["eval_graph"]


def _storage(tensor: torch.Tensor) -> Optional[int]:
    """Where a tensor's data lives (None on the meta device, where nothing does)."""
    if tensor.device.type == "meta":
        return None
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


def _path(name: str) -> Tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


def _children(module: nn.Module, reach: Reach, path: Tuple[str, ...]) -> List[Tuple[str, nn.Module]]:
    """The children to trace when ``module`` does not, as its code uses them: a ModuleList or ModuleDict has
    no forward of its own (fx counts it a leaf, being torch.nn's), and a Sequential whose items the code
    calls one by one but never itself (YOLO's layer loop, each layer fed other layers' outputs) does not run
    its own forward either: their items stand in for them."""
    found = []
    for name, child in module.named_children():
        own = path + (name,)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or \
                isinstance(child, nn.Sequential) and reach.uses_items_only(own):
            found += [(f"{name}.{item_name}", item) for item_name, item in _children(child, reach, own)]
        else:
            found.append((name, child))
    return found


class _NotTraceable(Exception):
    pass


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


@functools.lru_cache(maxsize=None)
def _signature_with_inplace(function) -> Optional[inspect.Signature]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    return signature if "inplace" in signature.parameters else None


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        signature = _signature_with_inplace(node.target)
        bound = signature.bind_partial(*node.args, **node.kwargs) if signature is not None else None
    except TypeError:  # unhashable target, or arguments the signature does not take
        return False
    return bound is not None and bound.arguments.get("inplace") is True


_INPLACE_DUNDERS = {f"__i{name}__" for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                                   "or", "xor", "lshift", "rshift", "matmul")} | {"__setitem__"}
# Calls whose result may go unused without any effect: queries of a tensor, slices, fx's assertions.
_QUERY_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "type", "element_size", "nelement",
                  "get_device", "data_ptr"}
_QUERY_FUNCTIONS = {getattr, operator.getitem, len, isinstance, torch._assert}


def mutates(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into a tensor in place (its effect counts even where its result is unused).

    Explicit in-place calls (``relu_``, ``inplace=True``, ``out=``, ``__iadd__``), and any call whose result
    nothing uses while it takes a value of the graph: code calls those for an effect. fx records ``t += 1``
    on a tensor as an ``add`` whose result replaces ``t``, and an opaque function (fx.wrap, a leaf module)
    may write into its argument; only queries (``x.size()``, ``x.shape``, an unused slice) are known pure.
    """
    if node.op not in ("call_method", "call_function", "call_module"):
        return False
    if "out" in node.kwargs:
        return True
    if node.op == "call_method":
        if node.target in _INPLACE_DUNDERS or (node.target.endswith("_") and not node.target.startswith("_")):
            return True
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if (name.endswith("_") and not name.startswith("_")) or _inplace_flag(node):
            return True
    elif getattr(modules.get(node.target), "inplace", False) is True:
        return True
    return not node.users and bool(node.all_input_nodes) and not _pure_query(node)


def _pure_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _QUERY_METHODS
    if node.op == "call_function":
        try:
            return node.target in _QUERY_FUNCTIONS
        except TypeError:  # an unhashable target
            return False
    return False


def live_nodes(graph: fx.Graph, roots: Iterable[fx.Node] = ()) -> Set[fx.Node]:
    """Nodes the output or ``roots`` depend on (tracing keeps dead nodes, e.g. an unused slice)."""
    stack: List[fx.Node] = [n for n in graph.nodes if n.op == "output"] + list(roots)
    seen: Set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def module_calls(graph: fx.Graph) -> dict:
    """How many times each module target is called in ``graph``."""
    counts: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def tied_tensor_names(root: nn.Module) -> Dict[str, List[str]]:
    """Modules holding a parameter or buffer that another module holds too (tied weights): qualified name ->
    the names of the other holders."""
    holders: Dict[int, List[str]] = {}
    for name, module in root.named_modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                holders.setdefault(id(tensor), []).append(name)
    tied: Dict[str, List[str]] = {}
    for names in holders.values():
        for name in set(names) if len(set(names)) > 1 else ():
            tied.setdefault(name, []).extend(other for other in names if other != name and other not in tied[name])
    return tied


def shared_module_names(root: nn.Module) -> dict:
    """Names of modules registered under more than one name: qualified name -> all its names."""
    names: dict = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {name: group for group in names.values() if len(group) > 1 for name in group}
