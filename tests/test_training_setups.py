"""Expanded models in the training setups users already run: DDP, SyncBN, AMP, channels_last, compile,
grad checkpointing, EMA, resume, frozen layers."""
import copy
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from timm.utils import ModelEmaV3

import acfx

from helpers import assert_rel_close, count_modules, randomize_bn


def _small(name="resnet18", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs)


def _batch(seed, n=4, size=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _steps(model, optimizer, seeds, **batch):
    for seed in seeds:
        x, y = _batch(seed, **batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


# ----------------------------------------------------------------------------------------------- DDP

def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = acfx.expand(timm.create_model("resnet18", num_classes=5))
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: every param is used
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    _steps(ddp, optimizer, [10 + rank, 20 + rank, 30 + rank])  # each rank sees its own data
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_keep_identical_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = acfx.expand(_small()).state_dict()
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]) or key.endswith(("running_mean", "running_var")), key
    moved = [k for k in rank0 if k.endswith(".hor.weight") and not torch.equal(rank0[k], initial[k])]
    assert moved, "training did not update the asymmetric branches"


# ------------------------------------------------------------------------------------------- SyncBN

@pytest.mark.parametrize("convert", ["torch", "timm"])
def test_sync_batchnorm_conversion_of_an_expanded_model(convert):
    model = _small("efficientnet_b0")
    expanded = acfx.expand(model)
    if convert == "torch":
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(expanded)
    else:
        synced = convert_sync_batchnorm(expanded)
    blocks = [m for m in synced.modules() if isinstance(m, acfx.ACBlock)]
    assert blocks and all(isinstance(b.hor_bn, nn.SyncBatchNorm) for b in blocks)
    synced = randomize_bn(synced).eval()  # SyncBatchNorm runs on the CPU outside distributed training
    collapsed = acfx.collapse(synced)
    assert count_modules(collapsed, acfx.ACBlock) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(collapsed(x), synced(x))


# ------------------------------------------------------------------------------ AMP and channels_last

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_channels_last_training_then_exact_float32_collapse(dtype):
    model = acfx.expand(_small()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for seed in range(3):
        x, y = _batch(seed)
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.eval()
    collapsed = acfx.collapse(model)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_convs_with_float32_norms_run_and_collapse(dtype):
    """Convs in half precision with their BNs kept in float32 (apex O2's keep_batchnorm_fp32): a BN gives its
    input's dtype, and so must a NormTail in eval, or the next half conv gets a float32 input."""
    torch.manual_seed(0)
    model = randomize_bn(_small()).to(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    expanded = acfx.expand(model, init="preserve")
    for mode in ("train", "eval"):
        with torch.no_grad():
            y = getattr(expanded, mode)()(x)
            y_plain = getattr(model, mode)()(x)
        assert y.dtype == y_plain.dtype == dtype, f"{mode}: {y.dtype}, the plain model gives {y_plain.dtype}"
        assert_rel_close(y.float(), y_plain.float(), tol=0.05, what=f"{mode} forward of preserve-init in {dtype}")
    collapsed = acfx.collapse(expanded.eval())
    with torch.no_grad():
        assert_rel_close(collapsed(x).float(), expanded(x).float(), tol=0.05, what=f"collapsed in {dtype}")


# -------------------------------------------------------------------------------------- torch.compile

def test_torch_compile_matches_eager_in_training_and_after_collapse():
    torch._dynamo.reset()
    model = acfx.expand(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 16, 16)
    y_compiled, y_eager = compiled(x), eager(x)
    assert_rel_close(y_compiled, y_eager, tol=1e-5, what="compiled training forward")
    y_compiled.square().mean().backward()
    y_eager.square().mean().backward()
    # All gradients as one vector: some BN-bias gradients are sums that cancel to rounding noise.
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    eager_grads = torch.cat([p.grad.flatten() for p in eager.parameters()])
    assert_rel_close(grads, eager_grads, tol=1e-4, what="compiled training gradients")
    collapsed = acfx.collapse(randomize_bn(model).eval())
    with torch.no_grad():
        assert_rel_close(torch.compile(collapsed)(x), collapsed(x), what="compiled collapsed model")


# ------------------------------------------------------------------------------ timm grad checkpointing

def test_timm_grad_checkpointing_gives_the_same_gradients():
    reference = acfx.expand(_small())
    checkpointed = copy.deepcopy(reference)
    checkpointed.set_grad_checkpointing(True)
    x, y = _batch(0)
    for model in (reference, checkpointed):
        nn.functional.cross_entropy(model(x), y).backward()
    grads = torch.cat([p.grad.flatten() for p in checkpointed.parameters()])
    reference_grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert_rel_close(grads, reference_grads, tol=1e-5, what="checkpointed gradients")


# --------------------------------------------------------------------------------------------- EMA

@pytest.mark.parametrize("ema_kind", ["timm", "deepcopy"])
def test_ema_of_an_expanded_model_collapses(ema_kind):
    model = acfx.expand(_small())
    ema = ModelEmaV3(model, decay=0.9) if ema_kind == "timm" else copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        _steps(model, optimizer, [seed])
        if ema_kind == "timm":
            ema.update(model)
        else:
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(e * 0.9 + p * 0.1) if e.is_floating_point() else e.copy_(p)
    averaged = ema.module if ema_kind == "timm" else ema
    collapsed = acfx.collapse(averaged.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_rel_close(collapsed(x), averaged(x))
    _small().load_state_dict(collapsed.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------- resume

def test_resume_from_a_mid_training_checkpoint_is_bit_identical(tmp_path):
    def fresh():
        model = acfx.expand(_small())
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    straight, opt = fresh()
    _steps(straight, opt, range(6))

    first, opt = fresh()
    _steps(first, opt, range(3))
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt = fresh()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"], strict=True)
    opt.load_state_dict(saved["optimizer"])
    _steps(resumed, opt, range(3, 6))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ freezing

def test_frozen_batchnorm_layers_are_skipped_with_the_fix_named():
    model = freeze_batch_norm_2d(_small())  # timm: every BN becomes a FrozenBatchNorm2d
    expanded, report = acfx.expand(model, return_report=True)
    assert not report.of("expanded") and count_modules(expanded, acfx.ACBlock) == 0
    reasons = report.skip_reasons()
    assert any("FrozenBatchNorm2d" in r and "unfreeze" in r for r in reasons), reasons


@pytest.mark.parametrize("recipe", ["acb", "dbb"])
def test_preserve_init_leaves_a_conv_whose_bn_affine_is_frozen(recipe):
    """init="preserve" starts the new branch BNs at γ = β = 0; frozen with the BN, the branches could never
    train (their gradient is γ times anything): such a conv is left, with the fix named. With init="scratch"
    (γ = 1) and in online form (scales follow the conv) it expands and every new kernel gets a gradient."""
    model = _small().train()
    model.bn1.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)
    _, report = acfx.expand(model, init="preserve", recipe=recipe, return_report=True)
    skipped = {e.name: e.detail for e in report.skipped}
    assert "frozen" in skipped.get("conv1", "") and "init='scratch'" in skipped["conv1"], skipped
    assert "layer1.0.conv1" in {e.name for e in report.of("expanded")}
    for kwargs in ({"init": "scratch"}, {"init": "preserve", "mode": "online"}):
        expanded = acfx.expand(model, recipe=recipe, **kwargs)
        optimizer = torch.optim.SGD([p for p in expanded.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):  # a zero scale (online, preserve) gets a gradient first, its kernel the step after
            optimizer.zero_grad()
            expanded(torch.randn(2, 3, 32, 32)).square().mean().backward()
            optimizer.step()
        new = [(n, p) for n, p in expanded.conv1.named_parameters()
               if p.requires_grad and not n.startswith(("square.", "conv."))]
        assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in new), \
            (kwargs, [(n, None if p.grad is None else p.grad.abs().sum().item()) for n, p in new])


def test_bn_in_eval_mode_with_frozen_parameters_stays_frozen_in_every_branch():
    model = _small().train()
    model.bn1.eval().requires_grad_(False)
    expanded = acfx.expand(model)
    stem = expanded.conv1
    for bn in (stem.square_bn, stem.hor_bn, stem.ver_bn):
        assert not bn.training and not any(p.requires_grad for p in bn.parameters())
    before = stem.square_bn.running_mean.clone()
    expanded(torch.randn(2, 3, 32, 32))
    assert torch.equal(stem.square_bn.running_mean, before)
