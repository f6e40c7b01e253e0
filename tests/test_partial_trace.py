"""Models that do not trace as a whole: the largest parts that do are expanded, the rest reported."""
import torch
import torch.nn as nn

import acfx

from helpers import assert_rel_close, randomize_bn


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Dynamic(nn.Module):
    """Data-dependent control flow at the top level: fx cannot trace the model, only its children."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 8)
        self.b = ConvBN(8, 8)
        self.c = ConvBN(8, 8)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = self.b(x)
        return self.c(x)


def test_untraceable_model_expands_its_traceable_children():
    torch.manual_seed(0)
    model = Dynamic()
    expanded, report = acfx.expand(model, return_report=True)
    (untraced,) = report.of("untraced")
    assert untraced.name == "" and "traced its children instead" in untraced.detail
    assert sorted(e.name for e in report.of("expanded")) == ["a.0", "b.0", "c.0"]
    assert type(expanded) is Dynamic
    expanded = randomize_bn(expanded).eval()
    collapsed, creport = acfx.collapse(expanded, return_report=True)
    assert len(creport.of("collapsed")) == 3
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
    Dynamic().load_state_dict(collapsed.state_dict(), strict=True)


def test_model_with_nothing_to_expand_comes_back_unchanged_with_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    expanded, report = acfx.expand(model, return_report=True)
    assert [type(m) for m in expanded] == [type(m) for m in model]
    assert report.skip_reasons() == {"kernel (1, 1) has a side of 1": 1}
    empty, report = acfx.expand(nn.Linear(3, 3), return_report=True)
    assert type(empty) is nn.Linear and report.summary() == "acfx expand: nothing found"


class Opaque(ConvBN):
    pass


def test_user_leaf_modules_are_not_traced_into():
    model = nn.Sequential(Opaque(3, 8), ConvBN(8, 8))
    expanded, report = acfx.expand(model, leaf_modules=[Opaque], return_report=True)
    assert [e.name for e in report.of("expanded")] == ["1.0"]
    assert type(expanded[0][0]) is nn.Conv2d
