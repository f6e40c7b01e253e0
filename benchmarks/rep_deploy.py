"""acfx.collapse of re-parameterisable models beside their repositories' own deploy forms, side by side in one run.

    python benchmarks/rep_deploy.py                  # CPU (or the GPU when there is one): the models below
    python benchmarks/rep_deploy.py --models repvgg_a0 mobileone_s0 --batch-sizes 1 --img-size 224

The models: RepVGG-A0 and a ResNet-18 of DBB blocks as the tests re-implement them from their repositories
(tests/rep_blocks.py; their deploy form is each block's own ``deploy()`` conversion), timm's MobileOne-S0
(deploy form: timm's ``reparameterize_model``), a neck of ultralytics' RepC3 blocks (deploy form: RepConv's
``fuse_convs``), and timm's other rep families (``--timm``). For each: the train-time model gets random
parameters and BN statistics; the deploy form and ``acfx.collapse`` are timed in turn round by round, the
deploy form twice (the spread between the two is the noise floor), with the shared timer
(benchmarks/timing.py); their outputs are compared and the ops they launch (torch.profiler: aten ops on the
CPU, kernels on the GPU) are compared: the collapsed model must run no more convolutions than the deploy
form, and the table says where the lists differ. Exits 1 if a collapsed model runs more convolutions or its
output disagrees.
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
sys.path.insert(0, str(HERE.parent / "tests"))  # the repositories' blocks as the tests re-implement them

from outputs import output_file  # noqa: E402

import acfx  # noqa: E402
from acfx.tools.diagnostics import relative_error  # noqa: E402

from environment import collect, device_label, stamp  # noqa: E402
from kernel_trace import launched  # noqa: E402
from rep_models import MODELS, timm_deploy_form, trained  # noqa: E402
from timing import interleaved_medians, make_timer, noise_floor  # noqa: E402

TIMM_FAMILIES = ["repvgg_a0", "mobileone_s1", "repghostnet_050", "fastvit_t8"]
VARIANTS = ("deploy form", "deploy form (again)", "acfx.collapse")


def _builders(args) -> dict:
    """name -> (train-time builder, deploy conversion); timm's families are named "timm:<name>"."""
    import timm
    chosen = {name: MODELS[name] for name in args.models}
    for name in args.timm:
        chosen[f"timm:{name}"] = (lambda name=name: timm.create_model(name, num_classes=10), timm_deploy_form)
    return chosen


def build_variants(build, deploy) -> dict:
    """The train-time model (random parameters and BN statistics) and its two deploy forms."""
    torch.manual_seed(0)
    model = trained(build())
    with torch.no_grad():
        collapsed = acfx.collapse(model)
    deployed = deploy(copy.deepcopy(model)).eval()
    return {"unfused": model, "deploy form": deployed, "deploy form (again)": copy.deepcopy(deployed),
            "acfx.collapse": collapsed}


def _runner(model, device):
    model = copy.deepcopy(model).to(device)

    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def measure(name: str, models: dict, batch: int, args) -> dict:
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)
    fns = {v: _runner(models[v], args.device) for v in ("unfused", *VARIANTS)}
    y = {v: fns[v](x).float() for v in ("unfused", "deploy form", "acfx.collapse")}
    kernels = {v: launched(fns[v], x) for v in ("deploy form", "acfx.collapse", "unfused")}
    stats = interleaved_medians({v: make_timer(fns[v], x, warmup=args.warmup) for v in VARIANTS},
                                args.rounds, args.target_ms)
    ms = {v: stats[v]["median_ms"] for v in VARIANTS}
    different = {k: [kernels["deploy form"].get(k, 0), kernels["acfx.collapse"].get(k, 0)]
                 for k in sorted(set(kernels["deploy form"]) | set(kernels["acfx.collapse"]))
                 if kernels["deploy form"].get(k, 0) != kernels["acfx.collapse"].get(k, 0)}
    return {"model": name, "batch": batch, "ms": ms, "stats": stats,
            "collapse/deploy": ms["acfx.collapse"] / ms["deploy form"],
            "noise": noise_floor(stats, "deploy form", "deploy form (again)"),
            "same_kernels": not different, "kernel_diff": different,
            "kernel_count": {v: sum(k.values()) for v, k in kernels.items()},
            "convolutions": {v: sum(n for name, n in k.items() if _is_convolution(name)) for v, k in kernels.items()},
            "error_vs_unfused": relative_error(y["acfx.collapse"], y["unfused"]),
            "error_vs_deploy": relative_error(y["acfx.collapse"], y["deploy form"]),
            "deploy_error_vs_unfused": relative_error(y["deploy form"], y["unfused"])}


def _is_convolution(name: str) -> bool:
    """A convolution op (aten::convolution on the CPU) or kernel (cuDNN / implicit GEMM conv kernels on the GPU)."""
    lowered = name.lower()
    return lowered == "aten::convolution" or (not lowered.startswith("aten::") and "conv" in lowered)


def write_markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# acfx.collapse beside the repositories' deploy forms ({env['device']})", "",
             f"Input {env['img_size']}x{env['img_size']}, fp32, eager; medians of {env['rounds']} interleaved "
             "rounds; noise: the deploy form timed twice. Ops: torch.profiler's list of one forward "
             "(aten ops on the CPU, kernels on the GPU); unfused: the train-time model in eval mode.", "",
             "| model | batch | deploy form ms | collapse ms | collapse/deploy | noise | convs (collapse / deploy) | "
             "same ops (count) | unfused ops | error vs unfused | vs deploy form |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        count = r["kernel_count"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']['deploy form']:.3f} | {r['ms']['acfx.collapse']:.3f} | "
                     f"{r['collapse/deploy']:.3f} | {r['noise']:.3f} | "
                     f"{r['convolutions']['acfx.collapse']} / {r['convolutions']['deploy form']} | "
                     f"{'yes' if r['same_kernels'] else _difference(r['kernel_diff'])} ({count['acfx.collapse']}) | "
                     f"{count['unfused']} | "
                     f"{r['error_vs_unfused']:.1e} | {r['error_vs_deploy']:.1e} |")
    lines += [f"\nNot run: {name} ({why})." for name, why in payload.get("skipped", {}).items()]
    return stamp("\n".join(lines) + "\n", env)


def _difference(diff: dict) -> str:
    """The ops whose counts differ, as "op deploy→collapse" (the aten ops of one batch norm named once)."""
    shown = {k: v for k, v in diff.items() if k in ("aten::batch_norm", "aten::add", "aten::convolution", "aten::mul")}
    return "no: " + ", ".join(f"{k.replace('aten::', '')} {a}→{b}" for k, (a, b) in (shown or diff).items())


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--timm", nargs="*", default=TIMM_FAMILIES, help="timm rep families (deploy form: "
                        "timm's reparameterize_model); give none to leave them out")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 (CPU), 1 64 (GPU)")
    parser.add_argument("--img-size", type=int, default=None, help="default: 128 (CPU), 224 (GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 7 CPU, 15 GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=None, help="length of one measurement")
    parser.add_argument("--cpu", action="store_true", help="time on the CPU even when a GPU is present")
    parser.add_argument("--out", default=None, help="output stem (default: benchmarks/results/rep_deploy_<cpu|gpu>)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    cpu = args.cpu or not torch.cuda.is_available()
    args.device = "cpu" if cpu else "cuda"
    for key, value in dict(batch_sizes=[1, 8] if cpu else [1, 64], img_size=128 if cpu else 224,
                           rounds=7 if cpu else 15, target_ms=100.0 if cpu else 20.0).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out) if args.out else HERE / "results" / f"rep_deploy_{'cpu' if cpu else 'gpu'}"
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    rows, skipped = [], {}
    for name, (build, deploy) in _builders(args).items():
        try:
            models = build_variants(build, deploy)
        except ImportError as error:  # ultralytics is a test dependency; a machine may not have it
            skipped[name] = f"{type(error).__name__}: {error}"
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        for batch in args.batch_sizes:
            row = measure(name, models, batch, args)
            rows.append(row)
            print(f"{name:22s} b{batch:<3d} deploy form {row['ms']['deploy form']:8.3f} ms  collapse/deploy "
                  f"{row['collapse/deploy']:.3f} (noise {row['noise']:.3f})  same ops: {row['same_kernels']}  "
                  f"error vs unfused {row['error_vs_unfused']:.1e}, vs deploy form {row['error_vs_deploy']:.1e}",
                  flush=True)
    env = collect(args.argv, __file__)
    payload = stamp({"environment": {"device": device_label(args.device, env), "img_size": args.img_size,
                                     "rounds": args.rounds}, "rows": rows, "skipped": skipped}, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(payload, indent=1))
    output_file(args.out, ".md").write_text(write_markdown(payload))
    bad = [r for r in rows if r["convolutions"]["acfx.collapse"] > r["convolutions"]["deploy form"]
           or not r["error_vs_unfused"] <= 1e-4]
    for r in bad:
        print(f"FAILED: {r['model']} b{r['batch']}: ops {r['kernel_diff']}, error {r['error_vs_unfused']:.1e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
