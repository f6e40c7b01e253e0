"""The training-setup checks where a GPU matters, in one run on a CUDA machine (CI has no GPU).

    python benchmarks/gpu_checks.py            # writes benchmarks/results/gpu_checks.md; exit 1 on a failure

- SyncBatchNorm training (NCCL, one process): runs, and collapse of the trained model is exact;
- autocast fp16 and bf16 with channels_last: training runs, collapse is exact in float32;
- torch.compile of the expanded model in training, and of the collapsed model in eval, match eager;
- the stacked and recompute ACB forwards (acfx.set_exact_impl) match the branch forward in training on cuDNN (TF32 off).
The same checks run on the CPU in the test suite, where SyncBatchNorm cannot train.
"""
from __future__ import annotations

import copy
import os
import sys
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import acfx  # noqa: E402
from acfx.diagnostics import relative_error  # noqa: E402
from acfx.zoo import build_model  # noqa: E402


def _train(model, steps=3, dtype=None, batch=16, size=64):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, device="cuda", generator=gen).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss), "loss is not finite"
    return model


def _collapse_error(model):
    model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        return relative_error(acfx.collapse(model)(x), model(x))


def check_syncbn() -> float:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = acfx.expand(build_model("resnet18", num_classes=10))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).cuda().to(memory_format=torch.channels_last)
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(ddp, dtype=torch.bfloat16)
        return _collapse_error(model)
    finally:
        dist.destroy_process_group()


def check_amp(dtype) -> float:
    model = acfx.expand(build_model("efficientnet_b0", num_classes=10)).cuda().to(memory_format=torch.channels_last)
    return _collapse_error(_train(model, dtype=dtype))


def check_compile() -> dict:
    torch.manual_seed(0)
    model = acfx.expand(build_model("resnet18", num_classes=10)).cuda().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y_compiled, y_eager = torch.compile(model)(x), eager(x)
    y_compiled.float().square().mean().backward()
    y_eager.float().square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    eager_grads = torch.cat([p.grad.flatten() for p in eager.parameters()])
    collapsed = acfx.collapse(model.eval())
    with torch.no_grad():
        collapsed_error = relative_error(torch.compile(collapsed)(x), collapsed(x))
    return {"forward": relative_error(y_compiled, y_eager), "gradients": relative_error(grads, eager_grads),
            "collapsed": collapsed_error}


def check_impl(impl: str) -> dict:
    """An exact implementation (acfx.set_exact_impl) vs the branch forward, one training step in float32 with
    TF32 off: output, gradients and running statistics."""
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    torch.manual_seed(0)
    branches = acfx.expand(build_model("resnet18", num_classes=10)).cuda().to(memory_format=torch.channels_last)
    other = copy.deepcopy(branches)
    acfx.set_exact_impl(other, impl)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    outs = [m(x) for m in (branches, other)]
    for out in outs:
        out.square().mean().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (branches, other)]
    stats = [torch.cat([b.flatten() for n, b in m.named_buffers() if "running" in n]) for m in (branches, other)]
    torch.backends.cudnn.allow_tf32 = True
    return {"forward": relative_error(outs[1], outs[0]), "gradients": relative_error(grads[1], grads[0]),
            "running": relative_error(stats[1], stats[0])}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (their CPU versions are in the test suite)")
        return 2
    torch.backends.cudnn.benchmark = True
    rows = [("SyncBatchNorm + DDP (NCCL) training, bf16: collapse error (fp32)", check_syncbn(), 1e-5),
            ("autocast fp16 + channels_last training: collapse error (fp32)", check_amp(torch.float16), 1e-5),
            ("autocast bf16 + channels_last training: collapse error (fp32)", check_amp(torch.bfloat16), 1e-5)]
    compiled = check_compile()
    rows += [("torch.compile training forward vs eager", compiled["forward"], 1e-4),
             ("torch.compile training gradients vs eager", compiled["gradients"], 1e-3),
             ("torch.compile collapsed eval vs eager", compiled["collapsed"], 1e-4)]
    for impl in ("stacked", "recompute"):
        measured = check_impl(impl)
        rows += [(f"{impl} vs branch forward, training output (fp32)", measured["forward"], 1e-5),
                 (f"{impl} vs branch forward, gradients (fp32)", measured["gradients"], 1e-4),
                 (f"{impl} vs branch forward, running statistics (fp32)", measured["running"], 1e-5)]
    lines = ["# GPU checks", "", f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}", "",
             "| check | max|Δ|/max|y| | tolerance | ok |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {err:.1e} | {tol:.0e} | {'yes' if err <= tol else 'NO'} |" for name, err, tol in rows]
    out = HERE / "results" / "gpu_checks.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(err <= tol for _, err, tol in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
