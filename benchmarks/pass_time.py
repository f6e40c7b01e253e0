"""How long expand and collapse take, and whether collapse grows linearly with the model.

For each model (default: resnet50 and hrnet_w64, 17 and 272 sites): expand, collapse and collapse with
fold_bn, each with its defaults (a deep copy of the input, inplace=False), timed side by side in one run
with benchmarks/timing.py (interleaved rounds, median of --rounds, perf_counter), and the collapse time per
expanded site. Results go to
benchmarks/results/pass_time.json and .md.

    python benchmarks/pass_time.py
    python benchmarks/pass_time.py --models resnet50 hrnet_w64 regnety_032 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import acfx  # noqa: E402
from acfx.tools.diagnostics import randomize_norms  # noqa: E402
from acfx.tools.zoo import build_model  # noqa: E402

from environment import collect, stamp  # noqa: E402
from timing import interleaved_medians, make_timer  # noqa: E402

RESULTS = HERE / "results"


def measure(name: str, rounds: int, warmup: int = 0) -> dict:
    torch.manual_seed(0)
    model = build_model(name).eval()
    expanded, report = acfx.expand(model, return_report=True)
    randomize_norms(expanded).eval()
    sites = len(report.of("expanded"))
    timers = {"expand": make_timer(lambda: acfx.expand(model), warmup=warmup),
              "collapse": make_timer(lambda: acfx.collapse(expanded), warmup=warmup),
              "fold_bn": make_timer(lambda: acfx.collapse(expanded, fold_bn=True), warmup=warmup)}
    # Interleaved, one call per measurement, so that a slow moment of the machine hits all three alike.
    stats = interleaved_medians(timers, rounds, repeats=1)
    times = {k: [ms / 1e3 for ms in s["samples_ms"]] for k, s in stats.items()}
    median = {k: s["median_ms"] / 1e3 for k, s in stats.items()}
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "sites": sites, "params": params, **{f"{k}_s": v for k, v in median.items()},
            "collapse_ms_per_site": 1000 * median["collapse"] / sites,
            "collapse_over_expand": median["collapse"] / median["expand"], "rounds": times}


def _markdown(run: dict) -> str:
    env = run["environment"]
    lines = ["# Pass times: expand, collapse, collapse(fold_bn=True)\n",
             f"{env['date']}, torch {env['torch']}, {env['machine']} CPU, {env['threads']} thread(s); defaults "
             f"(inplace=False: each pass deep-copies its input); median of {run['rounds']} interleaved rounds.\n",
             "| model | sites | parameters | expand s | collapse s | fold_bn s | collapse ms / site | collapse / expand |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run["rows"]:
        lines.append(f"| {r['model']} | {r['sites']} | {r['params'] / 1e6:.1f}M | {r['expand_s']:.2f} | "
                     f"{r['collapse_s']:.2f} | {r['fold_bn_s']:.2f} | {r['collapse_ms_per_site']:.1f} | "
                     f"{r['collapse_over_expand']:.2f} |")
    return stamp("\n".join(lines) + "\n", env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "hrnet_w64"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed calls of each pass first (default 0: expand has run once already)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "pass_time"), help="output stem (.json and .md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = [measure(name, args.rounds, args.warmup) for name in args.models]
    run = stamp({"rounds": args.rounds, "rows": rows}, collect(argv, __file__))
    Path(args.out + ".json").write_text(json.dumps(run, indent=1))
    Path(args.out + ".md").write_text(_markdown(run))
    print(_markdown(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
