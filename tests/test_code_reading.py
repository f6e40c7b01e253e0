"""The untraced-code reader on code snippets: each pattern it must see, on every interpreter it supports.

A site is "reached" when the code of a module that did not trace (or of a hook) may use it other than
through the child it sits in being called whole. Each snippet below is a forward written the way users
write them; the tests name the sites it reaches and those it must not (a reader that reaches everything
would be useless: YOLOv8's forward would lose all its sites). The same verdicts must come out on CPython
3.10 to 3.13 (CI runs the suite on each), and the bytecode fallback, read where no source exists, is
checked on this interpreter's instructions and on a fixture of CPython 3.14's.
"""
import dis
import functools
import logging
import operator
import sys
import types
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from acfx.matching.bytecode_names import VERIFIED_VERSIONS, bytecode_names, normalise
from acfx.matching.source_tree import function_tree
from acfx.matching.tracing import UntracedPart
from acfx.matching.untraced_reach import hook_reach, reach_of, reach_reason

LOGGER = logging.getLogger("acfx.tests")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class Base(nn.Module):
    """Two blocks, a Sequential of blocks and a ModuleDict of blocks; subclasses write the forward."""

    def __init__(self):
        super().__init__()
        self.blk, self.other = Block(), Block()
        self.seq = nn.Sequential(Block(), Block())
        self.heads = nn.ModuleDict({"a": Block(), "b": Block()})
        self.pair = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.debug = False


SITES = ["blk.conv", "blk.bn", "other.conv", "other.bn", "seq.0.conv", "seq.0.bn", "seq.1.conv", "seq.1.bn",
         "heads.a.conv", "heads.a.bn", "heads.b.conv", "heads.b.bn", "pair.0", "pair.1"]


def reached(model: nn.Module, name: str = "") -> set:
    """The sites of ``model`` the code of its module ``name`` reaches (as the passes ask: reach_reason)."""
    owner = UntracedPart(name, "does not trace", reach_of(model, name))
    return {site for site in SITES if reach_reason(site, model.get_submodule(site), [owner])}


def _snippet(forward, name="Snippet"):
    return type(name, (Base,), {"forward": forward})()


# -- what the reader must see ---------------------------------------------------------------------------
def f_direct(self, x):
    return self.blk(x) + self.blk.conv(x)


def f_constant_getattr(self, x):
    return getattr(self.blk, "bn")(x)


def f_computed_getattr_below_a_child(self, x):
    return getattr(self.blk, str(x.dtype))(x)


def f_constant_default_getattr(self, x, name="conv"):
    return getattr(self.blk, name)(x)


def f_index(self, x):
    return self.pair[0](x)


def f_negative_index(self, x):
    return self.pair[-1](x)


def f_index_a_block(self, x):
    return self.seq[0](x)  # an item called whole: nothing below it is reached


def f_alias(self, x):
    blk = self.blk
    return blk.conv(x)


def f_weight_read(self, x):
    return torch.conv2d(x, self.other.conv.weight)


def f_module_dict_key(self, x):
    return self.heads["a"].conv(x)


def f_store_in_attribute(self, x):
    self.cache = self.blk.bn
    return self.blk(x)


def f_hand_to_builtin(self, x):
    return list(map(self.other.conv, [x]))[0]


def f_attrgetter(self, x):
    return operator.attrgetter("blk.conv")(self)(x)


def f_modules_loop(self, x):
    for module in self.modules():
        if isinstance(module, nn.Conv2d):
            x = module(x)
    return x


def f_apply(self, x):
    self.apply(lambda m: None)
    return self.blk(x)


def f_dunder_dict(self, x):
    return self.__dict__["_modules"]["blk"].conv(x)


def f_comprehension_reaching_below(self, x):
    return sum(block.conv(x) for block in self.seq)


def f_container_mutation(self, x):
    taps = []
    taps.append(self.other.bn)
    return taps[0](x)


def f_nested_function(self, x):
    def side(y):
        return self.blk.conv(y)
    return side(x)


def f_walrus_and_star(self, x):
    if (b := self.other) is not None:
        return torch.cat([*[b.conv(x)]], 1)
    return x


def f_try_with_while(self, x):
    with torch.no_grad():
        try:
            while x.numel() < 0:
                x = x + 1
        finally:
            y = self.blk.bn(x)
    return y


def _side(module, x):
    return module.blk.conv(x)


def f_module_function(self, x):
    return _side(self, x)


class _Helpers:
    @staticmethod
    def side(module, x):
        return module.other.bn(x)


HELPERS = _Helpers()


def f_other_objects_method(self, x):
    return HELPERS.side(self, x)


def f_type_method(self, x):
    return type(self).side(self, x)


def f_eval(self, x):
    return eval("self.blk.conv(x)")


def f_yield(self, x):
    yield self.blk.conv


MUST_SEE = [
    (f_direct, {"blk.conv"}),
    (f_constant_getattr, {"blk.bn"}),
    (f_computed_getattr_below_a_child, {"blk.conv", "blk.bn"}),
    (f_constant_default_getattr, {"blk.conv"}),
    (f_index, {"pair.0"}),
    (f_negative_index, {"pair.0", "pair.1"}),
    (f_index_a_block, set()),
    (f_alias, {"blk.conv"}),
    (f_weight_read, {"other.conv"}),
    (f_module_dict_key, {"heads.a.conv"}),
    (f_store_in_attribute, {"blk.bn"}),
    (f_hand_to_builtin, {"other.conv"}),
    (f_attrgetter, set(SITES)),
    (f_modules_loop, set(SITES)),
    (f_apply, set(SITES)),
    (f_dunder_dict, set(SITES)),
    (f_comprehension_reaching_below, {"seq.0.conv", "seq.1.conv"}),
    (f_container_mutation, {"other.bn"}),
    (f_nested_function, {"blk.conv"}),
    (f_walrus_and_star, {"other.conv"}),
    (f_try_with_while, {"blk.bn"}),
    (f_module_function, {"blk.conv"}),
    (f_other_objects_method, {"other.bn"}),
    (f_eval, set(SITES)),
    (f_yield, {"blk.conv"}),
]


@pytest.mark.parametrize("forward,expected", MUST_SEE, ids=[f.__name__ for f, _ in MUST_SEE])
def test_reader_sees_each_pattern(forward, expected):
    model = _snippet(forward)
    assert function_tree(forward) is not None, "the snippet's source must be read from its syntax tree"
    assert reached(model) == expected


class WithMethods(Base):
    @property
    def tap(self):
        return self.blk.conv

    def helper(self, x):
        return self.other.bn(x)

    def side(self, x):
        return self.heads.b.bn(x)


class ByProperty(WithMethods):
    def forward(self, x):
        return self.tap(x)


class ByMethod(WithMethods):
    def forward(self, x):
        return self.helper(x)


class BySuper(WithMethods):
    def forward(self, x):
        return super().helper(x) + self.blk(x)


class ByPrivate(Base):
    def __init__(self):
        super().__init__()
        self.__taps = [self.blk.conv]  # a plain list, name-mangled: _ByPrivate__taps

    def forward(self, x):
        return self.__taps[0](x)


class ByPartial(Base):
    def __init__(self):
        super().__init__()
        self.side = functools.partial(_side, self)

    def forward(self, x):
        return self.side(x)


class ByClosure(Base):
    def __init__(self):
        super().__init__()
        other = self.other
        self.side = lambda x: other.bn(x)

    def forward(self, x):
        return self.side(x)


class ByTypeMethod(WithMethods):
    forward = f_type_method


@pytest.mark.parametrize("cls,expected", [(ByProperty, {"blk.conv"}), (ByMethod, {"other.bn"}),
                                          (BySuper, {"other.bn"}), (ByPrivate, {"blk.conv"}),
                                          (ByPartial, {"blk.conv"}), (ByClosure, {"other.bn"}),
                                          (ByTypeMethod, {"heads.b.bn"})],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_reader_follows_methods_properties_partials_and_closures(cls, expected):
    assert reached(cls()) == expected


# -- what the reader must not take for a use -------------------------------------------------------------
def f_children_whole(self, x):
    x = self.blk(x) + getattr(self, "other")(x)
    for block in self.seq:
        x = block(x)
    for key, head in self.heads.items():
        x = head(x)
    return x


def f_names_that_only_look_alike(self, x, conv=None):
    LOGGER.info("conv bn %s", type(self.blk).__name__)  # a logger's info(), not a method of the model
    bn = x.mean()
    return self.blk(x) + bn


def f_computed_getattr_on_self(self, x, names=("blk", "other")):
    for name in names:
        x = getattr(self, name)(x)  # mmdet's stage loop: direct children, called whole
    return x


def f_branch_not_taken(self, x, profile=False):
    if profile:
        return self.blk.conv(x)  # the trace calls forward(x): profile is False
    if self.debug:
        return self.other.conv(x)  # an attribute False now, as the trace reads it
    return self.blk(x)


def f_enumerate_and_zip(self, x):
    for index, (a, b) in enumerate(zip(self.seq, self.heads.values())):
        x = a(x) + b(x)
    return x


def f_reads_attributes_of_items(self, x):
    for block in self.seq:
        x = block(x) if block.training else x
    return x


MUST_NOT_SEE = [f_children_whole, f_names_that_only_look_alike, f_computed_getattr_on_self, f_branch_not_taken,
                f_enumerate_and_zip, f_reads_attributes_of_items]


@pytest.mark.parametrize("forward", MUST_NOT_SEE, ids=[f.__name__ for f in MUST_NOT_SEE])
def test_reader_does_not_take_whole_calls_or_alike_names_for_uses(forward):
    assert reached(_snippet(forward)) == set()


def test_reason_names_the_code_responsible():
    model = _snippet(f_alias)
    owner = UntracedPart("", "does not trace", reach_of(model, ""))
    reason = reach_reason("blk.conv", model.blk.conv, [owner])
    assert "calls blk.conv" in reason and "f_alias (test_code_reading.py:" in reason, reason


def test_hooks_are_read_with_the_module_they_are_on():
    model = Base()
    model.blk.register_forward_hook(lambda mod, args, out: out + mod.conv(args[0]))
    model.other.register_forward_pre_hook(lambda mod, args: None)
    assert hook_reach(model, "blk", model.blk).use_of(("blk", "conv")) is not None
    assert hook_reach(model, "other", model.other).use_of(("other", "conv")) is None
    assert hook_reach(model, "seq", model.seq) is None


def test_graph_module_call_is_a_plain_call():
    traced = torch.fx.symbolic_trace(Base().blk)
    assert hook_reach(traced, "", traced) is None  # fx's __call__ only adds error reporting


def test_sequential_used_only_through_its_items_is_traced_item_by_item():
    from acfx.matching.tracing import AcfxTracer, trace_parts

    class LayerLoop(Base):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: does not trace
                return x
            outputs = [x]
            for layer in self.seq:  # each layer gets an earlier layer's output, not the previous one's
                outputs.append(layer(outputs[0]))
            return outputs[-1]

    parts, untraced = trace_parts(LayerLoop(), AcfxTracer)
    assert {p.name for p in parts} >= {"seq.0", "seq.1"} and "seq" not in {p.name for p in parts}


# -- bytecode, where no source exists ----------------------------------------------------------------------
def _without_source(text: str, name: str = "forward"):
    """A function compiled from ``text`` under a file name no source can be found for."""
    namespace = {"torch": torch}
    exec(compile(text, "<acfx-test: no source>", "exec"), namespace)
    return namespace[name]


BYTECODE = [
    ("def forward(self, x):\n    return self.blk(x) + self.blk.conv(x)\n", {"blk", "conv"}, None),
    ("def forward(self, x):\n    return self.seq[0](x)\n", {"seq", "[]seq"}, None),
    ("def forward(self, x):\n    return getattr(self, x)(x)\n", {"getattr"}, None),
    ("def forward(self, x):\n    return getattr(self.blk, x)(x)\n", None, "computed name"),
    ("def forward(self, x):\n    return getattr(self.blk, 'bn')(x)\n", {"getattr", "blk", "bn"}, None),
    ("def forward(self, x):\n    return [m(x) for m in self.seq.children()]\n", {"seq", "children"}, None),
]


@pytest.mark.parametrize("text,names,failure", BYTECODE, ids=range(len(BYTECODE)))
def test_bytecode_reading_on_this_interpreter(text, names, failure):
    function = _without_source(text)
    assert function_tree(function) is None
    found = bytecode_names(function.__code__, own_lookup_ok=True)
    if failure:
        assert found.anything and failure in found.anything
    else:
        assert found.anything is None and set(found.names) == names


def test_forward_without_source_is_read_from_bytecode():
    model = _snippet(_without_source("def forward(self, x):\n    return self.blk(x) + self.other.bn(x)\n"))
    # Bytecode shows names, not paths: every site named 'bn' below a direct child (blk and other are called whole).
    assert reached(model) == {"blk.bn", "other.bn", "seq.0.bn", "seq.1.bn", "heads.a.bn", "heads.b.bn"}


class _I(NamedTuple):
    opname: str
    argval: object = None
    argrepr: str = ""


# CPython 3.14's instructions for the snippets above (its documented instruction set: LOAD_FAST_BORROW,
# LOAD_FAST_BORROW_LOAD_FAST_BORROW, LOAD_SMALL_INT, subscripts as BINARY_OP with the [] operator, NOT_TAKEN).
FIXTURE_314 = {
    1: [_I("RESUME", 0), _I("LOAD_FAST_BORROW", "self"), _I("LOAD_ATTR", "seq"), _I("LOAD_SMALL_INT", 0),
        _I("BINARY_OP", 26, "[]"), _I("LOAD_FAST_BORROW", "x"), _I("CALL", 1), _I("RETURN_VALUE")],
    2: [_I("RESUME", 0), _I("LOAD_GLOBAL", "getattr", "getattr + NULL"),
        _I("LOAD_FAST_BORROW_LOAD_FAST_BORROW", ("self", "x")), _I("CALL", 2), _I("PUSH_NULL"),
        _I("LOAD_FAST_BORROW", "x"), _I("CALL", 1), _I("RETURN_VALUE")],
    3: [_I("RESUME", 0), _I("LOAD_GLOBAL", "getattr", "getattr + NULL"), _I("LOAD_FAST_BORROW", "self"),
        _I("LOAD_ATTR", "blk"), _I("LOAD_FAST_BORROW", "x"), _I("CALL", 2), _I("PUSH_NULL"),
        _I("LOAD_FAST_BORROW", "x"), _I("CALL", 1), _I("RETURN_VALUE")],
    4: [_I("RESUME", 0), _I("LOAD_GLOBAL", "getattr", "getattr + NULL"), _I("LOAD_FAST_BORROW", "self"),
        _I("LOAD_ATTR", "blk"), _I("LOAD_CONST", "bn"), _I("CALL", 2), _I("PUSH_NULL"),
        _I("LOAD_FAST_BORROW", "x"), _I("CALL", 1), _I("RETURN_VALUE")],
}


@pytest.mark.parametrize("index", sorted(FIXTURE_314))
def test_bytecode_reading_of_a_cpython_314_fixture_gives_this_interpreters_verdict(index):
    text, names, failure = BYTECODE[index]
    code = _without_source(text).__code__
    here = bytecode_names(code, own_lookup_ok=True)
    there = bytecode_names(code, own_lookup_ok=True, instructions=FIXTURE_314[index])
    assert (there.names, there.anything is None) == (here.names, here.anything is None)


def test_bytecode_reading_fails_closed_on_unknown_loads_and_unverified_interpreters(monkeypatch):
    assert normalise([_I("LOAD_FAST_SOMETHING_NEW", "self")]) is None
    code = _without_source(BYTECODE[0][0]).__code__
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    found = bytecode_names(code)
    assert found.anything and "3.99" in found.anything and "verified" in found.anything


def test_this_interpreter_is_verified():
    assert sys.version_info[:2] in VERIFIED_VERSIONS


def test_every_load_this_interpreter_emits_is_one_the_reader_knows():
    from acfx.matching import bytecode_names as reader
    for name in dis.opmap:
        plain = reader._RENAME.get(name, name)
        if name in reader._SPLIT or name in reader._DROP or not plain.startswith("LOAD_"):
            continue
        assert plain in reader._KNOWN_LOADS, f"{name}: a load the bytecode reader does not know"


def test_source_that_changed_after_import_is_not_trusted(tmp_path, monkeypatch):
    import linecache
    function = _without_source("def forward(self, x):\n    return self.blk.conv(x)\n")
    fake = types.FunctionType(function.__code__.replace(co_filename=str(tmp_path / "gone.py")), function.__globals__)
    linecache.cache[str(tmp_path / "gone.py")] = (0, None, ["def forward(self, x):\n", "    return x\n"],
                                                 str(tmp_path / "gone.py"))
    try:
        assert function_tree(fake) is None  # the source on record does not compile to the live code
    finally:
        linecache.cache.pop(str(tmp_path / "gone.py"), None)
