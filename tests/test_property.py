"""Property: for any conv geometry, collapse(expand(m)) computes what the expanded model computes.

Default: a few hundred random geometries. Thorough: HYPOTHESIS_PROFILE=thorough pytest tests/test_property.py
"""
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st
from timm.layers import Conv2dSame

import acfx

from helpers import assert_rel_close, randomize_bn

MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def geometries(draw):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    groups = draw(st.sampled_from([1, 2, 4]))
    same_tf = draw(st.booleans()) and draw(st.booleans())  # timm Conv2dSame, about a quarter of cases
    if not same_tf and stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        padding = (draw(st.integers(0, kh)), draw(st.integers(0, kw)))
    mode = "zeros" if same_tf else draw(st.sampled_from(MODES))
    size = (draw(st.integers(6, 17)), draw(st.integers(6, 17)))
    return dict(kernel=(kh, kw), stride=stride, dilation=dilation, groups=groups, padding=padding, mode=mode,
                same_tf=same_tf, size=size, bias=draw(st.booleans()),
                placement=draw(st.sampled_from(["centre", "border"])),
                norm=draw(st.sampled_from(["branch", "branch", "sum"])))


def _model(g):
    if g["same_tf"]:
        conv = Conv2dSame(4, 8, g["kernel"], g["stride"], 0, g["dilation"], g["groups"], bias=g["bias"])
    else:
        conv = nn.Conv2d(4, 8, g["kernel"], g["stride"], g["padding"], g["dilation"], g["groups"],
                         bias=g["bias"], padding_mode=g["mode"])
    return nn.Sequential(conv, nn.BatchNorm2d(8)).double()


@given(geometries(), st.integers(0, 2**16))
def test_any_geometry_round_trips(g, seed):
    torch.manual_seed(seed)
    model = randomize_bn(_model(g), seed).eval()
    x = torch.randn(2, 4, *g["size"], dtype=torch.float64)
    try:
        model(x)
    except RuntimeError:
        assume(False)  # the geometry does not fit this input (kernel larger than padded input, ...)
    expanded, report = acfx.expand(model, placement=g["placement"], norm=g["norm"], return_report=True)
    if min(g["kernel"]) == 1:
        assert report.skipped and type(expanded[0]) is type(model[0])
        return
    assert isinstance(expanded[0], acfx.ACBlock), report
    expanded = randomize_bn(expanded, seed + 1).eval()
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[0]) is type(model[0])
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x), what=str(g))
    _model(g).load_state_dict(collapsed.state_dict(), strict=True)
