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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import acfx  # noqa: E402
from acfx.tools.diagnostics import float64_check, over_tolerance, relative_error, within_rounding  # noqa: E402
from acfx.tools.zoo import build_model  # noqa: E402

from environment import collect, stamp  # noqa: E402


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


class Row:
    """One check: the measured relative error against its tolerance; a collapse error over the tolerance is
    judged by the float64 round trip (float32 rounding, amplified by a trained network, is not an error)."""

    def __init__(self, name: str, error: float, tolerance: float, f64=None) -> None:
        self.name, self.error, self.tolerance, self.f64 = name, error, tolerance, f64
        self.ok = within_rounding(error, tolerance, f64)

    def markdown(self) -> str:
        f64 = "" if self.f64 is None else f"{self.f64.error_f64:.1e}"
        return f"| {self.name} | {self.error:.1e} | {self.tolerance:.0e} | {f64} | {'yes' if self.ok else 'NO'} |"


def _collapse_error(model, name: str) -> Row:
    model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        y_expanded, y_collapsed = model(x), acfx.collapse(model)(x)
    error = relative_error(y_collapsed, y_expanded)
    f64 = None
    if over_tolerance(error, 1e-5):
        f64 = float64_check(model, lambda m: acfx.collapse(m, inplace=True), x, y_expanded, y_collapsed)
    return Row(name, error, 1e-5, f64)


def check_syncbn() -> Row:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = acfx.expand(build_model("resnet18", num_classes=10))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).cuda().to(memory_format=torch.channels_last)
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(ddp, dtype=torch.bfloat16)
        return _collapse_error(model, "SyncBatchNorm + DDP (NCCL) training, bf16: collapse error (fp32)")
    finally:
        dist.destroy_process_group()


def check_amp(dtype) -> Row:
    model = acfx.expand(build_model("efficientnet_b0", num_classes=10)).cuda().to(memory_format=torch.channels_last)
    name = f"autocast {str(dtype).replace('torch.', '')} + channels_last training: collapse error (fp32)"
    return _collapse_error(_train(model, dtype=dtype), name)


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
    """An exact implementation (acfx.set_exact_impl) vs the branch forward, one training step in float32:
    output, gradients and running statistics."""
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
    return {"forward": relative_error(outs[1], outs[0]), "gradients": relative_error(grads[1], grads[0]),
            "running": relative_error(stats[1], stats[0])}


def write_markdown(rows, env) -> str:
    """The checks' table, under the environment line."""
    lines = ["# GPU checks", "", f"{env['gpu']}, torch {env['torch']}, {env['date']}; "
             "TF32 off. Over the tolerance, a collapse error is repeated in float64 (column f64): exact to 1e-10 "
             "there means float32 rounding.", "",
             "| check | max|Δ|/max|y| | tolerance | f64 | ok |", "| --- | --- | --- | --- | --- |"]
    lines += [row.markdown() for row in rows]
    return stamp("\n".join(lines) + "\n", env)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_checks.md"), help="the markdown to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (their CPU versions are in the test suite)")
        return 2
    torch.backends.cudnn.benchmark = True
    # Correctness checks in float32 compare against 1e-5: TF32 convs and matmuls (on by default for cuDNN)
    # round to 1e-3.
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    rows = [check_syncbn(), check_amp(torch.float16), check_amp(torch.bfloat16)]
    compiled = check_compile()
    rows += [Row("torch.compile training forward vs eager", compiled["forward"], 1e-4),
             Row("torch.compile training gradients vs eager", compiled["gradients"], 1e-3),
             Row("torch.compile collapsed eval vs eager", compiled["collapsed"], 1e-4)]
    for impl in ("stacked", "recompute"):
        measured = check_impl(impl)
        rows += [Row(f"{impl} vs branch forward, training output (fp32)", measured["forward"], 1e-5),
                 Row(f"{impl} vs branch forward, gradients (fp32)", measured["gradients"], 1e-4),
                 Row(f"{impl} vs branch forward, running statistics (fp32)", measured["running"], 1e-5)]
    text = write_markdown(rows, collect(argv, __file__).as_dict())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
