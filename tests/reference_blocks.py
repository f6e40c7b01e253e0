"""Blocks written the way the ACNet, RepVGG and DBB repositories write theirs (in acfx's own words)."""
import torch.nn as nn


class Crop(nn.Module):
    """Removes rows and columns on both sides, as ACNet's crop layer does (a no-op when both are 0)."""

    def __init__(self, rows, cols):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        if self.rows == 0 and self.cols == 0:
            return x
        if self.cols == 0:
            return x[:, :, self.rows:-self.rows, :]
        if self.rows == 0:
            return x[:, :, :, self.cols:-self.cols]
        return x[:, :, self.rows:-self.rows, self.cols:-self.cols]


class PaperACB(nn.Module):
    """ACNet's block: k×k, k×1 and 1×k conv→BN branches summed; each asymmetric branch reads its input
    through a crop layer, an nn.Identity when padding ≥ k//2. Every conv pads in ``padding_mode``."""

    def __init__(self, cin, cout, k, stride=1, padding=0, padding_mode="zeros"):
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False, padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(cout)
        offset = padding - k // 2
        if offset >= 0:
            self.ver_crop, self.hor_crop = nn.Identity(), nn.Identity()
            ver_pad, hor_pad = (padding, offset), (offset, padding)
        else:
            self.ver_crop, self.hor_crop = Crop(0, -offset), Crop(-offset, 0)
            ver_pad, hor_pad = (padding, 0), (0, padding)
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, ver_pad, bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, hor_pad, bias=False, padding_mode=padding_mode)
        self.ver_bn, self.hor_bn = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        ver = self.ver_bn(self.ver_conv(self.ver_crop(x)))
        hor = self.hor_bn(self.hor_conv(self.hor_crop(x)))
        return square + ver + hor


def conv_bn(cin, cout, k, stride=1, padding=0):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class RepVGGStyle(nn.Module):
    """RepVGG's training block: 3×3 and 1×1 conv→BN branches plus an identity BN where shapes allow
    (else the constant 0), then a nonlinearity."""

    def __init__(self, cin, cout, stride=1, act=True):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.dense = conv_bn(cin, cout, 3, stride, 1)
        self.one = conv_bn(cin, cout, 1, stride, 0)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        id_out = 0 if self.identity is None else self.identity(x)
        return self.act(self.dense(x) + self.one(x) + id_out)


class DBBStyle(nn.Module):
    """A Diverse Branch Block: k×k, 1×1, 1×1→avg and 1×1→k×k branches, summed in place."""

    def __init__(self, c, k=3):
        super().__init__()
        self.origin = conv_bn(c, c, k, 1, k // 2)
        self.one = conv_bn(c, c, 1)
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.AvgPool2d(k, 1, k // 2),
                                 nn.BatchNorm2d(c))
        self.one_kxk = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                                     nn.Conv2d(c, c, k, 1, k // 2, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.origin(x)
        out += self.one(x)
        out += self.avg(x)
        out += self.one_kxk(x)
        return out
