"""Uses of a module that the traced graph does not show, written the way users write them.

A rewrite is exact only if every use of the rewritten modules is known. Each model here uses a conv or a
BN in a way the first graph acfx read did not show (code that does not trace reaching into a child, a
keyword call, a read of its weight, an in-place op whose result is unused, a weight tied to another
module, a path only one mode takes, a method replaced on the instance, a state the module's kind does not
have). Each must be exact or left alone with its reason; each was silently wrong (or broke the model)
before.
"""
import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acfx

from helpers import assert_rel_close, randomize_bn

C = 8


def _site_reason(report, name):
    entry = next(e for e in report.entries if e.name == name)
    assert entry.action == "skipped", f"{name} was {entry.action}, expected skipped"
    return entry.detail


def _check_preserved(model, x, **kwargs):
    """expand(init='preserve') keeps eval and train outputs; collapse keeps eval outputs. Returns the report."""
    randomize_bn(model).eval()
    y = model(x)
    acnet, report = acfx.expand(model, init="preserve", return_report=True, **kwargs)
    assert_rel_close(acnet.eval()(x), y, what="expanded (eval)")
    randomize_bn(acnet, seed=1)
    y = acnet(x)
    assert_rel_close(acfx.collapse(acnet)(x), y, what="collapsed (eval)")
    return report


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x))


# -- code that does not trace, reaching into a child -------------------------------------------------------
class UntracedParent(nn.Module):
    """Data-dependent control flow at the top; the forward also calls a grandchild directly."""

    def __init__(self, reach):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 1)
        self.blk = Block()
        self.reach = reach

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > -100:
            if self.reach == "named":
                return self.blk(x) + self.blk.conv(x)
            if self.reach == "getattr":
                return self.blk(x) + getattr(self.blk, "bn")(x)
            return self.blk(x)
        return x


class UntracedParentWithHelper(UntracedParent):
    """The reach is in a method of the class that forward calls."""

    def forward(self, x):
        x = self.stem(x)
        return self.blk(x) + self._side(x) if x.mean() > -100 else x

    def _side(self, x):
        return self.blk.bn(x)


@pytest.mark.parametrize("reach", ["named", "getattr", "helper"])
def test_untraced_code_reaching_into_a_child_leaves_the_site(reach):
    torch.manual_seed(0)
    model = UntracedParentWithHelper(reach) if reach == "helper" else UntracedParent(reach)
    report = _check_preserved(model, torch.randn(2, 3, 8, 8))
    assert "does not trace" in _site_reason(report, "blk.conv")


class UntracedParentCallingWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blk = nn.Conv2d(3, C, 1), Block()

    def forward(self, x):
        x = self.stem(x)
        return self.blk(x) if x.mean() > -100 else x


def test_untraced_code_calling_children_whole_still_expands():
    torch.manual_seed(0)
    report = _check_preserved(UntracedParentCallingWhole(), torch.randn(2, 3, 8, 8))
    assert [e.name for e in report.of("expanded")] == ["blk.conv"]


class ReadsTensorsOfAChild(nn.Module):
    """Code that does not trace and reads the block's tensors through nn.Module's own methods."""

    def __init__(self, how):
        super().__init__()
        self.stem, self.blk, self.how = nn.Conv2d(3, C, 1), Block(), how

    def forward(self, x):
        x = self.blk(self.stem(x))
        if x.mean() > -100:  # data-dependent: the forward does not trace, its code is read
            x = x * 1.0
        if self.how == "parameters":
            w = next(self.blk.parameters())
        elif self.how == "named_parameters":
            w = dict(self.blk.named_parameters())["conv.weight"]
        elif self.how == "state_dict":
            w = self.blk.state_dict()["bn.running_mean"]
        elif self.how == "buffers":
            w = next(iter(self.blk.buffers()))
        else:
            w = self.blk.get_parameter("conv.weight")
        return x * w.abs().mean()


@pytest.mark.parametrize("how", ["parameters", "named_parameters", "state_dict", "buffers", "get_parameter"])
def test_untraced_code_reading_tensors_through_module_methods_leaves_the_site(how):
    torch.manual_seed(0)
    report = _check_preserved(ReadsTensorsOfAChild(how), torch.randn(2, 3, 8, 8))
    assert "does not trace" in _site_reason(report, "blk.conv")


class _Owner:
    """A plain object holding the model, whose method uses a grandchild."""

    def __init__(self, model):
        self.model = model

    def run(self, x):
        return self.model.blk.conv(x)


class _Holder:
    """A plain object holding a conv of the model, called."""

    def __init__(self, conv):
        self.conv = conv

    def __call__(self, x):
        return self.conv(x)


class ReachesOtherwise(nn.Module):
    """Code that does not trace and reaches blk.conv through what the reader must follow: a method that returns
    the module, a container method, a default argument, a plain object's method or call, a partial."""

    def __init__(self, how):
        super().__init__()
        self.stem, self.blk, self.how = nn.Conv2d(3, C, 1), Block(), how
        self.d = nn.ModuleDict({"b": Block()}) if how.startswith("dict") else None
        if how == "alias":
            self.d = nn.ModuleDict({"b": self.blk})  # blk under a second name
        if how == "owner":
            object.__setattr__(self, "h", _Owner(self))  # not a submodule: a plain attribute
        elif how == "holder":
            self.h = _Holder(self.blk.conv)
        elif how == "partial":
            self.h = functools.partial(F.conv2d, weight=self.blk.conv.weight, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = self.blk(x)
        if y.mean() > -100:  # data-dependent: the forward does not trace, its code is read
            y = y * 1.0
        how = self.how
        if how == "eval":
            side = self.blk.eval().conv(x) if not self.training else self.blk.train().conv(x)
        elif how in ("to", "alias"):
            side = self.to(x.dtype).blk.conv(x)
        elif how == "dict-values":
            side = list(self.d.values())[0].conv(x)
        elif how == "dict-items":
            side = [m.conv(x) for _, m in self.d.items()][0]
        elif how == "modules-get":
            side = self.blk._modules.get("conv")(x)
        elif how == "default":
            side = (lambda t, m=self.blk: m.conv(t))(x)
        elif how == "def-default":
            def side_of(t, m=self.blk):
                return m.conv(t)
            side = side_of(x)
        elif how == "owner":
            side = self.h.run(x)
        else:
            side = self.h(x)
        return y + side


@pytest.mark.parametrize("how", ["eval", "to", "dict-values", "dict-items", "modules-get", "default",
                                 "def-default", "owner", "holder", "partial"])
def test_untraced_code_reaching_a_child_indirectly_leaves_the_site(how):
    torch.manual_seed(0)
    report = _check_preserved(ReachesOtherwise(how), torch.randn(2, 3, 8, 8))
    assert "does not trace" in _site_reason(report, "d.b.conv" if how.startswith("dict") else "blk.conv")


def test_a_module_under_two_names_below_code_that_does_not_trace_is_left():
    """blk is also d.b (a ModuleDict holding it): tracing the children of an untraced forward looked the
    second name up and raised KeyError; now the site is left, named by both."""
    torch.manual_seed(0)
    report = _check_preserved(ReachesOtherwise("alias"), torch.randn(2, 3, 8, 8))
    assert "several names ['blk.conv', 'd.b.conv']" in _site_reason(report, "blk.conv")


class CallsThroughContainers(nn.Module):
    """Code that does not trace calling the items of a ModuleDict whole, through its container methods."""

    def __init__(self, how):
        super().__init__()
        self.d, self.how = nn.ModuleDict({"a": Block(), "b": Block()}), how

    def forward(self, x):
        if x.mean() > -100:
            x = x * 1.0
        if self.how == "items":
            for _, block in self.d.items():
                x = block(x)
        elif self.how == "values":
            for block in self.d.values():
                x = block(x)
        else:
            x = self.d["b"](self.d._modules.get("a")(x))
        return x


@pytest.mark.parametrize("how", ["items", "values", "get"])
def test_untraced_code_calling_container_items_whole_still_expands(how):
    torch.manual_seed(0)
    report = _check_preserved(CallsThroughContainers(how), torch.randn(2, C, 8, 8))
    assert sorted(e.name for e in report.of("expanded")) == ["d.a.conv", "d.b.conv"]


class AsksForTheDevice(nn.Module):
    """Code that does not trace and asks where the model lives, the common way: no tensor's value is read."""

    def __init__(self, how):
        super().__init__()
        self.stem, self.blk, self.how = nn.Conv2d(3, C, 1), Block(), how

    def forward(self, x):
        if self.how == "dtype":
            x = x.to(next(self.parameters()).dtype)
        elif self.how == "iter":
            x = x.to(next(iter(self.blk.buffers())).device)
        else:
            x = x.to(next(self.blk.parameters()).device)
        x = self.blk(self.stem(x))
        return x * 1.0 if x.mean() > -100 else x


@pytest.mark.parametrize("how", ["dtype", "iter", "device"])
def test_untraced_code_asking_for_the_device_still_expands(how):
    torch.manual_seed(0)
    report = _check_preserved(AsksForTheDevice(how), torch.randn(2, 3, 8, 8))
    assert [e.name for e in report.of("expanded")] == ["blk.conv"]


class HeldInList(nn.Module):
    """A module kept in a plain list (not registered twice) and called by code that does not trace."""

    def __init__(self):
        super().__init__()
        self.blk = Block()
        self.taps = [self.blk.bn]

    def forward(self, x):
        if x.mean() > -100:
            return self.blk(x) + self.taps[0](x)
        return x


def test_module_held_in_a_plain_attribute_of_untraced_code_leaves_the_site():
    torch.manual_seed(0)
    report = _check_preserved(HeldInList(), torch.randn(2, C, 8, 8))
    assert "calls blk.bn in HeldInList.forward" in _site_reason(report, "blk.conv")


# -- calls the rewritten module would not take -------------------------------------------------------------
class KeywordCalls(nn.Module):
    def __init__(self, which):
        super().__init__()
        self.conv, self.bn, self.which = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), which

    def forward(self, x):
        if self.which == "conv":
            return self.bn(self.conv(input=x))
        return self.bn(input=self.conv(x))


@pytest.mark.parametrize("which", ["conv", "bn"])
def test_keyword_calls_leave_the_site(which):
    torch.manual_seed(0)
    report = _check_preserved(KeywordCalls(which), torch.randn(2, 3, 8, 8))
    assert "keyword arguments" in _site_reason(report, "conv")


class TwoBranch(nn.Module):
    """A RepVGG-style block: 3×3 conv-BN plus 1×1 conv-BN, summed."""

    def __init__(self):
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.c1, self.b1 = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)

    def forward(self, x, scale=None):
        return self.b3(self.c3(x)) + self.b1(self.c1(x))


class CallsBlockOddly(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.blk, self.how = TwoBranch(), how

    def forward(self, x):
        if self.how == "keyword":
            return self.blk(x=x)
        if self.how == "extra":
            return self.blk(x, 2.0)
        return self.blk(x) * self.blk.c1(x)  # a branch conv used outside the block too


@pytest.mark.parametrize("how", ["keyword", "extra", "branch-outside"])
def test_hand_written_block_used_otherwise_is_not_collapsed(how):
    torch.manual_seed(0)
    model = randomize_bn(CallsBlockOddly(how)).eval()
    x = torch.randn(2, C, 8, 8)
    y = model(x)
    collapsed, report = acfx.collapse(model, return_report=True)
    assert_rel_close(collapsed(x), y)
    assert not report.of("collapsed"), report
    assert report.of("skipped"), report


class OwnWeights(nn.Module):
    """A 3×3 plus a 1×1 branch whose kernels are the block's own parameters (ECBSR writes its branches so)."""

    def __init__(self):
        super().__init__()
        self.w3, self.w1 = nn.Parameter(torch.randn(C, C, 3, 3) * 0.1), nn.Parameter(torch.randn(C, C, 1, 1) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.w3, padding=1) + F.conv2d(x, self.w1)


class ParentOfOwnWeights(nn.Module):
    """A forward that does not trace (it branches on the data), so its block is traced as a part of its own;
    ``reach``: it also reads the block's own parameters (a deploy-style path: one conv of the 3×3 kernel)."""

    def __init__(self, reach):
        super().__init__()
        self.blk, self.reach = OwnWeights(), reach

    def forward(self, x):
        if self.reach and bool(x.sum() < 0):
            return F.conv2d(x, self.blk.w3, padding=1)
        if bool(x.sum() < 0):
            return self.blk(-x)
        return self.blk(x)


@pytest.mark.parametrize("reach", [False, True])
def test_a_part_whose_untraced_parent_reads_its_own_parameters_is_not_collapsed(reach):
    torch.manual_seed(0)
    model = ParentOfOwnWeights(reach).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    for x in (torch.randn(2, C, 8, 8).abs(), -torch.randn(2, C, 8, 8).abs()):  # both paths of the forward
        with torch.no_grad():
            assert_rel_close(collapsed(x), model(x))
    assert [e.name for e in report.of("untraced")] == [""], report
    if reach:
        (skipped,) = report.of("skipped")
        assert skipped.name == "blk" and "does not trace and its code hands blk.w3" in skipped.detail, report
    else:
        assert [e.name for e in report.of("collapsed")] == ["blk"], report


class ReadsWeights(nn.Module):
    def __init__(self, what):
        super().__init__()
        self.conv, self.bn, self.what = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), what

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.what == "conv.weight":
            return y * self.conv.weight.mean()
        if self.what == "bn.weight":
            return y + self.bn.weight.view(1, -1, 1, 1)
        return y - self.bn.running_mean.view(1, -1, 1, 1)  # a view computed outside the graph


@pytest.mark.parametrize("what", ["conv.weight", "bn.weight", "bn.running_mean"])
def test_forward_reading_a_rewritten_modules_tensors_leaves_the_site(what):
    torch.manual_seed(0)
    report = _check_preserved(ReadsWeights(what), torch.randn(2, 3, 8, 8))
    assert "reads" in _site_reason(report, "conv")


# -- in-place operations whose result is unused ------------------------------------------------------------
class InPlaceBetween(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.bn, self.act, self.how = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), \
            nn.ReLU(inplace=True), how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "module":
            self.act(y)
        elif self.how == "method":
            y.clamp_(min=-0.5)
        elif self.how == "function":
            torch.relu_(y)
        else:
            nn.functional.relu(y, True)  # inplace given positionally
        return self.bn(y)


@pytest.mark.parametrize("how", ["module", "method", "function", "inplace-argument"])
def test_in_place_op_between_conv_and_bn_leaves_the_site(how):
    torch.manual_seed(0)
    report = _check_preserved(InPlaceBetween(how), torch.randn(2, 3, 8, 8))
    assert "used by 2 nodes" in _site_reason(report, "conv")


class MutatingBlock(nn.Module):
    """A RepVGG-style block that changes a branch, or its input between the branches, in place."""

    def __init__(self, what):
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.c1, self.b1 = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)
        self.what = what

    def forward(self, x):
        a = self.b3(self.c3(x))
        if self.what == "branch":
            a.relu_()
        else:
            x.mul_(2.0)
        return a + self.b1(self.c1(x))


class HoldsMutatingBlock(nn.Module):
    def __init__(self, what):
        super().__init__()
        self.stem, self.blk = nn.Conv2d(3, C, 1), MutatingBlock(what)

    def forward(self, x):
        return self.blk(self.stem(x))


@pytest.mark.parametrize("what", ["branch", "input"])
def test_sum_changed_in_place_is_not_fused(what):
    torch.manual_seed(0)
    model = randomize_bn(HoldsMutatingBlock(what)).eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    collapsed, report = acfx.collapse(model, return_report=True)
    assert not report.of("collapsed"), report
    assert_rel_close(collapsed(x), y)


# -- tied tensors, state beyond a module's kind, replaced methods ------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.c2, self.b2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.b1(self.c1(x)) + self.b2(self.c2(torch.relu(x)))


def test_tied_conv_weights_leave_both_sites():
    torch.manual_seed(0)
    report = _check_preserved(Tied(), torch.randn(2, C, 8, 8))
    for name in ("c1", "c2"):
        assert "tied" in _site_reason(report, name)


def _with_extra(kind):
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C))
    if kind == "conv parameter":
        model[0].alpha = nn.Parameter(torch.ones(1))
    elif kind == "bn buffer":
        model[1].register_buffer("ema_scale", torch.ones(C))
    elif kind == "bn child":
        model[1].act = nn.ReLU()
    elif kind == "conv forward":
        conv = model[0]
        conv.forward = lambda x: nn.Conv2d.forward(conv, x) * 2.0
    else:
        bn = model[1]
        bn.forward = lambda x: nn.BatchNorm2d.forward(bn, x).clamp(min=0)
    return model


@pytest.mark.parametrize("kind", ["conv parameter", "bn buffer", "bn child", "conv forward", "bn forward"])
def test_modules_with_state_or_methods_beyond_their_kind_are_left(kind):
    torch.manual_seed(0)
    model = _with_extra(kind)
    report = _check_preserved(model, torch.randn(2, 3, 8, 8))
    assert _site_reason(report, "0")
    folded, report = acfx.collapse(model, fold_bn=True, return_report=True)
    assert not report.of("folded"), report


@pytest.mark.skipif("bias" not in nn.BatchNorm2d.__init__.__code__.co_varnames,
                    reason="this torch has no BatchNorm2d(bias=...)")
def test_batch_norm_without_bias_is_left():
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C, bias=False))
    report = _check_preserved(model, torch.randn(2, 3, 8, 8))
    assert "bias=False" in _site_reason(report, "0")


# -- one mode's path only ----------------------------------------------------------------------------------
class EvalTap(nn.Module):
    """In eval the conv's output is also returned (a feature tap): only the eval path shows the second use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        return out if self.training else out + y


class TrainOnlyHead(nn.Module):
    """An auxiliary head used only in training (Inception-style): its site is rewritten."""

    def __init__(self):
        super().__init__()
        self.main = Block()
        self.aux = Block()

    def forward(self, x):
        y = self.main(x)
        return y + self.aux(y) if self.training else y


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_site_must_be_one_on_the_path_of_both_modes(mode):
    torch.manual_seed(0)
    model = EvalTap()
    randomize_bn(model).train(mode == "train")
    x = torch.randn(2, 3, 8, 8)
    acnet, report = acfx.expand(model, init="preserve", return_report=True)
    model.eval(), acnet.eval()
    assert_rel_close(acnet(x), model(x))
    assert "used by 2 nodes" in _site_reason(report, "conv")


def test_module_called_in_one_mode_only_is_rewritten():
    torch.manual_seed(0)
    model = randomize_bn(TrainOnlyHead()).train()
    acnet, report = acfx.expand(model, init="preserve", return_report=True)
    assert sorted(e.name for e in report.of("expanded")) == ["aux.conv", "main.conv"]
    x = torch.randn(2, C, 8, 8)
    assert_rel_close(acnet.eval()(x), model.eval()(x))


# -- a method that only shares a re-parameterisation method's name -----------------------------------------
class HasFuseHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = Block()

    def fuse(self, a, b):  # an ordinary helper that forward calls, not a re-parameterisation
        return a + b

    def forward(self, x):
        return self.fuse(self.blk(x), x)


def test_forward_helper_named_fuse_keeps_training_an_acnet():
    acnet = acfx.expand(HasFuseHelper())
    acnet.train()(torch.randn(2, C, 8, 8))
    assert isinstance(acnet.blk.conv, acfx.ACBlock), "the helper collapsed the model during training"


# -- collapse of modules in train mode ---------------------------------------------------------------------
def test_collapse_leaves_a_block_with_a_bn_kept_in_train_mode_and_warns_for_a_model_in_train_mode():
    torch.manual_seed(0)
    model = randomize_bn(TwoBranch()).eval()
    model.b1.train()  # test-time adaptation: one BN normalising with batch statistics, on purpose
    x = torch.randn(4, C, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported, not warned: the user chose it
        collapsed, report = acfx.collapse(model, return_report=True)
    (entry,) = report.entries
    assert entry.action == "skipped" and "b1 is a BatchNorm in train mode" in entry.detail, report
    with torch.no_grad():
        assert torch.equal(collapsed(x), model(x))  # still the batch-statistics function
    with pytest.warns(UserWarning, match=r"train mode.*acfx.collapse\(model.eval\(\)\)"):
        acfx.collapse(model.train())  # the whole model: a forgotten .eval(), fused for eval with the fix named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acfx.collapse(model.eval())


class FreezesOnTrain(nn.Module):
    """mmdet-style: train() freezes the stem's parameters (tensors the traced copy shares with the model)."""

    def __init__(self):
        super().__init__()
        self.stem, self.blk = nn.Conv2d(3, C, 1), Block()

    def train(self, mode=True):
        super().train(mode)
        self.stem.weight.requires_grad_(False)
        return self

    def forward(self, x):
        return self.blk(self.stem(x))


def test_tracing_the_other_mode_does_not_call_the_models_train():
    model = FreezesOnTrain()
    for module in model.modules():  # eval mode, without the override
        module.training = False
    acfx.expand(model, inplace=True)
    assert model.stem.weight.requires_grad, "expand ran the model's own train(), which froze a shared parameter"


# -- round 2: writes and reaches fx does not record as such ------------------------------------------------
@torch.fx.wrap
def _halve_in_place(t):
    t.mul_(0.5)  # opaque to fx: a call whose result the caller does not use


class HiddenInPlace(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.bn, self.how = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "augmented":
            t = y
            t += 1.0  # fx records an add whose result replaces t; at run time y changes
        elif self.how == "dunder":
            y.__iadd__(1.0)
        elif self.how == "out":
            torch.add(y.detach(), 1.0, out=y.detach())
        else:
            _halve_in_place(y)
        return self.bn(y)


@pytest.mark.parametrize("how", ["augmented", "dunder", "out", "wrapped"])
def test_writes_fx_records_as_unused_calls_leave_the_site(how):
    torch.manual_seed(0)
    model = randomize_bn(HiddenInPlace(how)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
        acnet, report = acfx.expand(model, init="preserve", return_report=True)
        assert_rel_close(acnet.eval()(x), y)
    assert _site_reason(report, "conv")


def _side(module, x):  # a module-level helper that reaches into a child
    return module.blk.conv(x)


class _Helpers:
    def side(self, module, x):
        return module.blk.conv(x)


HELPERS = _Helpers()


class UntracedBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blk = nn.Conv2d(3, C, 1), Block()

    def forward(self, x):
        return self.blk.conv(x)


class _Reaching(UntracedBase):
    """The top does not trace; ``reach`` calls blk.conv directly, through code fx never reads."""

    def forward(self, x):
        x = self.stem(x)
        if x.mean() < -100:
            return x
        return self.blk(x) + self.reach(x)


class BySuper(_Reaching):
    def reach(self, x):
        return super(_Reaching, self).forward(x)  # UntracedBase.forward: self.blk.conv(x)


class ByHelper(_Reaching):
    def reach(self, x):
        return _side(self, x)


class ByProperty(_Reaching):
    @property
    def tap(self):
        return self.blk.conv

    def reach(self, x):
        return self.tap(x)


class ByPartial(_Reaching):
    def __init__(self):
        super().__init__()
        import functools
        self.side = functools.partial(_side, self)

    def reach(self, x):
        return self.side(x)


class ByAttrgetter(_Reaching):
    def reach(self, x):
        import operator
        return operator.attrgetter("blk.conv")(self)(x)


class ByOtherObject(_Reaching):
    def reach(self, x):
        return HELPERS.side(self, x)


@pytest.mark.parametrize("cls", [BySuper, ByHelper, ByProperty, ByPartial, ByAttrgetter, ByOtherObject])
def test_code_that_does_not_trace_reaching_a_child_indirectly_leaves_the_site(cls):
    torch.manual_seed(0)
    report = _check_preserved(cls(), torch.randn(2, 3, 8, 8))
    assert "may call this module directly" in _site_reason(report, "blk.conv")


class CallsChildInCall(UntracedParentCallingWhole):
    def __call__(self, x):
        return super().__call__(x) + self.blk.conv(self.stem(x))


@pytest.mark.parametrize("where", ["root hook", "parent hook", "__call__"])
def test_hooks_and_call_overrides_reaching_a_child_leave_the_site(where):
    torch.manual_seed(0)
    model = CallsChildInCall() if where == "__call__" else UntracedParentCallingWhole()
    if where == "root hook":
        model.register_forward_hook(lambda mod, args, out: out + mod.blk.conv(mod.stem(args[0])))
    elif where == "parent hook":
        model.blk.register_forward_hook(lambda mod, args, out: out + mod.conv(args[0]))
    report = _check_preserved(model, torch.randn(2, 3, 8, 8))
    assert "may call this module directly" in _site_reason(report, "blk.conv")


class BnOnOtherInput(nn.Module):
    """Train mode normalises conv(x) with bn; eval mode normalises conv2(x) with the same bn."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.bn = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(3, C, 3, padding=1), \
            nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x)) if self.training else self.bn(self.conv2(x))


def test_bn_normalising_another_input_in_the_other_mode_leaves_the_site():
    torch.manual_seed(0)
    model = randomize_bn(BnOnOtherInput()).train()
    acnet, report = acfx.expand(model, init="preserve", return_report=True)
    x = torch.randn(2, 3, 8, 8)
    assert_rel_close(acnet.eval()(x), model.eval()(x))
    assert "normalises another input" in _site_reason(report, "conv")


class FlagByGetattr(UntracedParentCallingWhole):
    def forward(self, x):
        x = self.stem(x)
        if getattr(self, "debug", False) or x.mean() < -100:
            return x
        return self.blk(x)


def test_getattr_of_a_constant_name_is_not_a_dynamic_lookup():
    torch.manual_seed(0)
    report = _check_preserved(FlagByGetattr(), torch.randn(2, 3, 8, 8))
    assert [e.name for e in report.of("expanded")] == ["blk.conv"]


# -- round 3: what code that does not trace can and cannot reach -------------------------------------------
class LayerLoop(nn.Module):
    """mmdet-style: the top looks its stages up by computed name (direct children only) and does not trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU())
        self.layer1 = Block()
        self.stages = ["layer1"]

    def forward(self, x):
        assert x.shape[-1] >= 4, "input too small"  # a check on the input: the top does not trace
        x = self.stem(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return x


def test_computed_getattr_on_self_reaches_direct_children_only():
    torch.manual_seed(0)
    report = _check_preserved(LayerLoop(), torch.randn(2, 3, 8, 8))
    assert sorted(e.name for e in report.of("expanded")) == ["layer1.conv", "stem.0"]


class IndexesContainer(nn.Module):
    """The top does not trace and calls one item of a Sequential(conv, bn) on its own."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C))

    def forward(self, x):
        if x.mean() < -100:
            return x
        return self.seq(x) + self.seq[1](self.seq[0](x) * 2)


def test_indexing_a_container_reaches_its_items():
    torch.manual_seed(0)
    report = _check_preserved(IndexesContainer(), torch.randn(2, 3, 8, 8))
    assert "calls seq.0 in IndexesContainer.forward" in _site_reason(report, "seq.0")


class ListOfBlocks(nn.Module):
    """YOLOv8's C2f: the forward does not trace (a Proxy is iterated); its blocks sit in a ModuleList."""

    def __init__(self):
        super().__init__()
        self.m = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        ys = list(x.chunk(2, 1))
        ys.extend(block(ys[-1]) for block in self.m)
        return torch.cat(ys, 1)


def test_the_items_of_a_module_list_under_code_that_does_not_trace_are_traced_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2 * C, 1), ListOfBlocks())
    report = _check_preserved(model, torch.randn(2, 3, 8, 8))
    assert sorted(e.name for e in report.of("expanded")) == ["1.m.0.conv", "1.m.1.conv"]
