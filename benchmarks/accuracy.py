"""Does ACNet train a better model on real data, at the same inference cost? Train and measure, end to end.

    python benchmarks/accuracy.py                  # scikit-learn's digits, CIFAR-style ResNet-20, 5 seeds
    python benchmarks/accuracy.py --quick          # 1 seed, 5 epochs, every variant: a smoke run
    python benchmarks/accuracy.py --data ~/data/cifar10 --size 32 --model cifar_resnet56 --epochs 200 --device cuda

Every variant trains under one recipe: for each seed the same initial base weights (the ACNet variants are
acfx.expand of a copy of them, so the k×k branch starts from the base conv's init), the same data order and
augmentation (a torch.Generator per seed, separate from model init), the same optimizer and schedule. Variants:
base, acnet (both asymmetric branches, BN γ = 1), acnet-hor, acnet-ver (the paper's Table 4), online (acfx's
OREPA-style mode), acnet-gamma3 (branch BN γ initialised to 1/3: the reference's advice when training does not
improve, and the setting its own CIFAR runs use, gamma_init=0.333 in acnet/do_acnet.py), acnet-sum
(norm="sum": one BN after the sum of the three convs, a candidate int8 fix), the later recipes (repvgg, dbb,
mobileone and their online forms), repvgg-balanced (gamma_init="balanced") and dbb-gamma4 / mobileone-gamma6
(every branch BN's γ at 1/4 and 1/6: "balanced" on DBB's four branches, and on MobileOne's six where the
identity applies), so that a many-branch block starts at the scale of one conv. --variants picks a subset.

For every trained model: top-1 of the trained (expanded) model, of acfx.collapse and of
acfx.collapse(fold_bn=True), asserted to predict identically; of int8 models (post-training quantization of
the collapsed model with torch.ao in FX graph mode, x86 backend, calibrated on training images; per-channel
and per-tensor weight scales; weights-only rounding to tell weight from activation error; optionally a
quantization-aware fine-tune); on rotated and flipped test images (90°, 180°, up-down and left-right flips,
none of which training sees: the paper's robustness table); the average kernel magnitude matrix (the paper's
Sect. 4.4) and its skeleton-to-corner ratio; the per-layer weight SQNR. Output: STEM.json, STEM.md and STEM.png
(benchmarks/accuracy_report.py).

Data: by default scikit-learn's digits (1,797 real 8×8 handwritten digits shipped inside scikit-learn, no
download), upsampled to --size, split as scikit-learn's own digits example does (first half train, second half
test, no shuffle). --data PATH takes torchvision's CIFAR-10 folder (PATH holds cifar-10-batches-py), an
ImageFolder tree with train/ and test/ (or val/) subfolders, or one ImageFolder tree (a fixed, stratified 80/20
split); images are resized to --size and held in memory.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from outputs import output_file  # noqa: E402

import acfx  # noqa: E402
from acfx.tools.kernels import kernel_magnitude  # noqa: E402  (the one import of it: its path may move)

import accuracy_int8 as int8  # noqa: E402
import accuracy_report as report  # noqa: E402
from environment import collect, stamp  # noqa: E402

__all__ = ["Variant", "VARIANTS", "DEFAULT_VARIANTS", "Recipe", "Split", "Data", "EpochRecord", "Parity",
           "PredictionMismatch", "Row", "Task", "Setting", "load_digits", "load_folder", "build_model",
           "make_variant", "train_epoch", "fit", "predict", "top1", "assert_identical_predictions", "skeleton_ratio",
           "Training", "initial_kernel_magnitude", "evaluate", "run_task", "run", "main"]


# ----------------------------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One trained model of the comparison: the base model, or acfx.expand of it with these options."""
    name: str
    expand: Optional[Dict[str, object]]  # acfx.expand keyword arguments; None: the base model itself
    about: str  # one line for the report


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("base", None, "the original model"),
    Variant("acnet", {}, "ACB, both branches, BN per branch (the paper's ACNet)"),
    Variant("acnet-hor", {"branches": "hor"}, "ACB, k×k + 1×k only (Table 4)"),
    Variant("acnet-ver", {"branches": "ver"}, "ACB, k×k + k×1 only (Table 4)"),
    Variant("online", {"mode": "online"}, "acfx online mode (OREPA-style: scales, kernels merged per forward)"),
    Variant("acnet-gamma3", {"gamma_init": 1 / 3},
            "ACB, branch BN γ initialised to 1/3 (the reference's CIFAR setting)"),
    Variant("acnet-sum", {"norm": "sum"}, "ACB with one BN after the sum of the three convs"),
    Variant("repvgg", {"recipe": "repvgg"}, "RepVGG's branches: k×k, 1×1 and identity BN (where channels and stride "
            "allow), each with its BN"),
    Variant("dbb", {"recipe": "dbb"}, "DBB's branches: k×k, 1×1, 1×1→k×k and 1×1→average, each with its BN"),
    Variant("mobileone", {"recipe": "mobileone"}, "MobileOne's branches: four k×k, 1×1 and identity BN, each with "
            "its BN"),
    Variant("repvgg-balanced", {"recipe": "repvgg", "gamma_init": "balanced"},
            "RepVGG with gamma_init='balanced': every branch BN's γ at 1/3 (1/2 where there is no identity branch)"),
    Variant("dbb-gamma4", {"recipe": "dbb", "gamma_init": 1 / 4},
            "DBB with every branch BN's γ initialised to 1/4, so that the four branches sum to the scale of one"),
    Variant("mobileone-gamma6", {"recipe": "mobileone", "gamma_init": 1 / 6},
            "MobileOne with every branch BN's γ initialised to 1/6 (six branches where the identity applies)"),
    Variant("online-repvgg", {"recipe": "repvgg", "mode": "online"}, "RepVGG's branches in online form (scales, "
            "merged per forward)"),
    Variant("online-dbb", {"recipe": "dbb", "mode": "online"}, "DBB's branches in online form (OREPA)"),
    Variant("online-mobileone", {"recipe": "mobileone", "mode": "online"}, "MobileOne's branches in online form"),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)


@dataclass
class Recipe:
    """The one training recipe every variant follows (nothing here depends on the variant)."""
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1  # SGD with momentum, cosine decay to 0 over all steps, no warm-up (the reference's CIFAR
    momentum: float = 0.9  # recipe, DingXiaoH/ACNet acnet/do_acnet.py, shortened)
    weight_decay: float = 1e-4  # on every parameter, BN included, as the reference does
    translate: int = 2  # random shift of up to this many pixels (zero padding), the CIFAR crop
    hflip: bool = False  # random left-right flips (off for digits: a mirrored digit is another glyph)
    calibration_images: int = 512  # training images (fixed, un-augmented) that calibrate int8
    qat_epochs: int = 2  # quantization-aware fine-tune of the collapsed model; 0: skip
    qat_lr: float = 0.002  # the fine-tune's starting learning rate (cosine to 0)
    eval_batch: int = 512


# ----------------------------------------------------------------------------------------------- data

@dataclass
class Split:
    """Images and labels of one split, in memory. ``images`` is float in [0, 1] or uint8 (divided on use)."""
    images: torch.Tensor  # [N, C, H, W]
    labels: torch.Tensor  # [N], int64

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index=slice(None)) -> torch.Tensor:
        x = self.images[index]
        return x.float() / 255 if x.dtype == torch.uint8 else x


@dataclass
class Data:
    """A classification data set with a fixed train/test split, normalised per channel on use."""
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # [C], of the training pixels
    std: torch.Tensor  # [C]
    about: str  # where it came from and how it was split

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def size(self) -> int:
        return self.train.images.shape[-1]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)


def _channel_stats(split: Split, chunk: int = 4096):
    total = torch.zeros(split.images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(split), chunk):
        x = split.pixels(slice(start, start + chunk)).double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.pow(2).sum(dim=(0, 2, 3))
    count = len(split) * split.images.shape[2] * split.images.shape[3]
    mean = total / count
    return mean.float(), (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt().float()


def _make_data(name: str, train: Split, test: Split, num_classes: int, about: str) -> Data:
    mean, std = _channel_stats(train)
    return Data(name, train, test, num_classes, mean, std, about)


def load_digits(size: int = 16) -> Data:
    """scikit-learn's digits (8×8, values 0-16), bilinearly upsampled to ``size``; scikit-learn's example split.

    The split is the one scikit-learn's "Recognizing hand-written digits" example uses: train_test_split with
    test_size=0.5 and shuffle=False, i.e. the first 898 images train and the last 899 test.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    half = len(labels) // 2
    return _make_data("digits", Split(images[:half], labels[:half]), Split(images[half:], labels[half:]), 10,
                      f"scikit-learn digits (1,797 images of 8×8), bilinear to {size}×{size}; scikit-learn's "
                      "example split: first 898 train, last 899 test")


def _folder_split(root: Path, size: int):
    import torchvision
    from torchvision import transforms
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    folder = torchvision.datasets.ImageFolder(str(root), transform=transform)
    images = torch.stack([image for image, _ in folder])
    return Split(images, torch.tensor(folder.targets)), folder.classes


def _cifar10(root: Path, size: int) -> Data:
    import torchvision
    splits = []
    for train in (True, False):
        data = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]
        if size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        splits.append(Split(images, torch.tensor(data.targets)))
    return _make_data("cifar10", splits[0], splits[1], 10, f"torchvision CIFAR-10 at {root}, {size}×{size}, "
                      "its own train/test split")


def _stratified_split(split: Split, test_fraction: float = 0.2):
    """A fixed split (generator seed 0), the same test fraction of every class."""
    generator = torch.Generator().manual_seed(0)
    test = torch.zeros(len(split), dtype=torch.bool)
    for label in split.labels.unique():
        members = (split.labels == label).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:round(len(members) * test_fraction)]]
        test[chosen] = True
    return Split(split.images[~test], split.labels[~test]), Split(split.images[test], split.labels[test])


def load_folder(path: str, size: int) -> Data:
    """CIFAR-10 (torchvision's folder), an ImageFolder tree with train/ and test/ (or val/), or one ImageFolder."""
    root = Path(path).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        return _cifar10(root, size)
    if root.name == "cifar-10-batches-py":
        return _cifar10(root.parent, size)
    held_out = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        train, classes = _folder_split(root / "train", size)
        test, test_classes = _folder_split(held_out, size)
        if classes != test_classes:
            raise ValueError(f"{root}: train/ and {held_out.name}/ have different class folders")
        return _make_data(root.name, train, test, len(classes),
                          f"ImageFolder {root} (train/ and {held_out.name}/), {size}×{size}")
    if not root.is_dir():
        raise ValueError(f"--data {path}: not a directory")
    whole, classes = _folder_split(root, size)
    train, test = _stratified_split(whole)
    return _make_data(root.name, train, test, len(classes),
                      f"ImageFolder {root}, {size}×{size}, fixed stratified 80/20 split (seed 0)")


def train_subset(data: Data, fraction: float) -> Data:
    """``data`` with a fixed stratified ``fraction`` of its training images (generator seed 0, the same for
    every variant and seed), for a regime where the base model is not at the ceiling. The test split is kept."""
    if fraction >= 1.0:
        return data
    _, kept = _stratified_split(data.train, test_fraction=fraction)
    return _make_data(data.name, kept, data.test, data.num_classes,
                      f"{data.about}; training on a stratified {fraction:.0%} of the training images "
                      f"({len(kept)} of {len(data.train)}, fixed)")


def augment(x: torch.Tensor, translate: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to ``translate`` pixels (zero padding, then a crop) and optional left-right flips.

    Every random number comes from ``generator``, so a seed gives the same augmentation to every variant.
    """
    n, _, h, w = x.shape
    if translate > 0:
        padded = F.pad(x, (translate,) * 4)
        offsets = torch.randint(0, 2 * translate + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
    """One epoch's shuffled index batches (the last incomplete batch dropped: BN needs real batches)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------------------------- models

class BasicBlock(nn.Module):
    """The CIFAR ResNet block (He et al. 2016): two 3×3 conv→BN, a projection shortcut when the shape changes."""

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: a 3×3 stem, three stages of n blocks (16, 32, 64 channels), pool, fc."""

    def __init__(self, depth: int = 20, in_chans: int = 3, num_classes: int = 10, widths=(16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, chans = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                layers.append(BasicBlock(chans, width, 2 if stage > 0 and i == 0 else 1))
                chans = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(chans, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(name: str, in_chans: int, num_classes: int) -> nn.Module:
    """``cifar_resnetN`` (N = 6n+2, defined here) or any timm model name, random weights."""
    if name.startswith("cifar_resnet"):
        return CifarResNet(int(name[len("cifar_resnet"):]), in_chans, num_classes)
    import timm
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: cifar_resnetN (N = 6n+2) or a timm model name")
    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)


def make_variant(base: nn.Module, variant: Variant, seed: int) -> nn.Module:
    """A copy of the base model's initial weights, expanded as ``variant`` says (new branches seeded)."""
    if variant.expand is None:
        return copy.deepcopy(base)
    torch.manual_seed(10_000 + seed)  # the new branches: nn.Conv2d's init from this seed
    return acfx.expand(base, **variant.expand)


# ----------------------------------------------------------------------------------------------- training

@dataclass
class EpochRecord:
    """One point of a learning curve."""
    epoch: int  # 1-based
    train_loss: float  # mean cross-entropy over the epoch's batches (training mode, augmented)
    train_top1: float  # on the augmented training batches, as they were seen
    test_top1: float  # the model in eval mode after the epoch


@dataclass
class Trainer:
    """The recipe's optimizer and schedule over ``data``, drawing order and augmentation from ``generator``."""
    data: Data
    recipe: Recipe
    generator: torch.Generator
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def create(cls, model: nn.Module, data: Data, recipe: Recipe, generator: torch.Generator, lr: float,
               epochs: int, device: torch.device) -> "Trainer":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        steps = epochs * (len(data.train) // recipe.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        return cls(data, recipe, generator, device, optimizer, scheduler)


def train_epoch(model: nn.Module, trainer: Trainer, progress=None) -> EpochRecord:
    """One epoch of SGD; ``progress`` (a tqdm bar or None) is advanced per batch."""
    model.train()
    losses, correct, seen = [], 0, 0
    for index in batch_order(len(trainer.data.train), trainer.recipe.batch_size, trainer.generator):
        x = augment(trainer.data.train.pixels(index).to(trainer.device), trainer.recipe.translate,
                    trainer.recipe.hflip, trainer.generator)
        x, y = trainer.data.normalise(x), trainer.data.train.labels[index].to(trainer.device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        losses.append(loss.item())
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if progress is not None:
            progress.update(1)
    return EpochRecord(0, sum(losses) / len(losses), correct / seen, math.nan)


def fit(model: nn.Module, data: Data, recipe: Recipe, seed: int, device: torch.device,
        progress: Callable[[int], object] = lambda total: None) -> List[EpochRecord]:
    """Train ``model`` in place under the recipe; data order and augmentation from a generator seeded ``seed``.

    ``progress(total_batches)`` may return a tqdm-like bar for the batches of this run.
    """
    torch.manual_seed(seed)  # stochastic layers (a timm model's drop path) draw from the same stream too
    trainer = Trainer.create(model, data, recipe, torch.Generator().manual_seed(seed), recipe.lr, recipe.epochs,
                             device)
    bar = progress(recipe.epochs * (len(data.train) // recipe.batch_size))
    curve = []
    for epoch in range(1, recipe.epochs + 1):
        record = train_epoch(model, trainer, bar)
        record.epoch, record.test_top1 = epoch, _test_top1(model, data, device)
        curve.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record.train_loss:.3f}", test=f"{record.test_top1:.3f}")
    if bar is not None:
        bar.close()
    return curve


def _test_top1(model: nn.Module, data: Data, device) -> float:
    """Test top-1 for the learning curve, on the deploy form (the same predictions, asserted at the end of the
    run, at the base model's cost)."""
    was_training = model.training
    deployed = acfx.collapse(model.eval(), fold_bn=True)
    model.train(was_training)
    return top1(predict(deployed, data, data.test.pixels(), device), data.test.labels)


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, data: Data, pixels: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    """Logits (float32, CPU) of ``model`` in eval mode on un-normalised ``pixels``."""
    model.eval()
    return torch.cat([model(data.normalise(pixels[i:i + batch]).to(device)).float().cpu()
                      for i in range(0, len(pixels), batch)])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


TRANSFORMS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(2, 3)),
    "flipud": lambda x: x.flip(2),
    "fliplr": lambda x: x.flip(3),
}


class PredictionMismatch(AssertionError):
    """The trained, collapsed and fold_bn models disagree on a prediction (collapse should be exact)."""


@dataclass
class Parity:
    """How far the collapsed and fold_bn models' logits are from the trained model's, and how near the ties."""
    max_logit_diff_collapsed: float  # max |logit| difference, collapse vs trained model
    max_logit_diff_fold_bn: float  # max |logit| difference, collapse(fold_bn=True) vs trained model
    min_margin: float  # smallest gap between the trained model's top two logits over the test set
    near_ties: int  # test images whose top-two gap ≤ 2 × their own largest logit difference: could flip


def assert_identical_predictions(logits: Dict[str, torch.Tensor]) -> Parity:
    """Raise PredictionMismatch unless every model in ``logits`` predicts the same class as ``"trained"`` does.

    A float32 rounding difference can only flip an image whose top-two logit gap is at most twice the largest
    logit difference on it; such near-ties are counted in the result (and listed on failure) rather than
    excused: the assertion stays exact.
    """
    reference = logits["trained"]
    top2 = reference.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    worst = torch.zeros(len(reference))
    diffs = {}
    for name, other in logits.items():
        per_image = (other - reference).abs().amax(1)
        worst, diffs[name] = torch.maximum(worst, per_image), per_image.max().item()
        wrong = (other.argmax(1) != reference.argmax(1)).nonzero().flatten()
        if len(wrong):
            detail = "; ".join(f"image {i}: trained class {reference[i].argmax().item()} margin "
                               f"{margin[i].item():.3g}, {name} class {other[i].argmax().item()}, max logit diff "
                               f"{per_image[i].item():.3g}" for i in wrong[:10].tolist())
            raise PredictionMismatch(f"{name} predicts differently from the trained model on {len(wrong)} of "
                                     f"{len(reference)} images ({detail}); largest logit difference over the set "
                                     f"{diffs[name]:.3g}")
    return Parity(diffs.get("collapsed", 0.0), diffs.get("fold_bn", 0.0), margin.min().item(),
                  int((margin <= 2 * worst).sum().item()))


def skeleton_ratio(matrix: torch.Tensor) -> float:
    """Mean of the centre cross (centre row and column) over the mean of the four corners of a k×k matrix.

    For an even side the two middle rows (columns) form the cross. The paper (Sect. 4.4) shows ACNet raises it.
    """
    kh, kw = matrix.shape
    rows = {(kh - 1) // 2, kh // 2}
    cols = {(kw - 1) // 2, kw // 2}
    cross = torch.zeros_like(matrix, dtype=torch.bool)
    cross[sorted(rows), :] = True
    cross[:, sorted(cols)] = True
    corners = matrix[[0, 0, kh - 1, kh - 1], [0, kw - 1, 0, kw - 1]]
    return (matrix[cross].mean() / corners.mean()).item()


@dataclass
class Row:
    """Everything measured on one trained model (one variant, one seed). Accuracies are fractions in [0, 1]."""
    variant: str
    seed: int
    top1: float  # the trained model (expanded for ACNet variants), eval mode
    top1_collapsed: float  # acfx.collapse(model)
    top1_fold_bn: float  # acfx.collapse(model, fold_bn=True)
    top1_int8: float  # int8 PTQ, per-channel weight scales (torch's x86 default)
    top1_int8_per_tensor: float  # int8 PTQ, one weight scale per layer
    top1_int8_weights_only: float  # per-channel int8 weights, float activations
    top1_int8_per_tensor_weights_only: float  # per-tensor int8 weights, float activations
    top1_int8_qat: Optional[float]  # per-channel int8 after a quantization-aware fine-tune; None if skipped
    top1_int8_per_tensor_qat: Optional[float]  # per-tensor int8 after the same fine-tune; None if skipped
    top1_rot90: float
    top1_rot180: float
    top1_flipud: float
    top1_fliplr: float
    skeleton_ratio: float  # centre cross / corners of the average kernel magnitude matrix
    kernel_magnitude: List[List[float]]  # the matrix itself (BN folded, branches fused)
    kernel_layers: int  # how many k×k layers it averages
    skeleton_ratio_init: Optional[float]  # the same ratio at initialisation (control: what training changed)
    kernel_magnitude_init: Optional[List[List[float]]]  # the matrix at initialisation
    sqnr: Dict[str, float]  # weight SQNR summary (accuracy_int8.summary)
    sqnr_layers: List[dict]  # per layer (accuracy_int8.LayerSQNR)
    parity: Dict[str, float]  # Parity as a dict
    int8_modules: int  # quantized conv/linear modules in the int8 model (evidence of int8 kernels)
    params_trained: int
    params_deployed: int
    train_seconds: float
    eval_seconds: float
    curve: List[dict] = field(default_factory=list)  # EpochRecord per epoch


def _int8_results(collapsed: nn.Module, folded: nn.Module, data: Data, recipe: Recipe, seed: int,
                  device: torch.device) -> Dict[str, Optional[float]]:
    """Top-1 of every int8 form of the collapsed model (on the CPU: that is where torch's int8 kernels run;
    the QAT fine-tune trains on ``device``)."""
    cpu = torch.device("cpu")
    calibration = data.normalise(data.train.pixels(_calibration_index(len(data.train), recipe)))
    test, labels = data.test.pixels(), data.test.labels
    out: Dict[str, Optional[float]] = {}
    quantized = {}
    for scheme, suffix in (("per-channel", ""), ("per-tensor", "_per_tensor")):
        quantized[scheme] = int8.ptq(collapsed, calibration, scheme)
        out[f"top1_int8{suffix}"] = top1(predict(quantized[scheme], data, test, cpu), labels)
        out[f"top1_int8{suffix}_weights_only"] = top1(predict(int8.weight_only(folded, scheme), data, test, cpu),
                                                       labels)
        out[f"top1_int8{suffix}_qat"] = None
        if recipe.qat_epochs > 0:
            tuned = _qat(folded, data, recipe, seed, scheme, device)
            out[f"top1_int8{suffix}_qat"] = top1(predict(tuned, data, test, cpu), labels)
    out["int8_modules"] = int8.int8_module_count(quantized["per-channel"])
    return out


def _calibration_index(n: int, recipe: Recipe) -> torch.Tensor:
    """The same training images for every variant and seed (generator seed 0), un-augmented."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:recipe.calibration_images]


def _qat(folded: nn.Module, data: Data, recipe: Recipe, seed: int, scheme: str, device: torch.device) -> nn.Module:
    """QAT fine-tune of the BN-folded model under the recipe (its own generator: same order for every variant),
    on the training device; the int8 model it returns is on the CPU."""
    example = data.normalise(data.train.pixels(slice(0, 1))).to(device)
    qat_recipe = dataclasses.replace(recipe, epochs=recipe.qat_epochs)
    state: Dict[str, Trainer] = {}

    def one_epoch(model: nn.Module, epoch: int) -> None:
        if "trainer" not in state:
            state["trainer"] = Trainer.create(model, data, qat_recipe, torch.Generator().manual_seed(20_000 + seed),
                                              recipe.qat_lr, recipe.qat_epochs, device)
        train_epoch(model, state["trainer"])
    return int8.qat(folded, example, one_epoch, recipe.qat_epochs, scheme)


@dataclass
class Training:
    """What training one model produced, besides the model."""
    curve: List[EpochRecord]
    seconds: float
    initial_kernel_magnitude: Optional[torch.Tensor] = None  # [k, k], of the model before its first step


def initial_kernel_magnitude(model: nn.Module, data: Data, device, images: int = 512) -> torch.Tensor:
    """The kernel magnitude matrix of an untrained model, as the function it computes: BN running statistics
    re-estimated on training images first (at initialisation they are 0 and 1, which would weigh each branch
    by its raw init scale rather than by its normalised output). ``model`` is not modified.

    This is the control for the paper's skeleton claim: summing a k×k, a 1×k and a k×1 branch already puts more
    magnitude on the centre cross before any training.
    """
    probe = copy.deepcopy(model).train()
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
    batch = 128
    with torch.no_grad():
        for start in range(0, min(images, len(data.train)), batch):
            probe(data.normalise(data.train.pixels(slice(start, start + batch))).to(device))
    return kernel_magnitude(probe.eval())[0]


def evaluate(model: nn.Module, variant: Variant, data: Data, recipe: Recipe, seed: int, device: torch.device,
             training: Training) -> Row:
    """Every measurement of the issue on one trained model, asserting identical predictions after collapse."""
    start = time.perf_counter()
    model.eval()
    collapsed = acfx.collapse(model).eval()
    folded = acfx.collapse(model, fold_bn=True).eval()
    test, labels = data.test.pixels(), data.test.labels
    logits = {name: predict(m, data, test, device) for name, m in
              (("trained", model), ("collapsed", collapsed), ("fold_bn", folded))}
    parity = assert_identical_predictions(logits)
    matrix, layers = kernel_magnitude(model)
    quantized = _int8_results(collapsed.cpu(), folded.cpu(), data, recipe, seed, device)
    robust = {f"top1_{name}": top1(predict(model, data, fn(test), device), labels) for name, fn in TRANSFORMS.items()}
    sqnr_layers = int8.weight_sqnr(folded)
    return Row(variant=variant.name, seed=seed, top1=top1(logits["trained"], labels),
               top1_collapsed=top1(logits["collapsed"], labels), top1_fold_bn=top1(logits["fold_bn"], labels),
               **quantized, **robust, skeleton_ratio=skeleton_ratio(matrix), kernel_magnitude=matrix.tolist(),
               kernel_layers=layers, skeleton_ratio_init=_maybe(skeleton_ratio, training.initial_kernel_magnitude),
               kernel_magnitude_init=_maybe(torch.Tensor.tolist, training.initial_kernel_magnitude),
               sqnr=int8.summary(sqnr_layers),
               sqnr_layers=[dataclasses.asdict(layer) for layer in sqnr_layers], parity=dataclasses.asdict(parity),
               params_trained=sum(p.numel() for p in model.parameters()),
               params_deployed=sum(p.numel() for p in folded.parameters()), train_seconds=training.seconds,
               eval_seconds=time.perf_counter() - start, curve=[dataclasses.asdict(r) for r in training.curve])


def _maybe(fn, value):
    return None if value is None else fn(value)


# ----------------------------------------------------------------------------------------------- driver

@dataclass(frozen=True)
class Task:
    """One trained model of the run: a variant on a seed. Everything it needs is rebuilt from the seed, so tasks
    run in any order and in any worker process with the same result (for a given thread count)."""
    seed: int
    variant: str


@dataclass
class Setting:
    """What every task shares: the data, the model name, the recipe and the device."""
    data: Data
    model_name: str
    recipe: Recipe
    device: str


def _inner_bar(enabled: bool, slot: int = 0):
    """A factory of progress bars over one run's batches (tqdm, if installed), on terminal line ``slot + 1``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return lambda total: None
    return lambda total: tqdm(total=total, desc=f"  worker {slot} batches", unit="batch", position=slot + 1,
                              leave=False)


def run_task(task: Task, setting: Setting, progress: Callable[[int], object] = lambda total: None) -> Row:
    """Build the seed's base model, make the variant from it, train it, measure it."""
    device = torch.device(setting.device)
    torch.manual_seed(task.seed)
    base = build_model(setting.model_name, setting.data.in_chans, setting.data.num_classes)
    model = make_variant(base, VARIANTS[task.variant], task.seed).to(device)
    initial = initial_kernel_magnitude(model, setting.data, device)
    start = time.perf_counter()
    curve = fit(model, setting.data, setting.recipe, task.seed, device, progress)
    training = Training(curve, time.perf_counter() - start, initial)
    return evaluate(model, VARIANTS[task.variant], setting.data, setting.recipe, task.seed, device, training)


_WORKER: Dict[str, object] = {}  # per worker process: its Setting, thread count and progress-bar factory


def _init_worker(setting: Setting, threads: int, slots, progress: bool, lock) -> None:
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    torch.set_num_threads(threads)
    if lock is not None:
        from tqdm.auto import tqdm
        tqdm.set_lock(lock)
    _WORKER.update(setting=setting, progress=_inner_bar(progress, slot))


def _worker_task(task: Task) -> Row:
    return run_task(task, _WORKER["setting"], _WORKER["progress"])


def _run_parallel(tasks: List[Task], setting: Setting, workers: int, threads: int, progress: bool, on_done):
    """Tasks over ``workers`` spawned processes of ``threads`` threads each; ``on_done(row)`` as each finishes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    context = multiprocessing.get_context("spawn")
    lock = None
    if progress:
        from tqdm.auto import tqdm
        lock = context.RLock()
        tqdm.set_lock(lock)
    slots = context.Value("i", 0)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(setting, threads, slots, progress, lock)) as pool:
        for future in as_completed([pool.submit(_worker_task, task) for task in tasks]):
            on_done(future.result())


def run(data: Data, model_name: str, variants: Sequence[str], seeds: Sequence[int], recipe: Recipe,
        device: torch.device, progress: bool = True, on_row: Callable[[Row], None] = lambda row: None,
        workers: int = 1, threads: Optional[int] = None) -> List[Row]:
    """Train and evaluate every variant on every seed; rows come back ordered by seed, then variant.

    ``workers`` > 1 runs the tasks in that many processes with ``threads`` torch threads each (default 1): on a
    small shared CPU, one-thread workers keep every core busy without OpenMP threads of one process spinning
    while another process holds the core. Results depend only on the seed, the variant and the thread count.
    """
    tasks = [Task(seed, name) for seed in seeds for name in variants]
    setting = Setting(data, model_name, recipe, str(device))
    outer = _outer_bar(progress, len(tasks))
    rows: List[Row] = []

    def done(row: Row) -> None:
        rows.append(row)
        on_row(row)
        if outer is not None:
            outer.update(1)
    if workers > 1:
        _run_parallel(tasks, setting, workers, threads or 1, progress, done)
    else:
        inner = _inner_bar(progress)
        for task in tasks:
            done(run_task(task, setting, inner))
    if outer is not None:
        outer.close()
    order = {task: i for i, task in enumerate(tasks)}
    return sorted(rows, key=lambda row: order[Task(row.seed, row.variant)])


def _outer_bar(enabled: bool, total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="runs", unit="run", position=0) if enabled else None


def environment(args: argparse.Namespace, data: Data, recipe: Recipe, device: torch.device) -> dict:
    """What ran, where, with which versions and recipe (the JSON's "environment"): the shared record
    (benchmarks/environment.py) and this run's settings."""
    own = {}
    try:
        import sklearn
        own["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    own.update({"device": name, "workers": args.workers,
                "threads": (args.threads or 1) if args.workers > 1 else torch.get_num_threads(),
                "int8_engine": int8.backend(),
                "int8_api": "torch.ao.quantization FX graph mode (prepare_fx/convert_fx, prepare_qat_fx)",
                "data": data.name, "data_about": data.about, "train_images": len(data.train),
                "test_images": len(data.test), "size": data.size, "model": args.model,
                "variants": list(args.variants), "seeds": list(args.seed_list), "recipe": dataclasses.asdict(recipe),
                "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None})
    return stamp({"environment": own}, collect(args.argv, __file__))["environment"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed (whatever --seeds says), 5 epochs, 1 QAT epoch, every variant; "
                        "about 3 min on 2 cores")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="CIFAR-10 folder (holding cifar-10-batches-py) or ImageFolder tree; "
                        "default: scikit-learn's digits")
    parser.add_argument("--size", type=int, default=None,
                        help="image side after resizing; default 16 for the digits (upsampled from 8), 32 for --data")
    parser.add_argument("--model", default="cifar_resnet20",
                        help="cifar_resnetN (N = 6n+2: 8, 14, 20, 32, 44, 56, ...) or a timm model name; "
                        "default cifar_resnet20")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        metavar="NAME", help=f"variants to train, of {', '.join(VARIANTS)}; default all (base is "
                        "needed for the paired differences)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds: first-seed, first-seed + 1, ...; "
                        "default 5")
    parser.add_argument("--first-seed", type=int, default=0, help="default 0")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {Recipe.epochs}, --quick 5")
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size, help=f"default {Recipe.batch_size}")
    parser.add_argument("--lr", type=float, default=Recipe.lr, help=f"peak SGD learning rate, cosine to 0; default "
                        f"{Recipe.lr}")
    parser.add_argument("--weight-decay", type=float, default=Recipe.weight_decay,
                        help=f"default {Recipe.weight_decay}")
    parser.add_argument("--translate", type=int, default=None, help="random shift in pixels; default size // 8")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="random left-right flips in training; default off for the digits, on for --data")
    parser.add_argument("--calibration-images", type=int, default=Recipe.calibration_images,
                        help=f"training images that calibrate int8; default {Recipe.calibration_images}")
    parser.add_argument("--qat-epochs", type=int, default=None,
                        help=f"QAT fine-tune epochs, 0 to skip; default {Recipe.qat_epochs}, --quick 1")
    parser.add_argument("--device", default="cpu", help="training device; default cpu (int8 always runs on the CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes training runs in parallel; default min(2, CPU count) on the CPU, "
                        "1 with --device cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process; default 1 per worker with --workers > 1, else torch's")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train on a fixed stratified fraction of the training images (default 1: all)")
    parser.add_argument("--out", default=None, metavar="STEM", help="writes STEM.json, STEM.md, STEM.png; default "
                        "benchmarks/results/accuracy_<data>[_frac<F>][_quick]")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds = 1
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.workers is None:
        args.workers = 1 if torch.device(args.device).type != "cpu" else min(2, os.cpu_count() or 1)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.size is None:
        args.size = 32 if args.data else 16
    if not 0 < args.train_fraction <= 1:
        parser.error("--train-fraction must be in (0, 1]")
    return args


def recipe_from(args: argparse.Namespace) -> Recipe:
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else Recipe.epochs)
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else (1 if args.quick else Recipe.qat_epochs)
    return Recipe(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                  translate=args.translate if args.translate is not None else max(args.size // 8, 1),
                  hflip=args.hflip if args.hflip is not None else args.data is not None,
                  calibration_images=args.calibration_images, qat_epochs=qat_epochs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads and args.workers == 1:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_folder(args.data, args.size) if args.data else load_digits(args.size)
    data = train_subset(data, args.train_fraction)
    recipe = recipe_from(args)
    fraction = f"_frac{args.train_fraction:g}" if args.train_fraction < 1 else ""
    stem = Path(args.out) if args.out else HERE / "results" / f"accuracy_{data.name}{fraction}{'_quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run(data, args.model, args.variants, args.seed_list, recipe, device, args.progress,
               on_row=lambda row: print(report.one_line(dataclasses.asdict(row)), flush=True),
               workers=args.workers, threads=args.threads)
    env = environment(args, data, recipe, device)
    env["wall_seconds"] = time.perf_counter() - start
    payload = report.payload(env, rows, {name: v.about for name, v in VARIANTS.items()})
    output_file(stem, ".json").write_text(json.dumps(payload, indent=1))
    output_file(stem, ".md").write_text(report.markdown(payload))
    report.plot(payload, output_file(stem, ".png"))
    print(report.headline(payload))
    print(f"wrote {stem}.json, .md, .png in {env['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
