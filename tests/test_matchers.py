"""The finders on small graphs built by hand, and the algebra of linear maps on random tensors.

Each finder is matching only: it returns records and changes nothing. Here each is given a graph written
node by node (no tracing), so that what it must and must not match is stated exactly; the behaviour tests
(expand, collapse) run them on real models.
"""
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from acfx.layers.geometry import Window
from acfx.layers.linear_map import ConvMap, Inexact, add, align, compose
from acfx.matching.find_linear_regions import find_linear_regions
from acfx.matching.find_sites import find_conv_calls
from acfx.matching.traced_model import TracedModel
from acfx.matching.tracing import TracedPart, live_nodes, module_calls

from helpers import assert_rel_close


def _graph(spec):
    """A graph from (name, op, target, args) rows; args name earlier rows ('x' is the input)."""
    graph = fx.Graph()
    nodes = {"x": graph.placeholder("x")}
    for name, op, target, args in spec:
        values = tuple(nodes[a] if isinstance(a, str) and a in nodes else a for a in args)
        if op == "module":
            nodes[name] = graph.call_module(target, values)
        elif op == "function":
            nodes[name] = graph.call_function(target, values)
        else:
            nodes[name] = graph.call_method(target, values)
    graph.output(nodes[spec[-1][0]])
    return graph


def _modules(**modules):
    root = nn.Module()
    for name, module in modules.items():
        root.add_module(name, module)
    return root


def _regions(graph, root):
    return find_linear_regions(graph, dict(root.named_modules()), live_nodes(graph))


# -- find_linear_regions -------------------------------------------------------------------------------------
ACB = dict(sq=nn.Conv2d(4, 4, 3, padding=1), sq_bn=nn.BatchNorm2d(4), hor=nn.Conv2d(4, 4, (1, 3), padding=(0, 1)),
           hor_bn=nn.BatchNorm2d(4), ver=nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), act=nn.ReLU())


def test_a_sum_of_conv_branches_on_one_input_is_one_region():
    graph = _graph([("a", "module", "sq", ("x",)), ("a_bn", "module", "sq_bn", ("a",)),
                    ("b", "module", "hor", ("x",)), ("b_bn", "module", "hor_bn", ("b",)),
                    ("c", "module", "ver", ("x",)),
                    ("s1", "function", operator.add, ("a_bn", "b_bn")), ("s2", "function", operator.add, ("s1", "c")),
                    ("r", "module", "act", ("s2",))])
    (region,) = _regions(graph, _modules(**ACB))
    assert region.reason is None and region.source.name == "x" and region.output.target is operator.add
    assert region.output.users and next(iter(region.output.users)).target == "act"
    assert [op.kind for op in region.ops] == ["conv", "norm", "conv", "norm", "conv", "add", "add"]
    assert region.conv_count == 3


def test_branches_of_different_inputs_are_no_region():
    graph = _graph([("y", "module", "act", ("x",)), ("a", "module", "sq", ("x",)),
                    ("b", "module", "hor", ("y",)), ("s", "function", operator.add, ("a", "b"))])
    assert _regions(graph, _modules(**ACB)) == []


def test_a_plain_conv_and_bn_chain_is_the_original_architecture_not_a_region():
    graph = _graph([("a", "module", "sq", ("x",)), ("b", "module", "sq_bn", ("a",)), ("r", "module", "act", ("b",))])
    assert _regions(graph, _modules(**ACB)) == []


def test_constants_around_a_conv_and_crops_and_computed_weights_are_read():
    weight = nn.Parameter(torch.randn(4, 4, 3, 3))
    root = _modules(**ACB)
    root.register_parameter("w", weight)
    graph = fx.Graph()
    x = graph.placeholder("x")
    shifted = graph.call_function(operator.add, (x, 1.0))  # YOLOv7's ImplicitA: a constant added before a conv
    doubled = graph.call_function(operator.mul, (graph.get_attr("w"), 2.0))  # a weight computed from a parameter
    conv = graph.call_function(F.conv2d, (shifted, doubled))
    cut = graph.call_function(operator.getitem, (conv, (slice(None), slice(None), slice(1, -1), slice(1, -1))))
    graph.output(graph.call_module("act", (cut,)))
    (region,) = _regions(graph, root)
    assert [op.kind for op in region.ops] == ["shift", "function_conv", "crop"]
    assert [c.op for c in region.constants] == ["get_attr", "call_function"]


def test_a_region_whose_values_are_used_elsewhere_says_so():
    graph = _graph([("a", "module", "sq", ("x",)), ("b", "module", "hor", ("x",)),
                    ("s", "function", operator.add, ("a", "b")), ("r", "module", "act", ("b",)),
                    ("t", "function", operator.mul, ("s", "r"))])
    (region,) = _regions(graph, _modules(**ACB))
    assert region.reason is not None and "also used outside" in region.reason


# -- find_conv_calls ---------------------------------------------------------------------------------------
def _traced(graph, root):
    part = TracedPart("", root, graph)
    counts = module_calls(graph)
    return part, TracedModel(root, True, (part,), (), {}, {}, (), counts)


def test_a_conv_whose_only_consumer_is_a_bn_is_a_site_with_its_bn():
    root = _modules(conv=nn.Conv2d(4, 4, 3), bn=nn.BatchNorm2d(4))
    part, traced = _traced(_graph([("c", "module", "conv", ("x",)), ("n", "module", "bn", ("c",))]), root)
    (call,) = find_conv_calls(part, traced)
    assert call.norm_name == "bn" and call.consumer.reason is None and call.calls == 1 and call.conv_use is None


@pytest.mark.parametrize("rows,reason", [
    ([("c", "module", "conv", ("x",)), ("n", "module", "bn", ("c",)), ("r", "function", torch.relu, ("c",)),
      ("s", "function", operator.add, ("n", "r"))], "used by 2 nodes"),
    ([("c", "module", "conv", ("x",)), ("r", "function", torch.relu, ("c",))], "no BatchNorm follows"),
    ([("c", "module", "conv", ("x",))], "returned by the traced module"),
    ([("c", "module", "conv", ("x",)), ("n", "function", F.batch_norm, ("c", None, None))], "functional batch_norm"),
])
def test_a_conv_with_another_consumer_says_what_takes_its_output(rows, reason):
    root = _modules(conv=nn.Conv2d(4, 4, 3), bn=nn.BatchNorm2d(4))
    part, traced = _traced(_graph(rows), root)
    (call,) = find_conv_calls(part, traced)
    assert call.norm is None and reason in call.consumer.reason


def test_a_conv_called_twice_and_a_functional_conv_are_found_as_such():
    root = _modules(conv=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    graph = _graph([("c", "module", "conv", ("x",)), ("d", "module", "conv", ("c",)), ("n", "module", "bn", ("d",)),
                    ("f", "function", F.conv2d, ("n", torch.zeros(4, 4, 1, 1)))])
    part, traced = _traced(graph, root)
    calls = find_conv_calls(part, traced)
    assert [c.calls for c in calls[:2]] == [2, 2] and calls[2].function == "F.conv2d" and calls[2].conv is None


# -- the algebra of linear maps ----------------------------------------------------------------------------
def _run(m: ConvMap, x: torch.Tensor) -> torch.Tensor:
    w = m.window
    padded = F.pad(x, (max(w.left, 0), max(w.right, 0), max(w.top, 0), max(w.bottom, 0)))
    h, v = padded.shape[-2:]
    padded = padded[..., max(-w.top, 0):h - max(-w.bottom, 0), max(-w.left, 0):v - max(-w.right, 0)]
    return F.conv2d(padded, m.kernel, m.bias, m.stride, 0, m.dilation, m.groups)


def _random(out, inp, k, groups=1, window=Window(), stride=(1, 1), dilation=(1, 1), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    kernel = torch.randn(out, inp // groups, *k, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    return ConvMap(kernel, b, stride, dilation, groups, window)


X = torch.randn(2, 8, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stride,dilation", [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 2))])
def test_add_of_maps_over_one_window_is_the_sum_of_their_outputs(stride, dilation):
    d = dilation[0]
    maps = [_random(8, 8, (3, 3), window=Window(d, d, d, d), stride=stride, dilation=dilation, seed=1),
            _random(8, 8, (1, 3), window=Window(0, 0, d, d), stride=stride, dilation=dilation, seed=2),
            _random(8, 8, (3, 1), groups=8, window=Window(d, d, 0, 0), stride=stride, dilation=dilation, seed=3)]
    summed = add(maps)
    assert not isinstance(summed, Inexact) and summed.kernel_size == (3, 3) and summed.groups == 1
    assert_rel_close(_run(summed, X), sum(_run(m, X) for m in maps))


@pytest.mark.parametrize("specs", [[((5, 5), (1, 1)), ((3, 3), (3, 3))],  # the dilated kernel reaches further
                                   [((5, 5), (2, 2)), ((3, 3), (4, 4)), ((1, 3), (1, 6))],  # common dilation 2
                                   [((3, 5), (2, 1)), ((3, 3), (3, 2))]])  # per axis: dilation (1, 1)
def test_add_of_maps_of_different_dilations_spreads_their_kernels_to_a_common_one(specs):
    reach = [(k[0] - 1) * d[0] // 2 for k, d in specs], [(k[1] - 1) * d[1] // 2 for k, d in specs]
    maps = [_random(8, 8, k, groups=8 if i else 1, dilation=d, seed=10 + i, window=Window(r, r, c, c))
            for i, ((k, d), r, c) in enumerate(zip(specs, *reach))]
    summed = add(maps)
    assert not isinstance(summed, Inexact), summed
    used = [[d[a] for k, d in specs if k[a] > 1] for a in (0, 1)]
    assert summed.dilation == tuple(math.gcd(*u) for u in used)
    assert_rel_close(_run(summed, X), sum(_run(m, X) for m in maps))


def test_a_map_is_not_rewritten_at_a_dilation_that_does_not_divide_its_own():
    assert isinstance(_random(8, 8, (3, 3), dilation=(3, 3)).with_dilation((2, 2)), Inexact)
    assert _random(8, 8, (1, 1), dilation=(3, 3)).with_dilation((2, 2)).dilation == (2, 2)  # one tap: any


def test_add_refuses_maps_that_do_not_share_a_window():
    found = add([_random(8, 8, (3, 3), window=Window(1, 1, 1, 1)), _random(8, 8, (1, 3), window=Window(1, 1, 1, 1))])
    assert isinstance(found, Inexact) and "sliding window" in found.reason
    assert isinstance(align([_random(8, 8, (3, 3)), _random(8, 8, (3, 3), stride=(2, 2))]), Inexact)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_compose_of_a_pointwise_map_and_a_conv_is_the_conv_of_its_output(groups):
    first = _random(8, 8, (1, 1), groups=groups, seed=4)
    second = _random(8, 8, (3, 3), groups=groups, stride=(2, 2), seed=5, window=Window(0, 0, 0, 0))
    found = compose(first, second)
    assert_rel_close(_run(found, X), _run(second, _run(first, X)))


@pytest.mark.parametrize("groups,stride", [((1, 1), (1, 1)), ((2, 4), (2, 1)), ((8, 2), (1, 2)), ((4, 1), (2, 2))])
def test_compose_of_a_conv_and_a_1x1_conv_after_it_is_the_1x1_of_its_output(groups, stride):
    first = _random(8, 8, (3, 5), groups=groups[0], stride=(2, 1), dilation=(1, 2), window=Window(1, 0, 4, 3), seed=8)
    second = _random(8, 8, (1, 1), groups=groups[1], stride=stride, seed=9)
    found = compose(first, second)
    assert not isinstance(found, Inexact), found
    assert_rel_close(_run(found, X), _run(second, _run(first, X)))


def test_compose_of_two_wide_maps_or_a_padding_1x1_after_a_wide_map_is_refused():
    first = _random(8, 8, (3, 3), window=Window(1, 1, 1, 1), seed=8)
    for second in (_random(8, 8, (3, 3), seed=9), _random(8, 8, (1, 1), window=Window(1, 1, 1, 1), seed=9)):
        found = compose(first, second)
        assert isinstance(found, Inexact) and "pointwise" in found.reason, found


def test_compose_with_zero_padding_after_a_bias_is_refused_and_a_bias_padded_output_is_exact():
    first = _random(8, 8, (1, 1), seed=6)
    second = _random(8, 8, (3, 3), window=Window(1, 1, 1, 1), seed=7)
    refused = compose(first, second)
    assert isinstance(refused, Inexact) and "BNAndPadLayer" in refused.reason
    padded = first.pad_output(Window(1, 1, 1, 1))  # DBB: the 1x1 output padded with its own bias
    unpadded = ConvMap(second.kernel, second.bias, second.stride, second.dilation, second.groups)
    reference = F.conv2d(F.pad(_run(first, X) - first.bias.view(1, -1, 1, 1), (1, 1, 1, 1))
                         + first.bias.view(1, -1, 1, 1), second.kernel, second.bias)
    assert_rel_close(_run(compose(padded, unpadded), X), reference)


def test_identity_average_pooling_and_affine_maps_compute_what_they_stand_for():
    identity = ConvMap.identity(8, X)
    assert_rel_close(_run(identity, X), X)
    pool = ConvMap.avg_pool(8, (3, 3), (2, 2), (1, 1), X)
    assert_rel_close(_run(pool, X), F.avg_pool2d(X, 3, 2, 1, count_include_pad=True))
    scale, shift = torch.rand(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    affine = identity.then_affine(scale, shift)
    assert_rel_close(_run(affine, X), X * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    dense = identity.with_groups(2)
    assert dense.groups == 2 and dense.kernel.shape == (8, 4, 1, 1)
    assert_rel_close(_run(dense, X), X)
