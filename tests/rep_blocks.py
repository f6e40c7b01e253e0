"""Re-parameterisable blocks as their repositories write them, re-implemented from their descriptions.

Each block keeps its repository's structure, module names and training forward (the branches, where the
sum sits, what follows it, the in-place sums, the layers fx cannot trace), and each has the deploy
conversion its repository describes (``deploy()``: the block with its branches fused by its own method),
written here independently of acfx, so that acfx's collapse is checked against it.

Sources: RepVGG (DingXiaoH/RepVGG, repvgg.py: RepVGGBlock, SEBlock), DBB (DingXiaoH/DiverseBranchBlock:
DiverseBranchBlock, IdentityBasedConv1x1, BNAndPadLayer, dbb_transforms), OREPA (JUGGHM/OREPA_CVPR2022,
blocks.py: OREPA and its weight_gen), MobileOne (apple/ml-mobileone: MobileOneBlock), RepGhost
(ChengpengChen/RepGhost: RepGhostModule), YOLOv6 (meituan/YOLOv6: RepVGGBlock, QARepVGGBlock), YOLOv7
(WongKinYiu/yolov7: RepConv, ImplicitA, ImplicitM), RepLKNet (DingXiaoH/RepLKNet-pytorch: ReparamLargeKernelConv),
UniRepLKNet (AILab-CVC/UniRepLKNet: DilatedReparamBlock), SESR (ARM-software/sesr: collapsible linear blocks),
ECBSR (xindongzhang/ECBSR: ECB and its SeqConv3x3 branches, whose 1×1 output is padded with its bias in place).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- the deploy conversions, as the repositories describe them ------------------------------------------
def fuse_bn(kernel, bn):
    """A kernel and the eval BN after it as (kernel, bias): RepVGG's _fuse_bn_tensor, DBB's transI."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    return kernel * (gamma / std).reshape(-1, 1, 1, 1), beta - bn.running_mean * gamma / std


def identity_kernel(channels, groups, k, like):
    """The identity as a k×k kernel: 1 at the centre of each channel's own input (RepVGG's id_tensor)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=like.dtype)
    for i in range(channels):
        kernel[i, i % per_group, k // 2, k // 2] = 1
    return kernel


def pad_to(kernel, k):
    """A 1×1 kernel at the centre of a k×k one (RepVGG's _pad_1x1_to_3x3_tensor, DBB's transVI)."""
    pad = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def one_by_one_then_kxk(k1, b1, k2, b2, groups):
    """DBB's transIII: a 1×1 (k1, b1) followed by a k×k (k2, b2) as one kernel and bias, per group."""
    if groups == 1:
        kernel = F.conv2d(k2, k1.permute(1, 0, 2, 3))
        bias = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    else:
        kernels, biases = [], []
        w1 = k1.shape[0] // groups
        w2 = k2.shape[0] // groups
        for g in range(groups):
            k1_g = k1[g * w1:(g + 1) * w1].permute(1, 0, 2, 3)
            k2_g = k2[g * w2:(g + 1) * w2]
            kernels.append(F.conv2d(k2_g, k1_g))
            biases.append((k2_g * b1[g * w1:(g + 1) * w1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
        kernel, bias = torch.cat(kernels), torch.cat(biases)
    return kernel, bias + b2


def avg_kernel(channels, k, groups, like):
    """DBB's transV: average pooling as a k×k kernel."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=like.dtype)
    kernel[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / (k * k)
    return kernel


def deploy_conv(template, kernel, bias):
    conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, template.stride,
                     template.padding, template.dilation, template.groups, bias=True)
    conv = conv.to(kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class Deployed(nn.Module):
    """What a block's own deploy conversion leaves: one conv (its branches fused), then what followed."""

    def __init__(self, conv, after):
        super().__init__()
        self.reparam, self.after = conv, after

    def forward(self, x):
        return self.after(self.reparam(x))


# -- RepVGG ---------------------------------------------------------------------------------------------------
class SEBlock(nn.Module):
    """RepVGG's squeeze-and-excitation: global average pool, 1×1 down, ReLU, 1×1 up, sigmoid, rescale."""

    def __init__(self, channels, internal):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)
        self.input_channels = channels

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        return inputs * x.view(-1, self.input_channels, 1, 1)


class RepVGGBlock(nn.Module):
    """RepVGG's training block: 3×3 and 1×1 conv→BN, an identity BN where shapes allow, SE, ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1, use_se=False):
        super().__init__()
        self.groups = groups
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(cout, cout // 4) if use_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def deploy(self):
        k3, b3 = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = k3 + pad_to(k1, 3), b3 + b1
        if self.rbr_identity is not None:
            conv = self.rbr_dense.conv
            ki, bi = fuse_bn(identity_kernel(conv.in_channels, self.groups, 3, kernel), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return Deployed(deploy_conv(self.rbr_dense.conv, kernel, bias), nn.Sequential(self.se, self.nonlinearity))


# -- YOLOv6 ---------------------------------------------------------------------------------------------------
class YOLOv6RepVGGBlock(RepVGGBlock):
    """YOLOv6's RepVGGBlock: RepVGG's, with its own names and no SE by default."""


class QARepVGGBlock(nn.Module):
    """YOLOv6's quantization-aware RepVGG block: 3×3 conv→BN, a bare 1×1 conv, the identity, one BN after
    the sum, ReLU (RepOpt's QARepVGG: no BN on the 1×1 and identity branches)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.bn = nn.BatchNorm2d(cout)
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.rbr_identity = nn.Identity() if cout == cin and stride == 1 else None

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)))

    def deploy(self):
        k3, b3 = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        kernel = k3 + pad_to(self.rbr_1x1.weight, 3)
        if self.rbr_identity is not None:
            kernel = kernel + identity_kernel(self.rbr_dense.conv.in_channels, 1, 3, kernel)
        kernel, bias = fuse_bn(kernel, self.bn)
        bias = bias + b3 * self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        return Deployed(deploy_conv(self.rbr_dense.conv, kernel, bias), self.nonlinearity)


# -- YOLOv7 ---------------------------------------------------------------------------------------------------
class RepConv(nn.Module):
    """YOLOv7's RepConv: an identity BN where shapes allow, 3×3 conv→BN and 1×1 conv→BN, SiLU."""

    def __init__(self, c1, c2, k=3, s=1):
        super().__init__()
        self.act = nn.SiLU()
        self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, bias=False), nn.BatchNorm2d(c2))

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def deploy(self):
        k3, b3 = fuse_bn(self.rbr_dense[0].weight, self.rbr_dense[1])
        k1, b1 = fuse_bn(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        kernel, bias = k3 + pad_to(k1, 3), b3 + b1
        if self.rbr_identity is not None:
            ki, bi = fuse_bn(identity_kernel(self.rbr_dense[0].in_channels, 1, 3, kernel), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return Deployed(deploy_conv(self.rbr_dense[0], kernel, bias), self.act)


class ImplicitA(nn.Module):
    """YOLOv7's implicit addition: a learnt per-channel constant added to the input."""

    def __init__(self, channel):
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, std=0.02)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    """YOLOv7's implicit multiplication: a learnt per-channel scale of the input."""

    def __init__(self, channel):
        super().__init__()
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=0.02)

    def forward(self, x):
        return self.implicit * x


class ImplicitHead(nn.Module):
    """One level of YOLOv7's IDetect: ImplicitA, the 1×1 output conv, ImplicitM (its notebook folds them)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.ia, self.m, self.im = ImplicitA(cin), nn.Conv2d(cin, cout, 1), ImplicitM(cout)

    def forward(self, x):
        return self.im(self.m(self.ia(x)))

    def deploy(self):
        # YOLOv7's fuse: the conv's bias gains W·a, then the kernel and bias are scaled by m.
        kernel = self.m.weight
        bias = self.m.bias + (kernel * self.ia.implicit.reshape(1, -1, 1, 1)).sum((1, 2, 3))
        scale = self.im.implicit.reshape(-1)
        return deploy_conv(self.m, kernel * scale.reshape(-1, 1, 1, 1), bias * scale)


# -- MobileOne ------------------------------------------------------------------------------------------------
class MobileOneBlock(nn.Module):
    """MobileOne's block: k parallel k×k conv→BN branches, a 1×1 conv→BN scale branch, a skip BN where shapes
    allow, summed in place, then SE (Identity here) and ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, num_conv_branches=4):
        super().__init__()
        self.groups, self.kernel_size = groups, kernel_size
        self.num_conv_branches = num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(cin, cout, kernel_size, stride, kernel_size // 2, groups)
                                       for _ in range(num_conv_branches)])
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel_size > 1 else None

    def forward(self, x):
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def deploy(self):
        k = self.kernel_size
        kernel, bias = 0, 0
        for branch in self.rbr_conv:
            kb, bb = fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + kb, bias + bb
        if self.rbr_scale is not None:
            ks, bs = fuse_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            kernel, bias = kernel + pad_to(ks, k), bias + bs
        if self.rbr_skip is not None:
            template = self.rbr_conv[0].conv
            ki, bi = fuse_bn(identity_kernel(template.in_channels, self.groups, k, kernel), self.rbr_skip)
            kernel, bias = kernel + ki, bias + bi
        return Deployed(deploy_conv(self.rbr_conv[0].conv, kernel, bias), nn.Sequential(self.se, self.activation))


# -- RepGhost -------------------------------------------------------------------------------------------------
class RepGhostModule(nn.Module):
    """RepGhost's module: a 1×1 primary conv→BN→ReLU, then a depthwise conv→BN plus a BN of its input
    (the re-parameterisable fusion), ReLU."""

    def __init__(self, cin, cout, dw_size=3):
        super().__init__()
        self.primary_conv = nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout),
                                          nn.ReLU(inplace=True))
        self.cheap_operation = nn.Sequential(nn.Conv2d(cout, cout, dw_size, 1, dw_size // 2, groups=cout, bias=False),
                                             nn.BatchNorm2d(cout))
        self.fusion_bn = nn.ModuleList([nn.BatchNorm2d(cout)])
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for bn in self.fusion_bn:
            x2 = x2 + bn(x1)
        return self.relu(x2)

    def deploy(self):
        conv = self.cheap_operation[0]
        kernel, bias = fuse_bn(conv.weight, self.cheap_operation[1])
        ki, bi = fuse_bn(identity_kernel(conv.in_channels, conv.groups, conv.kernel_size[0], kernel), self.fusion_bn[0])
        cheap = deploy_conv(conv, kernel + ki, bias + bi)
        return nn.Sequential(self.primary_conv, cheap, self.relu)


# -- DBB ------------------------------------------------------------------------------------------------------
class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1×1 conv whose kernel is its weight plus the identity, computed at every forward."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        identity[torch.arange(channels), torch.arange(channels) % per_group] = 1
        self.id_tensor = identity
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self):
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    """DBB's BN followed by a pad with the BN's own shift, written by assignment into the padded tensor."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps)
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    """DBB: k×k conv→BN, 1×1 conv→BN, 1×1 → BNAndPad → avg → BN and (identity-based) 1×1 → BNAndPad → k×k →
    BN, summed in place, then the nonlinearity."""

    def __init__(self, cin, cout, k, stride=1, groups=1, nonlinear=None):
        super().__init__()
        padding = k // 2
        self.kernel_size, self.out_channels, self.groups = k, cout, groups
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def deploy(self):
        k = self.kernel_size
        k_origin, b_origin = fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        kernel, bias = k_origin, b_origin
        if hasattr(self, "dbb_1x1"):
            k1, b1 = fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            kernel, bias = kernel + pad_to(k1, k), bias + b1
        first = self.dbb_1x1_kxk
        k_first = first.idconv1.get_actual_kernel() if hasattr(first, "idconv1") else first.conv1.weight
        k_first, b_first = fuse_bn(k_first, first.bn1.bn)
        k_second, b_second = fuse_bn(first.conv2.weight, first.bn2)
        km, bm = one_by_one_then_kxk(k_first, b_first, k_second, b_second, self.groups)
        kernel, bias = kernel + km, bias + bm
        k_avg, b_avg = fuse_bn(avg_kernel(self.out_channels, k, self.groups, kernel), self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k_pre, b_pre = fuse_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
            k_avg, b_avg = one_by_one_then_kxk(k_pre, b_pre, k_avg, b_avg, self.groups)
        kernel, bias = kernel + k_avg, bias + b_avg
        return Deployed(deploy_conv(self.dbb_origin.conv, kernel, bias), self.nonlinear)


# -- OREPA ----------------------------------------------------------------------------------------------------
class OREPA(nn.Module):
    """OREPA's block: one conv whose kernel is generated at every forward from six scaled linear branches
    (origin, 1×1→avg, 1×1→prior, identity-based 1×1→k×k, 1×1, depthwise→pointwise), then the BN and the
    nonlinearity."""

    def __init__(self, cin, cout, k, stride=1, groups=1, nonlinear=None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = cin, cout, k
        self.stride, self.padding, self.dilation, self.groups = stride, k // 2, 1, groups
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        per_group = cin // groups
        self.weight_orepa_origin = nn.Parameter(torch.empty(cout, per_group, k, k))
        nn.init.kaiming_uniform_(self.weight_orepa_origin, a=0.0)
        self.weight_orepa_avg_conv = nn.Parameter(torch.empty(cout, per_group, 1, 1))
        self.weight_orepa_pfir_conv = nn.Parameter(torch.empty(cout, per_group, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_avg_conv, a=0.0)
        nn.init.kaiming_uniform_(self.weight_orepa_pfir_conv, a=0.0)
        self.register_buffer("weight_orepa_avg_avg", torch.ones(k, k).mul(1.0 / k / k))
        self.weight_orepa_1x1 = nn.Parameter(torch.empty(cout, per_group, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_1x1, a=0.0)
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(cin, per_group, 1, 1))
        identity = torch.zeros(cin, per_group, 1, 1)
        identity[torch.arange(cin), torch.arange(cin) % per_group] = 1
        self.register_buffer("id_tensor", identity)
        self.weight_orepa_1x1_kxk_conv2 = nn.Parameter(torch.empty(cout, per_group, k, k))
        nn.init.kaiming_uniform_(self.weight_orepa_1x1_kxk_conv2, a=0.0)
        expand = 8
        self.weight_orepa_gconv_dw = nn.Parameter(torch.empty(cin * expand, 1, k, k))
        self.weight_orepa_gconv_pw = nn.Parameter(torch.empty(cout, cin * expand // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight_orepa_gconv_dw, a=0.0)
        nn.init.kaiming_uniform_(self.weight_orepa_gconv_pw, a=0.0)
        prior = torch.empty(cout, k, k)
        half = cout / 2
        for i in range(cout):
            for h in range(k):
                for w in range(k):
                    prior[i, h, w] = (math.cos(math.pi * (h + 0.5) * (i + 1) / 3) if i < half else
                                      math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3))
        self.register_buffer("weight_orepa_prior", prior)
        self.vector = nn.Parameter(torch.tensor([[0.25], [0.25], [0.0], [0.5], [1.0], [0.5]]).repeat(1, cout))
        self.bn = nn.BatchNorm2d(cout)

    def weight_gen(self):
        origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, self.vector[0, :])
        avg = torch.einsum("oihw,o->oihw", torch.einsum("oi,hw->oihw", self.weight_orepa_avg_conv.squeeze(3).squeeze(2),
                                                      self.weight_orepa_avg_avg), self.vector[1, :])
        pfir = torch.einsum("oihw,o->oihw", torch.einsum("oi,ohw->oihw", self.weight_orepa_pfir_conv.squeeze(3).squeeze(2),
                                                       self.weight_orepa_prior), self.vector[2, :])
        first = (self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor).squeeze(3).squeeze(2)
        second = self.weight_orepa_1x1_kxk_conv2
        if self.groups > 1:
            g = self.groups
            t, ig = first.size()
            o, tg, h, w = second.size()
            chain = torch.einsum("gti,gothw->goihw", first.view(g, t // g, ig), second.view(g, o // g, tg, h, w))
            chain = chain.reshape(o, ig, h, w)
        else:
            chain = torch.einsum("ti,othw->oihw", first, second)
        chain = torch.einsum("oihw,o->oihw", chain, self.vector[3, :])
        pad = (self.kernel_size - 1) // 2
        one = torch.einsum("oihw,o->oihw", F.pad(self.weight_orepa_1x1, [pad] * 4), self.vector[4, :])
        gconv = torch.einsum("oihw,o->oihw", self.dwsc2full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw,
                                                           self.in_channels, self.groups), self.vector[5, :])
        return origin + avg + one + chain + pfir + gconv

    def dwsc2full(self, weight_dw, weight_pw, groups, groups_conv=1):
        t, ig, h, w = weight_dw.size()
        o = weight_pw.size(0)
        tg, i = t // groups, ig * groups
        ogc, groups_gc = o // groups_conv, groups // groups_conv
        weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, h, w)
        weight_pw = weight_pw.squeeze().view(ogc, groups_conv, groups_gc, tg)
        return torch.einsum("cgtihw,ocgt->cogihw", weight_dw, weight_pw).reshape(o, i // groups_conv, h, w)

    def forward(self, inputs):
        weight = self.weight_gen()
        out = F.conv2d(inputs, weight, bias=None, stride=self.stride, padding=self.padding, dilation=self.dilation,
                       groups=self.groups)
        return self.nonlinear(self.bn(out))

    def deploy(self):
        kernel, bias = fuse_bn(self.weight_gen(), self.bn)
        template = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups)
        return Deployed(deploy_conv(template, kernel, bias), self.nonlinear)


# -- RepLKNet, UniRepLKNet --------------------------------------------------------------------------------------
class ReparamLargeKernelConv(nn.Module):
    """RepLKNet's large depthwise kernel: a k×k conv→BN beside a small (5×5) conv→BN, summed in place."""

    def __init__(self, channels, kernel_size, small_kernel=5):
        super().__init__()
        self.lkb_origin = conv_bn(channels, channels, kernel_size, 1, kernel_size // 2, channels)
        self.small_conv = conv_bn(channels, channels, small_kernel, 1, small_kernel // 2, channels)

    def forward(self, inputs):
        out = self.lkb_origin(inputs)
        out += self.small_conv(inputs)
        return out

    def deploy(self):
        kernel, bias = fuse_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        ks, bs = fuse_bn(self.small_conv.conv.weight, self.small_conv.bn)
        return deploy_conv(self.lkb_origin.conv, kernel + pad_to(ks, kernel.shape[-1]), bias + bs)


# UniRepLKNet's small kernels and dilations beside each large kernel size
DILATED_BRANCHES = {7: ([5, 3, 3], [1, 2, 3]), 9: ([5, 5, 3, 3], [1, 2, 3, 4]), 13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5])}


def dilated_to_dense(kernel, dilation):
    """A dilated kernel as a dense one with zeros between its taps: UniRepLKNet's transposed conv of the kernel
    with a 1×1 one at stride ``dilation``."""
    if dilation == 1:
        return kernel
    ones = torch.ones(1, 1, 1, 1, dtype=kernel.dtype)
    return F.conv_transpose2d(kernel.flatten(0, 1).unsqueeze(1), ones, stride=dilation).view(
        *kernel.shape[:2], *[(k - 1) * dilation + 1 for k in kernel.shape[-2:]])


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's block: a large depthwise conv→BN beside depthwise conv→BN branches of smaller dilated
    kernels (made with setattr), summed; each dilated kernel covers at most the large one."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=False)
        self.origin_bn = nn.BatchNorm2d(channels)
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]
        for k, r in zip(self.kernel_sizes, self.dilates):
            self.__setattr__(f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, 1, (r * (k - 1) + 1) // 2,
                                                            dilation=r, groups=channels, bias=False))
            self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            bn = self.__getattr__(f"dil_bn_k{k}_{r}")
            out = out + bn(conv(x))
        return out

    def deploy(self):
        kernel, bias = fuse_bn(self.lk_origin.weight, self.origin_bn)
        for k, r in zip(self.kernel_sizes, self.dilates):
            kd, bd = fuse_bn(self.__getattr__(f"dil_conv_k{k}_{r}").weight, self.__getattr__(f"dil_bn_k{k}_{r}"))
            kernel, bias = kernel + pad_to(dilated_to_dense(kd, r), kernel.shape[-1]), bias + bd
        return deploy_conv(self.lk_origin, kernel, bias)


# -- SESR -------------------------------------------------------------------------------------------------------
class CollapsibleLinearBlock(nn.Module):
    """SESR's collapsible linear block: a k×k conv expanding the channels, a 1×1 conv projecting them back,
    no activation between, and a short residual (none where the block strides)."""

    def __init__(self, channels, expanded, kernel_size, stride=1, residual=True):
        super().__init__()
        self.conv_expand = nn.Conv2d(channels, expanded, kernel_size, stride, kernel_size // 2)
        self.conv_squeeze = nn.Conv2d(expanded, channels, 1)
        self.residual = residual and stride == 1

    def forward(self, x):
        out = self.conv_squeeze(self.conv_expand(x))
        return out + x if self.residual else out

    def deploy(self):
        # the 1×1 kernel applied to the k×k one, as to an image of its input channels (SESR's collapse)
        kernel = F.conv2d(self.conv_expand.weight.permute(1, 0, 2, 3), self.conv_squeeze.weight).permute(1, 0, 2, 3)
        bias = self.conv_squeeze.weight[:, :, 0, 0] @ self.conv_expand.bias + self.conv_squeeze.bias
        if self.residual:
            kernel = kernel + identity_kernel(kernel.shape[0], 1, kernel.shape[-1], kernel)
        e = self.conv_expand
        return deploy_conv(nn.Conv2d(e.in_channels, e.in_channels, e.kernel_size, e.stride, e.padding), kernel, bias)


# -- ECBSR ------------------------------------------------------------------------------------------------------
_EDGE_MASKS = {"conv1x1-sobelx": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
               "conv1x1-sobely": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
               "conv1x1-laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]]}


class SeqConv3x3(nn.Module):
    """ECBSR's sequential branch: a 1×1 conv, its output padded by one pixel with the 1×1's bias (assigned
    into the zero-padded map, so that the branch is one 3×3 conv of a zero-padded input), then a learned 3×3
    (``conv1x1-conv3x3``) or a fixed edge mask times a learned per-channel scale, depthwise. ``functional``:
    the 1×1 as parameters and F.conv2d, as ECBSR writes it; else an nn.Conv2d."""

    def __init__(self, kind, cin, cout, depth_multiplier=2, functional=True):
        super().__init__()
        self.kind, self.cout, self.functional = kind, cout, functional
        mid = cout * depth_multiplier if kind == "conv1x1-conv3x3" else cout
        first = nn.Conv2d(cin, mid, 1)
        if functional:
            self.k0, self.b0 = first.weight, first.bias
        else:
            self.conv0 = first
        if kind == "conv1x1-conv3x3":
            second = nn.Conv2d(mid, cout, 3)
            self.k1, self.b1 = second.weight, second.bias
        else:
            self.scale = nn.Parameter(torch.randn(cout, 1, 1, 1) * 1e-3)
            self.bias = nn.Parameter(torch.randn(cout) * 1e-3)
            mask = torch.tensor(_EDGE_MASKS[kind], dtype=torch.float32)
            self.register_buffer("mask", mask.expand(cout, 1, 3, 3).clone())

    def _first(self):
        return (self.k0, self.b0) if self.functional else (self.conv0.weight, self.conv0.bias)

    def forward(self, x):
        k0, b0 = self._first()
        y0 = F.conv2d(x, k0, b0) if self.functional else self.conv0(x)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
        b0_pad = b0.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b0_pad
        y0[:, :, -1:, :] = b0_pad
        y0[:, :, :, 0:1] = b0_pad
        y0[:, :, :, -1:] = b0_pad
        if self.kind == "conv1x1-conv3x3":
            return F.conv2d(y0, self.k1, self.b1)
        return F.conv2d(y0, self.scale * self.mask, self.bias, groups=self.cout)

    def rep_params(self):
        k0, b0 = self._first()
        if self.kind == "conv1x1-conv3x3":  # the 3×3 applied to the 1×1 kernel; the bias sees b0 at every tap
            return (F.conv2d(self.k1, k0.permute(1, 0, 2, 3)),
                    (self.k1 * b0.reshape(1, -1, 1, 1)).sum((1, 2, 3)) + self.b1)
        depthwise = self.scale * self.mask  # [cout, 1, 3, 3]
        return depthwise * k0, depthwise.sum((1, 2, 3)) * b0 + self.bias


class ECB(nn.Module):
    """ECBSR's edge-oriented conv block: a 3×3, the four SeqConv3x3 branches and the identity (when the
    channels allow), summed, then the activation."""

    def __init__(self, cin, cout, depth_multiplier=2, with_idt=True, functional=True):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.with_idt = with_idt and cin == cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1x1_3x3 = SeqConv3x3("conv1x1-conv3x3", cin, cout, depth_multiplier, functional)
        self.conv1x1_sbx = SeqConv3x3("conv1x1-sobelx", cin, cout, functional=functional)
        self.conv1x1_sby = SeqConv3x3("conv1x1-sobely", cin, cout, functional=functional)
        self.conv1x1_lpl = SeqConv3x3("conv1x1-laplacian", cin, cout, functional=functional)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        y = self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_sby(x) + self.conv1x1_lpl(x)
        if self.with_idt:
            y = y + x
        return self.act(y)

    def deploy(self):
        kernel, bias = self.conv3x3.weight, self.conv3x3.bias
        for branch in (self.conv1x1_3x3, self.conv1x1_sbx, self.conv1x1_sby, self.conv1x1_lpl):
            k, b = branch.rep_params()
            kernel, bias = kernel + k, bias + b
        if self.with_idt:
            kernel = kernel + identity_kernel(self.out_channels, 1, 3, kernel)
        return Deployed(deploy_conv(self.conv3x3, kernel, bias), self.act)


# -- whole models ---------------------------------------------------------------------------------------------
class RepVGG(nn.Module):
    """RepVGG as its repository builds it: stage 0 one block of stride 2, stages 1-4 of ``num_blocks`` blocks
    (the first of each of stride 2), widths 64·a, 128·a, 256·a, 512·b; global pooling and a linear head."""

    def __init__(self, num_blocks=(2, 4, 14, 1), width_multiplier=(0.75, 0.75, 0.75, 2.5), num_classes=10):
        super().__init__()
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=2)
        self.stage1 = self._make_stage(int(64 * width_multiplier[0]), num_blocks[0])
        self.stage2 = self._make_stage(int(128 * width_multiplier[1]), num_blocks[1])
        self.stage3 = self._make_stage(int(256 * width_multiplier[2]), num_blocks[2])
        self.stage4 = self._make_stage(int(512 * width_multiplier[3]), num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes, num_blocks):
        blocks = []
        for stride in [2] + [1] * (num_blocks - 1):
            blocks.append(RepVGGBlock(self.in_planes, planes, stride=stride))
            self.in_planes = planes
        return nn.ModuleList(blocks)

    def forward(self, x):
        out = self.stage0(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            for block in stage:
                out = block(out)
        return self.linear(self.gap(out).view(out.size(0), -1))


class DBBBasicBlock(nn.Module):
    """A ResNet basic block built with DBB in place of each conv→BN (DBB's resnet.py with blocktype 'DBB')."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.conv1 = DiverseBranchBlock(cin, cout, 3, stride, nonlinear=nn.ReLU())
        self.conv2 = DiverseBranchBlock(cout, cout, 3, 1)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DBBResNet18(nn.Module):
    """ResNet-18 with DBB blocks: a DBB 7×7 stem of stride 2, max pooling, four stages of two basic blocks."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stage0 = DiverseBranchBlock(3, width, 7, 2, nonlinear=nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [DBBBasicBlock(cin, cout, 1 if i == 0 else 2), DBBBasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.gap(self.layers(self.pool(self.stage0(x)))), 1))
