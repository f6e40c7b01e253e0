"""Find the re-parameterisable blocks of a traced graph: regions that are one linear map of one input.

Every node is given the node it is a linear function of (its *source*, linear_ops.py): a linear op of
inputs that share one source has that source too; anything else is its own source. A region is the set of
linear nodes that lead from a source to a node no linear user continues (its *output*). It is a block
worth fusing when it sums linear forms of its source (RepVGG, DBB, MobileOne, ACNet written by hand), or
computes a conv weight from parameters at every forward (OREPA). Plain conv → BN chains, and constant adds
and scales around a conv with no sum (YOLOv7's implicit layers, a layer scale), are the model's own
architecture: regions only with ``affine_chains`` (collapse's ``fold_bn``, the deploy form).

Each region is returned as a complete record: its nodes, in graph order, and the module whose forward
holds it, or with the reason it cannot become one conv (its values used outside it, no conv in it).
Matching only: no tensor is read here.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .linear_ops import LinearOp, constant_nodes, linear_op
from .module_stacks import call_keys, common_prefix
from .tracing import mutates

__all__ = ["LinearRegion", "find_linear_regions"]

_CONVS = ("conv", "function_conv", "unknown_conv")
# Ops that make a chain of convs and norms a re-parameterisation (not the original architecture): a sum its
# author wrote (a shift by 0 is one: "0 + branch"). A constant shift or scale alone (YOLOv7's implicit layers,
# a layer scale, Inception-ResNet's residual scale) is the model's own architecture, folded only on request.
_SUMS = ("add", "sub")
_AFFINE = ("shift", "scale")


def _reparam(op: LinearOp, affine_chains: bool) -> bool:
    """Whether ``op`` makes its region a re-parameterisation (``affine_chains``: constant shifts and scales
    too, collapse's fold_bn)."""
    if op.kind in _SUMS:
        return True
    if op.kind == "shift" and isinstance(op.constant, (int, float)) and op.constant == 0:
        return True
    return affine_chains and op.kind in _AFFINE


@dataclasses.dataclass(frozen=True)
class LinearRegion:
    """A region of linear nodes from ``source`` to ``output`` (see the module docstring)."""

    source: fx.Node
    output: fx.Node
    # The region's nodes in graph order, and their linear ops.
    nodes: Tuple[fx.Node, ...]
    ops: Tuple[LinearOp, ...]
    # Constant nodes the region reads (weights computed from parameters), in graph order.
    constants: Tuple[fx.Node, ...]
    # Why the region cannot be fused (None: it can, as far as the graph shows).
    reason: Optional[str] = None

    @property
    def node_set(self) -> FrozenSet[fx.Node]:
        return frozenset(self.nodes)

    def modules(self) -> List[nn.Module]:
        return [op.module for op in self.ops if op.module is not None]

    @property
    def conv_count(self) -> int:
        return sum(op.kind in _CONVS for op in self.ops)


def _frame(node: fx.Node) -> Tuple[str, ...]:
    """The module calls whose forward ran ``node`` (a leaf module's call: those of its caller)."""
    keys = tuple(node.meta.get("nn_module_stack", {}))
    if node.op == "call_module" and keys and node.meta["nn_module_stack"][keys[-1]][0] == node.target:
        keys = keys[:-1]
    return keys


def _nested(a: Tuple[str, ...], b: Tuple[str, ...]) -> bool:
    shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
    return longer[:len(shorter)] == shorter


def _sources(graph: fx.Graph, ops: Dict[fx.Node, LinearOp]) -> Dict[fx.Node, fx.Node]:
    """Each node's source. A value that leaves one module's forward for a sibling's (one block's output read by
    the next block) starts a new form there: each block is fused on its own, as the model is written."""
    frames = {node: _frame(node) for node in graph.nodes}
    # A value some linear user reads in a frame that is neither inside nor around the one that computed it is a
    # source for all its users (each sees the same form of it).
    boundary = {i for node, op in ops.items() for i in op.inputs if not _nested(frames[i], frames[node])}
    source: Dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        op = ops.get(node)
        if op is None:
            source[node] = node
            continue
        found = {i if i in boundary else source.get(i, i) for i in op.inputs}
        source[node] = found.pop() if len(found) == 1 else node
    return source


def _ancestors(output: fx.Node, source: fx.Node, sources: Dict[fx.Node, fx.Node], ops: Dict[fx.Node, LinearOp]
               ) -> Set[fx.Node]:
    """The linear nodes of source ``source`` that ``output`` is computed from."""
    found: Set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in found or node is source or sources.get(node) is not source or node not in ops:
            continue
        found.add(node)
        stack.extend(ops[node].inputs)
    return found


def _worth_fusing(ops: List[LinearOp], constants: List[fx.Node], affine_chains: bool) -> bool:
    if not any(op.kind in _CONVS for op in ops):
        return False
    computed = any(c.op != "get_attr" for c in constants)
    return computed or any(_reparam(op, affine_chains) for op in ops)


def _constants_of(nodes: Set[fx.Node], constant: FrozenSet[fx.Node]) -> Set[fx.Node]:
    """The constant nodes the region reads, with the constant nodes they are computed from."""
    found: Set[fx.Node] = set()
    stack = [i for n in nodes for i in n.all_input_nodes if i in constant]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(i for i in node.all_input_nodes if i in constant)
    return found


def _written(nodes: Set[fx.Node], source: fx.Node, output: fx.Node, mutating: Set[fx.Node]) -> Optional[str]:
    """Why an in-place op changes what the region reads (its input, or a value inside it) unseen by the map (an
    activation writing into the region's output in place writes into the fused conv's output alike)."""
    for node in mutating:
        if node in nodes:
            target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if target is source or target is not None and any(u is not node for u in target.users):
                return f"{node.name} changes {target.name} in place, which other code reads too"
            continue
        touched = [i for i in node.all_input_nodes if (i in nodes or i is source) and i is not output]
        if touched:
            return f"{node.name} changes {touched[0].name} in place (or may: its result is unused), unseen by one conv"
    return None


def _escape(nodes: Set[fx.Node], output: fx.Node, live: Set[fx.Node]) -> Optional[str]:
    for node in nodes:
        if node is output:
            continue
        outside = [u for u in node.users if u in live and u not in nodes]
        if outside:
            return (f"{node.name} is also used outside the sum ({outside[0].name}): fusing it away would break that "
                    "use")
    return None


def _anchors(ops: List[LinearOp], constants: Set[fx.Node], affine_chains: bool) -> List[fx.Node]:
    """The nodes that make a region a re-parameterisation: sums (constant shifts and scales with
    ``affine_chains``), convs of a weight the forward computes."""
    return [op.node for op in ops if _reparam(op, affine_chains)
            or op.kind == "function_conv" and op.constant in constants and op.constant.op != "get_attr"]


def _within(members: Set[fx.Node], anchors: List[fx.Node]) -> Set[fx.Node]:
    """The members inside the innermost module that runs all the anchors (a block's region stops at its
    boundary: what computes its input is the model's own, what follows its output too)."""
    common = common_prefix([call_keys(a) for a in anchors])
    if not common:
        return set(members)
    key = common[-1]
    return {m for m in members if key in m.meta.get("nn_module_stack", {})}


def _focus(inside: Set[fx.Node], anchors: List[fx.Node], ops) -> Set[fx.Node]:
    """The block's linear part: what its sums (and other anchors) are computed from, and after them the affine
    ops of the same forward (a BN after the sum: QARepVGG, ultralytics' Conv2), up to the next conv or the end
    of that forward. A linear value the block hands on to the next module is that module's input, not part of
    the block (GhostNetV3: the depthwise sum, then the second ghost module)."""
    core: Set[fx.Node] = set()
    stack = [a for a in anchors if a in inside]
    while stack:
        node = stack.pop()
        if node in core or node not in inside:
            continue
        core.add(node)
        stack.extend(ops[node].inputs)
    frames = [_frame(a) for a in anchors if a in inside]
    common = min(frames, key=len) if frames else ()
    tail: Set[fx.Node] = set()
    pending = list(core)
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in inside and user not in core and user not in tail and ops[user].kind not in _CONVS \
                    and _frame(user)[:len(common)] == common and all(i in core or i in tail for i in ops[user].inputs):
                tail.add(user)
                pending.append(user)
    return core | tail


def _upstream(starts, members: Set[fx.Node], ops, stop: Optional[fx.Node] = None) -> Set[fx.Node]:
    """The members ``starts`` are computed from (themselves included), not walking past ``stop``."""
    found: Set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in found or node is stop or node not in members:
            continue
        found.add(node)
        stack.extend(ops[node].inputs)
    return found


def _fork(group: List[fx.Node], anchor: fx.Node, members: Set[fx.Node], ops, order) -> Optional[fx.Node]:
    """The value of a finished block that every branch of a later sum goes through (the later block's input),
    or None when the later sum is part of the same block (a nested sum, or a branch computing its kernel)."""
    done = _upstream(group, members, ops)
    reached = _upstream([anchor], members, ops)
    candidates = sorted((n for n in reached if n not in done or n in group), key=order.__getitem__, reverse=True)
    for candidate in candidates:
        if candidate is anchor:
            continue
        restricted = _upstream([anchor], members, ops, stop=candidate)
        if {i for n in restricted for i in ops[n].inputs if i not in restricted} == {candidate} and \
                _upstream([candidate], members, ops) >= done:
            return candidate
    return None


def _groups(members: Set[fx.Node], anchors: List[fx.Node], ops, order) -> List[Tuple[List[fx.Node], Optional[fx.Node]]]:
    """The anchors split into blocks that follow one another (each with the value it starts from, None for the
    first): GhostNetV3's depthwise sum, then its second ghost module's sums. A constant shift or scale met
    between two blocks' sums belongs to the block after the fork when it is computed from the fork (the
    second ghost module's sum starting from a constant)."""
    groups: List[Tuple[List[fx.Node], Optional[fx.Node]]] = [([anchors[0]], None)]
    summing = ("add", "sub")
    for anchor in anchors[1:]:
        current, start = groups[-1]
        last_sum = max((i for i, a in enumerate(current) if ops[a].kind in summing), default=None)
        fork = None
        if ops[anchor].kind in summing and last_sum is not None:  # only blocks of sums follow on
            head, trail = current[:last_sum + 1], current[last_sum + 1:]
            fork = _fork(head, anchor, members, ops, order)
            if fork is not None and (fork in head[:-1] or
                                     any(fork not in _upstream([t], members, ops) for t in trail)):
                fork = None
        if fork is not None:
            groups[-1] = (head, start)
            groups.append((trail + [anchor], fork))
        else:
            current.append(anchor)
    return groups


def _regions(output: fx.Node, source: fx.Node, sources, ops, constant, live, order, mutating, affine_chains: bool
             ) -> List[LinearRegion]:
    members = _ancestors(output, source, sources, ops)
    all_ops = [ops[n] for n in sorted(members, key=order.__getitem__)]
    anchors = sorted(_anchors(all_ops, _constants_of(members, constant), affine_chains), key=order.__getitem__)
    if not anchors:
        return []
    groups = _groups(members, anchors, ops, order)
    found = []
    for index, (group, start) in enumerate(groups):
        end = groups[index + 1][1] if index + 1 < len(groups) else output
        sub = _upstream([end], members, ops, stop=start)
        region = _region(end, sub, group, ops, constant, live, order, mutating, affine_chains)
        if region is not None:
            found.append(region)
    return found


def _region(output: fx.Node, members: Set[fx.Node], anchors: List[fx.Node], ops, constant, live, order, mutating,
            affine_chains: bool) -> Optional[LinearRegion]:
    inside = _focus(_within(members, anchors), anchors, ops)
    inputs = {i for n in inside for i in ops[n].inputs if i not in inside}
    outputs = [n for n in inside if n is output or any(u in members and u not in inside for u in n.users)]
    nodes = tuple(sorted(inside, key=order.__getitem__))
    region_ops = [ops[n] for n in nodes]
    constants = _constants_of(inside, constant)
    if not nodes or not _worth_fusing(region_ops, sorted(constants, key=order.__getitem__), affine_chains):
        return None
    if len(inputs) != 1 or len(outputs) != 1:
        reason = (f"the block's linear part reads {len(inputs)} inputs and gives {len(outputs)} outputs: one conv reads "
                  "one and gives one")
        source = next(iter(inputs)) if inputs else nodes[0]
        return LinearRegion(source, nodes[-1], nodes, tuple(region_ops),
                            tuple(sorted(constants, key=order.__getitem__)), reason)
    (start,), (end,) = tuple(inputs), tuple(outputs)
    start, inside = _after_shared_stem(start, end, inside, ops, live)
    nodes = tuple(sorted(inside, key=order.__getitem__))
    region_ops = [ops[n] for n in nodes]
    constants = _constants_of(inside, constant)
    if not _worth_fusing(region_ops, sorted(constants, key=order.__getitem__), affine_chains):
        return None
    return LinearRegion(start, end, nodes, tuple(region_ops), tuple(sorted(constants, key=order.__getitem__)),
                        _escape(inside, end, live) or _written(inside, start, end, mutating))


def _after_shared_stem(start: fx.Node, end: fx.Node, inside: Set[fx.Node], ops, live) -> Tuple[fx.Node, Set[fx.Node]]:
    """Where a value the branches all go through is also used outside (GhostNet's primary conv output, also
    concatenated), the region starts after it: that value is the block's input to the sum."""
    while True:
        used_outside = [n for n in inside if n is not end and any(u in live and u not in inside for u in n.users)]
        if not used_outside:
            return start, inside
        candidate = used_outside[0]
        members = _upstream([end], inside, ops, stop=candidate)
        outside_inputs = {i for n in members for i in ops[n].inputs if i not in members}
        if outside_inputs != {candidate} or not members:
            return start, inside  # not a stem every branch shares: the escape is reported
        start, inside = candidate, members


def _is_mixed_add(node: fx.Node, sources, ops) -> bool:
    """A sum whose terms are not linear forms of one input (its own source)."""
    return node.op in ("call_function", "call_method") and len(node.args) == 2 and sources.get(node) is node and \
        node.target in (operator.add, operator.iadd, torch.add, "add", "add_")


def _branches(term: fx.Node, ops, frame) -> int:
    """How many summed branches a term is: a linear sum written in the same forward counts its terms."""
    op = ops.get(term)
    if op is None or op.kind not in ("add", "sub") or _frame(term) != frame:
        return 1
    return sum(_branches(i, ops, frame) for i in op.inputs)


def _mixed_sum(node: fx.Node, sources, ops, constant, order) -> Optional[LinearRegion]:
    """A sum of conv branches of one input that also adds something else of it (a non-linear branch):
    reported, not fused."""
    terms, adds, pending = [], [node], list(node.args)
    while pending:
        term = pending.pop()
        if isinstance(term, fx.Node) and _is_mixed_add(term, sources, ops) and len(term.users) == 1:
            adds.append(term)
            pending += list(term.args)
        elif isinstance(term, fx.Node):
            terms.append(term)
    groups: Dict[fx.Node, List[Set[fx.Node]]] = {}
    counts: Dict[fx.Node, int] = {}
    frame = _frame(node)
    for term in terms:
        if term not in ops:
            continue
        members = _ancestors(term, sources[term], sources, ops)
        if any(ops[m].kind in _CONVS for m in members):
            groups.setdefault(sources[term], []).append(members)
            counts[sources[term]] = counts.get(sources[term], 0) + _branches(term, ops, frame)
    source, branches = max(groups.items(), key=lambda item: counts[item[0]], default=(None, []))
    if not branches or counts[source] < 2:
        return None  # one linear branch beside something else: a residual, not a block
    members = _within(set().union(*branches) | set(adds), adds)
    inputs = {i for n in members if n in ops for i in ops[n].inputs if i not in members}
    source = next(iter(inputs)) if len(inputs) == 1 else source
    others = [t for t in terms if t not in members and t is not source]
    what = ", ".join(sorted({getattr(t.target, "__name__", str(t.target)) for t in others})) or "another input"
    nodes = tuple(sorted(members, key=order.__getitem__))
    reason = (f"the sum also adds a term that is not a linear map of the branches' input ({what}): a non-linear "
              "branch, or one reading another input; one conv computes linear branches of one input only")
    return LinearRegion(source, node, nodes, tuple(ops[n] for n in nodes if n in ops),
                        tuple(sorted(_constants_of(members, constant), key=order.__getitem__)), reason)


def find_linear_regions(graph: fx.Graph, modules: Dict[str, nn.Module], live: Set[fx.Node],
                        affine_chains: bool = False) -> List[LinearRegion]:
    """Every region of ``graph`` worth fusing (see the module docstring), in graph order of its output;
    ``affine_chains``: also a conv with constant shifts and scales around it and no sum (fold_bn's deploy form)."""
    constant = constant_nodes(graph)
    ops = {node: op for node in graph.nodes if node in live
           for op in [linear_op(node, modules, constant)] if op is not None}
    sources = _sources(graph, ops)
    order = {node: i for i, node in enumerate(graph.nodes)}
    mutating = {node for node in graph.nodes if mutates(node, modules)}
    found: Dict[Tuple[fx.Node, ...], LinearRegion] = {}
    for node in graph.nodes:
        if node not in ops or sources[node] is node:
            continue
        source = sources[node]
        if any(u in ops and sources.get(u) is source and u in live for u in node.users):
            continue  # a linear user continues the region: not its output
        for region in _regions(node, source, sources, ops, constant, live, order, mutating, affine_chains):
            found.setdefault(region.nodes, region)
    for node in graph.nodes:
        if node in live and _is_mixed_add(node, sources, ops) and not any(_is_mixed_add(u, sources, ops)
                                                                          for u in node.users):
            mixed = _mixed_sum(node, sources, ops, constant, order)
            if mixed is not None:  # its linear part is not fused on its own: the block stays, with the reason
                found = {k: r for k, r in found.items() if r.output not in mixed.node_set}
                found.setdefault(mixed.nodes, mixed)
    return sorted(found.values(), key=lambda r: order[r.output])
