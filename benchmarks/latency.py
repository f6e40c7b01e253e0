"""Inference cost of original, expanded, collapsed and fold_bn models, side by side in one run.

    python benchmarks/latency.py                     # GPU: 12 timm + 3 torchvision models, batch 1 and 64,
                                                     # fp32/fp16/bf16, channels_last, eager and torch.compile
    python benchmarks/latency.py --cpu               # the same on the CPU, smaller models and batches
    python benchmarks/latency.py --models resnet50 tv:mobilenet_v2 --batch-sizes 1 32 --dtypes fp16 --modes eager

Method (the timing method described in benchmarks/README.md, by benchmarks/timing.py): each forward is
captured in a CUDA graph and its replays are timed with CUDA events; all variants of a setting are interleaved
round by round and the median per variant is kept; the original model is timed twice, and the spread between
the two is the noise floor of that setting. Beyond timings, the benchmark checks that the collapsed model
launches exactly the kernels the original does (torch.profiler names and counts) and exits with code 1 if it
does not.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from outputs import output_file  # noqa: E402

import acfx  # noqa: E402
from acfx.tools.diagnostics import randomize_norms  # noqa: E402
from acfx.tools.zoo import build_model  # noqa: E402

from environment import collect, device_label, stamp  # noqa: E402
from kernel_trace import launched  # noqa: E402
from timing import interleaved_medians, make_timer, noise_floor  # noqa: E402

GPU_MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "regnety_016", "efficientnet_b0", "mobilenetv3_large_100",
              "repvgg_a2", "hrnet_w18_small", "dla34", "densenet121", "cspresnet50", "ghostnet_100",
              "tv:resnet50", "tv:mobilenet_v2", "tv:regnet_y_400mf"]
CPU_MODELS = ["resnet18", "mobilenetv3_large_100", "efficientnet_b0", "regnety_004", "ghostnet_100",
              "tv:mobilenet_v2"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("original", "original (again)", "expanded", "collapsed", "fold_bn")


def build_variants(name: str) -> dict:
    """The five models of one comparison, all computing the same function.

    The original gets random (non-trivial) BN statistics and is expanded with the function-preserving init,
    so that every variant sees the same activations: timings then differ only by the kernels run, never by
    the data (e.g. denormal floats, slow on CPUs).
    """
    torch.manual_seed(0)
    original = randomize_norms(build_model(name)).eval()
    expanded = acfx.expand(original, init="preserve").eval()
    return {"original": original, "original (again)": copy.deepcopy(original), "expanded": expanded,
            "collapsed": acfx.collapse(expanded), "fold_bn": acfx.collapse(expanded, fold_bn=True)}


def _prepare(model, device, dtype, mode):
    model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    forward = torch.compile(model) if mode == "compile" else model

    def run(x):
        with torch.inference_mode():
            return forward(x)
    return run


def measure_setting(models: dict, name: str, batch: int, dtype: str, mode: str, args) -> dict:
    device = torch.device(args.device)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=DTYPES[dtype])
    x = x.to(memory_format=torch.channels_last)
    fns = {v: _prepare(models[v], device, DTYPES[dtype], mode) for v in VARIANTS}
    for fn in fns.values():
        fn(x)  # compile, cudnn autotuning
    kernels = {v: launched(fns[v], x) for v in ("original", "collapsed", "fold_bn", "expanded")}
    timers = {v: make_timer(fns[v], x, warmup=args.warmup) for v in VARIANTS}
    stats = interleaved_medians(timers, args.rounds, args.target_ms)
    ms = {v: stats[v]["median_ms"] for v in VARIANTS}
    base = ms["original"]
    return {"model": name, "batch": batch, "dtype": dtype, "mode": mode, "ms": ms, "stats": stats,
            "collapsed/original": ms["collapsed"] / base, "fold_bn/original": ms["fold_bn"] / base,
            "expanded/original": ms["expanded"] / base, "noise": noise_floor(stats, "original", "original (again)"),
            "same_kernels": kernels["collapsed"] == kernels["original"],
            "kernel_count": {v: sum(k.values()) for v, k in kernels.items()},
            "kernel_diff": _diff(kernels["original"], kernels["collapsed"])}


def _diff(a, b) -> dict:
    keys = set(a) | set(b)
    return {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(keys) if a.get(k, 0) != b.get(k, 0)}


def environment(args) -> dict:
    """The shared record (benchmarks/environment.py) and this run's settings."""
    env = collect(args.argv, __file__)
    return stamp({"environment": {"device": device_label(args.device, env), "img_size": args.img_size,
                                  "channels_last": True, "rounds": args.rounds}}, env)["environment"]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode: smaller models, batches 1 and 8, fp32/bf16, eager")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=None)
    parser.add_argument("--img-size", type=int, default=None, help="default: 224 (GPU), 160 (CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 15 GPU, 7 CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--target-ms", type=float, default=None, help="length of one measurement")
    parser.add_argument("--out", default=None, help="output stem (default: benchmarks/results/latency_<gpu|cpu>)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the existing JSON (runs in parts; earlier runs' records kept)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    cpu = args.cpu or not torch.cuda.is_available()
    args.device = "cpu" if cpu else "cuda"
    defaults = dict(models=CPU_MODELS if cpu else GPU_MODELS, batch_sizes=[1, 8] if cpu else [1, 64],
                    dtypes=["fp32", "bf16"] if cpu else ["fp32", "fp16", "bf16"],
                    modes=["eager"] if cpu else ["eager", "compile"], img_size=160 if cpu else 224,
                    rounds=7 if cpu else 15, target_ms=100.0 if cpu else 20.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out) if args.out else HERE / "results" / f"latency_{'cpu' if cpu else 'gpu'}"
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    torch.backends.cudnn.benchmark = True
    rows, earlier = [], []
    if args.append and output_file(args.out, ".json").exists():
        stored = json.loads(output_file(args.out, ".json").read_text())
        rows = stored["rows"]  # rows of earlier runs: their records are kept beside this run's
        earlier = stored.get("earlier_environments", []) + [stored["environment"]]
    for name in args.models:
        models = build_variants(name)
        for mode in args.modes:
            for dtype in args.dtypes:
                for batch in args.batch_sizes:
                    row = measure_setting(models, name, batch, dtype, mode, args)
                    rows = [r for r in rows if (r["model"], r["batch"], r["dtype"], r["mode"]) !=
                            (name, batch, dtype, mode)] + [row]
                    print(f"{name:24s} b{batch:<3d} {dtype} {mode:7s} original {row['ms']['original']:8.3f} ms  "
                          f"collapsed/original {row['collapsed/original']:.3f} (noise {row['noise']:.3f})  "
                          f"fold_bn {row['fold_bn/original']:.3f}  expanded {row['expanded/original']:.3f}  "
                          f"same kernels: {row['same_kernels']}", flush=True)
    payload = {"environment": environment(args), "rows": rows, **({"earlier_environments": earlier} if earlier else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(payload, indent=1))
    from latency_report import write_markdown, write_plot
    output_file(args.out, ".md").write_text(write_markdown(payload))
    write_plot(payload, output_file(args.out, ".png"))
    different = [r for r in rows if not r["same_kernels"]]
    for r in different:
        print(f"DIFFERENT KERNELS: {r['model']} b{r['batch']} {r['dtype']} {r['mode']}: {r['kernel_diff']}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
