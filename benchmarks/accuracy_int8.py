"""int8 deployment of a trained model, for benchmarks/accuracy.py: post-training quantization, weight SQNR, QAT.

Why a separate module: quantization has its own vocabulary (schemes, observers, backends) and its own
failure modes, and the accuracy harness only needs four verbs from it: quantize a float model after training
(`ptq`), fake-quantize its weights only (`weight_only`, to tell weight error from activation error), measure
the per-layer weight error (`weight_sqnr`), and fine-tune with fake quantization before converting (`qat`).

API and backend: torch.ao.quantization in FX graph mode (prepare_fx / convert_fx / prepare_qat_fx) on the x86
backend (fbgemm + oneDNN kernels), which converts convs, linears and residual adds to real int8 operators
(quantized::conv2d_relu, quantized::add_relu, ...) that run on the CPU. torch 2.14 still ships it but marks it
deprecated in favour of torchao's PT2E flow; the deprecation warnings are silenced here (`quiet_ao`) and
stated in the README. Quantized models run on the CPU only.

Schemes (`SCHEMES`): both use torch's x86 activation observer (HistogramObserver, reduce_range=True, per
tensor, uint8) and differ only in the weight scales:
  "per-channel": one scale per output channel, symmetric int8 (torch's default QConfigMapping for x86);
  "per-tensor":  one scale per layer, symmetric int8 (what a per-tensor int8 runtime offers).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

import torch
import torch.nn as nn

__all__ = ["SCHEMES", "backend", "quiet_ao", "ptq", "weight_only", "weight_sqnr", "LayerSQNR", "qat",
           "prepare_qat", "int8_module_count", "sqnr_db", "summary"]

SCHEMES = ("per-channel", "per-tensor")


def backend() -> str:
    """The quantized engine used: x86 where torch has it (fbgemm + oneDNN), else the first available one."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "onednn", "qnnpack"):
        if name in engines:
            return name
    raise RuntimeError(f"no int8 engine in this torch build (supported_engines={engines})")


@contextlib.contextmanager
def quiet_ao() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation notices (stated once in the README, not per call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        yield


def _weight_observer(scheme: str):
    from torch.ao.quantization import observer
    if _check_scheme(scheme) == "per-channel":
        return observer.default_per_channel_weight_observer  # symmetric qint8, one scale per output channel
    return observer.default_weight_observer  # symmetric qint8, one scale per tensor


def _qconfig_mapping(scheme: str, qat_mode: bool = False):
    """torch's default x86 mapping (PTQ or QAT), with the global weight observer chosen by ``scheme``."""
    from torch.ao.quantization import (
        QConfig,
        fake_quantize,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    if qat_mode:
        mapping = get_default_qat_qconfig_mapping(backend())
        weight = {"per-channel": fake_quantize.default_fused_per_channel_wt_fake_quant,
                  "per-tensor": fake_quantize.default_fused_wt_fake_quant}[_check_scheme(scheme)]
    else:
        mapping = get_default_qconfig_mapping(backend())
        weight = _weight_observer(scheme)
    return mapping.set_global(QConfig(activation=mapping.global_qconfig.activation, weight=weight))


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    return scheme


def ptq(model: nn.Module, calibration: torch.Tensor, scheme: str = "per-channel", batch_size: int = 256) -> nn.Module:
    """An int8 copy of ``model`` (float, eval mode, CPU), calibrated on ``calibration`` (normalised inputs).

    FX graph mode: conv→BN(→ReLU) are fused by prepare_fx, observers record activation ranges on the
    calibration batches, convert_fx swaps in quantized modules. ``model`` itself is not modified.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = backend()
    float_model = copy.deepcopy(model).cpu().eval()
    with quiet_ao(), torch.no_grad():
        prepared = prepare_fx(float_model, _qconfig_mapping(scheme), (calibration[:1],))
        for start in range(0, len(calibration), batch_size):
            prepared(calibration[start:start + batch_size])
        return convert_fx(prepared)


def int8_module_count(model: nn.Module) -> int:
    """How many modules of ``model`` are quantized (int8) convs or linears: the evidence that int8 kernels ran."""
    from torch.ao.nn.quantized import Conv2d, Linear
    return sum(isinstance(m, (Conv2d, Linear)) for m in model.modules())


def _fake_quant_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``weight`` rounded to the int8 grid the scheme's observer chooses (as convert_fx would), back in float."""
    observer = _weight_observer(scheme)()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    if scheme == "per-channel":
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point.int(), 0, -128, 127)
    return torch.fake_quantize_per_tensor_affine(weight, float(scale), int(zero_point), -128, 127)


def _quantizable(model: nn.Module) -> Iterator:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield name, module


def weight_only(model: nn.Module, scheme: str) -> nn.Module:
    """A float copy of ``model`` (BN already folded: collapse(fold_bn=True)) whose conv and linear weights are
    rounded to the int8 grid of ``scheme``; activations stay float. Compared with the full int8 model, it
    separates the error the weights cause from the error the activations cause."""
    out = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for _, module in _quantizable(out):
            module.weight.copy_(_fake_quant_weight(module.weight, scheme))
    return out


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖x‖² / ‖x − q(x)‖²); inf for an exact copy."""
    noise = (reference.double() - approximation.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@dataclass
class LayerSQNR:
    """Weight quantization error of one conv or linear layer (BN folded into it)."""
    name: str  # module name in the folded model
    kernel: List[int]  # [kh, kw]; [1, 1] for a linear layer
    per_tensor_db: float  # SQNR of symmetric int8 with one scale for the layer
    per_channel_db: float  # SQNR of symmetric int8 with one scale per output channel
    channel_spread: float  # largest / median per-channel max |w|: how much one scale must stretch
    peak_to_rms: float  # max |w| / rms(w) over the layer: how far the extreme weight sits from the bulk


def weight_sqnr(folded: nn.Module) -> List[LayerSQNR]:
    """Per-layer weight SQNR of a BN-folded model (collapse(fold_bn=True)), for both schemes."""
    layers = []
    for name, module in _quantizable(folded):
        w = module.weight.detach().float()
        per_channel_max = w.abs().flatten(1).amax(1)
        kernel = list(module.kernel_size) if isinstance(module, nn.Conv2d) else [1, 1]
        layers.append(LayerSQNR(
            name=name, kernel=kernel,
            per_tensor_db=sqnr_db(w, _fake_quant_weight(w, "per-tensor")),
            per_channel_db=sqnr_db(w, _fake_quant_weight(w, "per-channel")),
            channel_spread=(per_channel_max.max() / per_channel_max.median().clamp_min(1e-30)).item(),
            peak_to_rms=(w.abs().max() / w.pow(2).mean().sqrt().clamp_min(1e-30)).item()))
    return layers


def prepare_qat(folded: nn.Module, example: torch.Tensor, scheme: str = "per-channel") -> nn.Module:
    """A fake-quantized training copy (prepare_qat_fx) of a BN-folded model, on ``example``'s device.

    Start from collapse(fold_bn=True), not from collapse(): the BN that collapse() leaves after each conv holds
    identity statistics (mean 0, var 1) and the fused shift in β, and in training mode QAT's fused ConvBn
    re-normalises with batch statistics, which replaces the trained function by a different one.
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    torch.backends.quantized.engine = backend()
    with quiet_ao():
        model = copy.deepcopy(folded).to(example.device).train()
        return prepare_qat_fx(model, _qconfig_mapping(scheme, qat_mode=True), (example[:1],))


def qat(folded: nn.Module, example: torch.Tensor, train_epoch: Callable[[nn.Module, int], None], epochs: int,
        scheme: str = "per-channel") -> nn.Module:
    """Quantization-aware fine-tune of a BN-folded model for ``epochs``, then convert to int8.

    ``train_epoch(model, epoch)`` runs one epoch of the harness's recipe (its data order, augmentation and
    optimizer) on the fake-quantized model, on ``example``'s device (``example``: one normalised input batch, for
    tracing). ``folded`` is not modified. The int8 model is converted and returned on the CPU.
    """
    from torch.ao.quantization.quantize_fx import convert_fx
    prepared = prepare_qat(folded, example, scheme)
    with quiet_ao():
        for epoch in range(epochs):
            train_epoch(prepared, epoch)
        return convert_fx(prepared.eval().cpu())


def summary(layers: List[LayerSQNR]) -> Dict[str, float]:
    """Mean SQNR over the k×k layers (the ones ACNet changes) and over all layers, both schemes."""
    def mean(values):
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan
    kxk = [layer for layer in layers if min(layer.kernel) >= 2]
    return {"kxk_per_tensor_db": mean(l.per_tensor_db for l in kxk),
            "kxk_per_channel_db": mean(l.per_channel_db for l in kxk),
            "all_per_tensor_db": mean(l.per_tensor_db for l in layers),
            "all_per_channel_db": mean(l.per_channel_db for l in layers),
            "kxk_channel_spread": mean(l.channel_spread for l in kxk),
            "kxk_peak_to_rms": mean(l.peak_to_rms for l in kxk)}
