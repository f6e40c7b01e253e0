"""The GPU plan as one command per part, each well inside one 10-minute device call.

    python benchmarks/gpu_suite.py --list                 # the parts, their commands and time limits
    python benchmarks/gpu_suite.py --part 1 --out $OUT    # run part 1, results under $OUT
    python benchmarks/gpu_suite.py --part 3 --out $OUT --dry-run

A part runs its benchmark scripts as subprocesses with a time limit each (the sum stays under 9 minutes),
writes their results and a log under ``--out`` (the device tool brings $OUT back), and exits 1 if a
script failed or ran out of time. Parts that extend a table (latency) append to the JSON found in
``--out`` or, failing that, to the committed one under benchmarks/results, so they can run in any order.
Timings follow the timing method described in benchmarks/README.md (warm-up, CUDA graphs and CUDA events,
interleaved rounds, medians, the base timed twice). Each script stamps its own results with the environment
record (benchmarks/environment.py); the part's log ends with it (made after the steps, so that
this process does not hold a CUDA context while they run).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PY = sys.executable
sys.path.insert(0, str(HERE))
from environment import collect, describe  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Step:
    """One benchmark script run: its arguments (``{out}`` is the output folder) and its time limit."""

    args: List[str]
    limit_s: int
    # A results stem the step appends to: copied into ``out`` first when only the committed one exists.
    appends_to: str = ""


LATENCY_A = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "repvgg_a2", "regnety_016"]
LATENCY_B = ["resnet34", "densenet121", "ghostnet_100", "tf_efficientnet_b0", "hrnet_w18_small", "mobileone_s1"]

def _latency(models: List[str], *extra: str) -> Step:
    return Step(["latency.py", *extra, "--models", *models, "--out", "{out}/latency_gpu", "--append"], 500,
                appends_to="latency_gpu")


HEADLINE = ["resnet18", "resnet50", "efficientnet_b0", "repvgg_a2", "mobilenetv3_large_100"]

# Part 0 first: the most evidence per device minute, one call of about 7 minutes, so that one lent device is
# enough for the headline results. Then in the order of the plan: correctness, the training targets,
# latency, the recipes and the rep-block deploy forms. torch.compile compiles each variant (and each batch
# size) apart: one model per compiled part.
# The variants of the parts written before DBB and MobileOne (those have a part of their own, 11).
_FIRST_VARIANTS = ["--variants", "exact", "exact-stacked", "exact-recompute", "online", "repvgg", "acb+repvgg"]
PARTS = {
    0: ("headline: latency and kernel lists of 5 models (eager, bf16, batch 1 and 64); the training step of "
        "resnet18 in exact, online and the recipes; collapse beside the repositories' deploy forms",
        [Step(["latency.py", "--models", *HEADLINE, "--modes", "eager", "--dtypes", "bf16", "--rounds", "9",
               "--out", "{out}/latency_gpu", "--append"], 200, appends_to="latency_gpu"),
         Step(["train.py", "--models", "resnet18", "--modes", "eager", "--rounds", "4", "--variants", "exact",
               "online", "repvgg", "acb+repvgg", "--out", "{out}/train_gpu_headline"], 130),
         Step(["rep_deploy.py", "--batch-sizes", "1", "64", "--rounds", "9", "--out", "{out}/rep_deploy_gpu"], 90)]),
    1: ("GPU-only checks: SyncBatchNorm under DDP/NCCL, fp16/bf16 autocast, torch.compile, stacked and recompute "
        "forwards on cuDNN", [Step(["gpu_checks.py", "--out", "{out}/gpu_checks.md"], 480)]),
    2: ("training step, eager: resnet18/34, bf16 autocast, channels_last, batch 128, 224 px; base, every exact "
        "implementation, online, the recipes",
        [Step(["train.py", "--models", "resnet18", "resnet34", "--modes", "eager", *_FIRST_VARIANTS,
               "--out", "{out}/train_gpu_eager"], 500)]),
    3: ("training step, torch.compile: resnet18",
        [Step(["train.py", "--models", "resnet18", "--modes", "compile", "--rounds", "3", *_FIRST_VARIANTS,
               "--out", "{out}/train_gpu_compile_resnet18"], 520)]),
    4: ("training step, torch.compile: resnet34",
        [Step(["train.py", "--models", "resnet34", "--modes", "compile", "--rounds", "3", *_FIRST_VARIANTS,
               "--out", "{out}/train_gpu_compile_resnet34"], 520)]),
    5: ("latency, eager, 6 models: batch 1 and 64, fp32/fp16/bf16, kernel lists compared",
        [_latency(LATENCY_A, "--modes", "eager")]),
    6: ("latency, eager, 6 more models", [_latency(LATENCY_B, "--modes", "eager")]),
    7: ("latency, torch.compile, resnet50, bf16", [_latency(["resnet50"], "--modes", "compile", "--dtypes", "bf16")]),
    8: ("latency, torch.compile, efficientnet_b0, bf16",
        [_latency(["efficientnet_b0"], "--modes", "compile", "--dtypes", "bf16")]),
    9: ("training step, eager: resnet50, the variants of part 2", [Step(["train.py", "--models", "resnet50", "--modes",
                                                                       "eager", *_FIRST_VARIANTS,
                                                                       "--out", "{out}/train_gpu_eager_resnet50"], 400)]),
    10: ("collapse beside the repositories' deploy forms, fp32, batch 1/64, 15 rounds",
         [Step(["rep_deploy.py", "--batch-sizes", "1", "64", "--rounds", "15", "--out", "{out}/rep_deploy_gpu"], 300)]),
    11: ("training step, eager: resnet18/34 with DBB's and MobileOne's recipes and the recipes' online forms "
         "beside base and ACB",
         [Step(["train.py", "--models", "resnet18", "resnet34", "--modes", "eager", "--rounds", "4", "--variants",
                "exact", "dbb", "mobileone", "online-repvgg", "online-dbb", "online-mobileone",
                "--out", "{out}/train_gpu_recipes"], 480)]),
}


def _prepare(step: Step, out: Path) -> None:
    """Start an appending step from the table found in ``out``, else from the committed one."""
    if not step.appends_to:
        return
    for suffix in (".json",):
        target = out / f"{step.appends_to}{suffix}"
        committed = RESULTS / f"{step.appends_to}{suffix}"
        if not target.exists() and committed.exists():
            shutil.copy(committed, target)


def run_part(number: int, out: Path, dry_run: bool) -> int:
    title, steps = PARTS[number]
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"part{number}.log"
    print(f"part {number}: {title}")
    failed = 0
    for step in steps:
        command = [PY, str(HERE / step.args[0]), *[a.format(out=out) for a in step.args[1:]]]
        print(f"  $ {' '.join(command)}  (limit {step.limit_s} s)")
        if dry_run:
            continue
        _prepare(step, out)
        start = time.perf_counter()
        with log.open("a") as handle:
            try:
                done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=step.limit_s,
                                      cwd=HERE.parent)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = 124
        print(f"  exit {code} after {time.perf_counter() - start:.0f} s (log: {log})")
        failed += code != 0
    if not dry_run:
        with log.open("a") as handle:
            handle.write(f"part {number} ({title}): {failed} failed; environment: "
                         f"{describe(collect(script=__file__))}\n")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", type=int, choices=sorted(PARTS), help="the part to run")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (on the device machine: $OUT)")
    parser.add_argument("--list", action="store_true", help="list the parts and their commands")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.list or args.part is None:
        for number in sorted(PARTS):
            run_part(number, Path(args.out), dry_run=True)
            print(f"  total limit {sum(s.limit_s for s in PARTS[number][1])} s")
        return 0
    return run_part(args.part, Path(args.out), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
