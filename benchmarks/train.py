"""Training cost of ACNet: step time and peak memory of the base model and of each training mode.

    python benchmarks/train.py               # GPU: bf16 autocast, channels_last, batch 128 at 224 px, SGD
    python benchmarks/train.py --cpu         # CPU: small models, batch 8 at 96 px

Modes: "base" (the original model), "exact" (acfx.expand: the paper's ACB, three convs and three BNs per
site), "exact-stacked" (the same ACB computed as one conv, one BN and one sum: acfx.set_exact_impl),
"exact-recompute" (the same branches, each conv→BN keeping only its input for backward), "online"
(acfx.expand(mode="online"): kernels merged at every forward, one conv per site), and the recipes "repvgg"
(k×k + 1×1 + identity BN per site), "acb+repvgg" (all five branches), "dbb" (k×k, 1×1, 1×1→k×k and
1×1→average, each with its BN) and "mobileone" (four k×k branches, 1×1 and identity BN), and the online
forms of the last three ("online-repvgg", "online-dbb", "online-mobileone": one merged conv per site). Each
step is forward + backward + optimizer step, timed with benchmarks/timing.py (CUDA events around eager steps
on the GPU, perf_counter on the CPU); the variants are interleaved round by round and the median kept; the
base model is timed twice (noise floor). Beside each model, the FLOPs ratio expanded/base of a
training step, counted with torch.utils.flop_counter on the meta device, the peak memory ratio (GPU), and
the activation memory ratio: the bytes autograd keeps for backward in one forward (distinct storages,
parameters and input excluded), the same on any device, so the CPU mode reports it too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from outputs import output_file  # noqa: E402

import acfx  # noqa: E402
from acfx.tools.diagnostics import saved_activation_bytes  # noqa: E402
from acfx.tools.zoo import build_model  # noqa: E402

from environment import caption, collect, device_label, stamp  # noqa: E402
from timing import interleaved_medians, make_timer, noise_floor  # noqa: E402

GPU_MODELS = ["resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016",
              "repvgg_a2"]
CPU_MODELS = ["resnet18", "mobilenetv3_small_100", "regnety_002"]
MODES = {"base": None, "exact": dict(mode="exact"), "exact-stacked": dict(mode="exact"),
         "exact-recompute": dict(mode="exact"), "online": dict(mode="online"),
         "repvgg": dict(mode="exact", recipe="repvgg"), "acb+repvgg": dict(mode="exact", recipe="acb+repvgg"),
         "dbb": dict(mode="exact", recipe="dbb"), "mobileone": dict(mode="exact", recipe="mobileone"),
         "online-repvgg": dict(mode="online", recipe="repvgg"), "online-dbb": dict(mode="online", recipe="dbb"),
         "online-mobileone": dict(mode="online", recipe="mobileone")}
IMPLS = {"exact-stacked": "stacked", "exact-recompute": "recompute"}


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def make(name: str, mode: str, device, memory_format: torch.memory_format = torch.channels_last) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    if MODES[mode] is not None:
        model = acfx.expand(model, **MODES[mode])
    if mode in IMPLS:
        acfx.set_exact_impl(model, IMPLS[mode])
    return model.to(device=device, memory_format=memory_format).train()


def step_flops(name: str, mode: str, batch: int, size: int) -> int:
    """FLOPs of forward + backward, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = make(name, mode, "meta")
        x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


class Stepper:
    """One training step of a model: forward under autocast, backward, SGD step."""

    def __init__(self, model, x, y, compile_model: bool, dtype) -> None:
        self.model = torch.compile(model) if compile_model else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y, self.dtype = x, y, dtype
        self.loss = nn.CrossEntropyLoss()

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()


def _peak_memory(step, cuda: bool):
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


TRAINED = ("exact", "exact-stacked", "exact-recompute", "online", "repvgg", "acb+repvgg", "dbb", "mobileone",
           "online-repvgg", "online-dbb", "online-mobileone")


def saved_activation_mib(model: nn.Module, x: torch.Tensor, dtype) -> float:
    """MiB of the distinct storages autograd keeps for backward in one training forward."""
    def forward():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)
    return saved_activation_bytes(forward, (x, *model.parameters())) / 2**20


def measure(name: str, compile_model: bool, args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.to(memory_format=MEMORY_FORMATS[args.memory_format])
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    names = ["base", "base (again)", *args.variants]
    steppers, timers, memory, activations = {}, {}, {}, {}
    for variant in names:  # one at a time for the memory reading, then all kept for interleaved timing
        mode = variant.split(" ")[0]
        steppers[variant] = Stepper(make(name, mode, device, MEMORY_FORMATS[args.memory_format]), x, y, compile_model,
                                    args.dtype)
        # A training step (optimizer included) is not captured in a CUDA graph: eager steps, CUDA events.
        timers[variant] = make_timer(steppers[variant], warmup=args.warmup, device=device, graph=False)
        memory[variant] = _peak_memory(steppers[variant], cuda)
        if not compile_model:
            activations[variant] = saved_activation_mib(steppers[variant].model, x, args.dtype)
    stats = interleaved_medians(timers, args.rounds, repeats=args.steps)
    ms = {v: stats[v]["median_ms"] for v in names}
    flops = {mode: step_flops(name, mode, 1, args.img_size) for mode in ("base", *args.variants)}
    row = {"model": name, "mode": "compile" if compile_model else "eager", "ms": ms, "peak_mib": memory,
           "saved_activation_mib": activations or None, "noise": noise_floor(stats, "base", "base (again)"),
           "variants": list(args.variants)}
    for mode in args.variants:
        row[f"{mode}/base"] = ms[mode] / ms["base"]
        row[f"{mode}_flops/base"] = flops[mode] / flops["base"]
        row[f"{mode}_mem/base"] = memory[mode] / memory["base"] if cuda else None
        row[f"{mode}_act/base"] = activations[mode] / activations["base"] if activations else None
    return row


def write_markdown(payload: dict) -> str:
    env, rows = payload["environment"], payload["rows"]
    lines = ["# Training step: base vs ACNet exact (branches, stacked, recompute) vs online", "",
             f"{env['device']}, torch {env['torch']}, {env['date']}; batch {env['batch_size']} at {env['img_size']} "
             f"px, {env['dtype']} autocast, {env.get('memory_format', 'channels_last')}, SGD; median of {env['rounds']} interleaved rounds of "
             f"{env['steps']} steps. Ratios are to the base model measured in the same run; noise: the base model "
             "timed twice. FLOPs: forward + backward (torch.utils.flop_counter). Activations: bytes autograd "
             "keeps for backward in one forward (eager only). Peak memory: torch.cuda.max_memory_allocated "
             "over one step (GPU only).", "",
             "| model | mode | variant | ms | time / base | noise | FLOPs / base | activations / base | "
             "peak memory / base |", "|" + " --- |" * 9]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        act = "1.00" if r.get("saved_activation_mib") else "n/a"
        mem = "1.00" if r["peak_mib"].get("base") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | base | {r['ms']['base']:.1f} | 1.00 | {r['noise']:.3f} | "
                     f"1.00 | {act} | {mem} |")
        for m in _variants(r):
            lines.append(f"| | | {m} | {r['ms'][m]:.1f} | {fmt(r[f'{m}/base'])} | | {fmt(r[f'{m}_flops/base'])} | "
                         f"{fmt(r.get(f'{m}_act/base'))} | {fmt(r[f'{m}_mem/base'])} |")
    return stamp("\n".join(lines) + "\n", env)


def _variants(row: dict) -> list:
    """The trained variants a row measured (rows written before --variants: every one it has)."""
    return row.get("variants") or [m for m in TRAINED if f"{m}/base" in row]


def write_plot(payload: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    shown = [m for m in TRAINED if any(m in _variants(r) for r in rows)]
    width = 0.8 / len(shown)
    width_in = max(6, 1.3 * len(rows))
    fig, ax = plt.subplots(figsize=(width_in, 3.8))
    for i, mode in enumerate(shown):
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(rows))]
        ax.bar(xs, [r.get(f"{mode}/base", float("nan")) for r in rows], width, label=f"{mode} / base")
        if mode == "exact":
            ax.plot(xs, [r["exact_flops/base"] for r in rows], "k_", ms=14, label="FLOPs ratio (exact)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("step time / base")
    env = payload["environment"]
    ax.set_title(f"acfx training step, {env['device']}, torch {env['torch']}, {env['date']}\n"
                 f"{caption(env, width=int(14 * width_in))}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=TRAINED, default=list(TRAINED),
                        help="the trained variants timed beside the base model (default: all)")
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="channels_last",
                        help="of the models and the input (default: channels_last; torch 2.14.1 on the CPU crashes in "
                             "the backward of a channels_last 1x1 stride-2 conv of 3 or 4 channels, which the "
                             "repvgg recipe builds beside a strided RGB stem: use contiguous there)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    args.device = "cpu" if cpu else "cuda"
    args.models = args.models or (CPU_MODELS if cpu else GPU_MODELS)
    args.modes = args.modes or (["eager"] if cpu else ["eager", "compile"])
    args.batch_size = args.batch_size or (8 if cpu else 128)
    args.img_size = args.img_size or (96 if cpu else 224)
    args.steps = args.steps or (2 if cpu else 10)
    args.dtype = torch.float32 if cpu else torch.bfloat16
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        for mode in args.modes:
            row = measure(name, mode == "compile", args)
            rows.append(row)
            ratios = "  ".join(f"{m}/base {row[f'{m}/base']:.2f} (FLOPs {row[f'{m}_flops/base']:.2f})"
                               for m in args.variants)
            print(f"{name:24s} {mode:7s} base {row['ms']['base']:8.1f} ms  {ratios} (noise {row['noise']:.3f})",
                  flush=True)
    env = collect(argv, __file__)
    payload = stamp({"environment": {"device": device_label(args.device, env), "batch_size": args.batch_size,
                                     "memory_format": args.memory_format,
                                     "img_size": args.img_size, "rounds": args.rounds, "steps": args.steps,
                                     "dtype": str(args.dtype).replace("torch.", "")},
                     "rows": rows}, env)
    out = Path(args.out) if args.out else HERE / "results" / f"train_{'cpu' if cpu else 'gpu'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(payload, indent=1))
    output_file(out, ".md").write_text(write_markdown(payload))
    write_plot(payload, output_file(out, ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
