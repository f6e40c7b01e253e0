"""Coverage of the timm (and torchvision) zoo: does acfx expand and collapse every CNN exactly?

For every architecture with a conv→BN pair: build it with random weights, expand it, check the class is
unchanged and sites were found, take a training step, randomise BN statistics, collapse it, measure the
round-trip error (float32) and reload the collapsed weights strictly into a fresh model. Results go to
benchmarks/results/coverage_<source>.json and .md. With ``--check deploy``: build, randomise BN statistics,
``collapse(model, fold_bn=True)`` (the model's own rep blocks fused, every conv→BN pair folded) and compare
with the model (coverage_<source>_deploy).

    python benchmarks/coverage.py                      # all timm models, CPU, 2 workers
    python benchmarks/coverage.py --source torchvision
    python benchmarks/coverage.py --filter 'resnet*' --workers 4 --budget 300
    python benchmarks/coverage.py --min-params 4e8 --max-params 2e9 --batch-size 1 --merge
                                                       # the largest ones apart, into the same table
    python benchmarks/coverage.py --recipe dbb --every 10 --pairs-from benchmarks/results/coverage_timm.json
                                                       # a recipe on every 10th model, pairs found before
    python benchmarks/coverage.py --check deploy --pairs-from benchmarks/results/coverage_timm.json
                                                       # the deploy form of every model as built

Each model runs in a worker process with a time budget; a model over budget, or one that crashes its
worker, is recorded as such and the sweep goes on.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------- worker side

class _Timeout(BaseException):
    """Not an Exception: library code that catches Exception (load_state_dict does) must not swallow it."""


def _on_alarm(signum, frame):
    raise _Timeout()


def _pairs_on_meta(name: str) -> dict:
    """Count conv→BN pairs (any conv kind, any BN kind) without allocating weights."""
    import torch

    from acfx.matching.find_sites import find_conv_calls
    from acfx.matching.traced_model import trace_model
    from acfx.passes.collapse import collapse_tracer
    from acfx.tools.zoo import build_model

    try:
        with torch.device("meta"):
            model = build_model(name)
    except Exception:  # some builders compute on real tensors at init
        model = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    traced = trace_model(model, collapse_tracer())
    convs = [c for part in traced.parts for c in find_conv_calls(part, traced) if isinstance(c.conv, torch.nn.Conv2d)]
    return {"pairs": sum(c.norm is not None for c in convs), "convs": len(convs), "params": params,
            "untraced_parts": len(traced.untraced)}


def _input_size(name: str, img_size: int) -> tuple:
    import torch

    from acfx.tools.zoo import build_model, input_size_for
    with torch.device("meta"):
        try:
            model = build_model(name)
        except Exception:
            model = None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    native = input_size_for(model, name) if model is not None else (3, 224, 224)
    fixed = cfg.get("fixed_input_size", False)
    return native, fixed


def _run_one(name: str, img_size: int, batch_size: int, expand_kwargs: dict, check: str) -> dict:
    import torch

    from acfx.tools.deploy_check import check_deploy
    from acfx.tools.diagnostics import check_round_trip
    from acfx.tools.zoo import build_model

    native, fixed = _input_size(name, img_size)
    sizes = [native] if fixed else [(native[0], img_size, img_size), native]
    record = {}
    for size in sizes:
        torch.manual_seed(0)
        x = torch.randn(batch_size, *size)
        try:  # the plain model must run at this size; else try the native size
            probe = build_model(name).eval()
            with torch.no_grad():
                probe(x)
            del probe
        except Exception as error:
            record = {"status": "error", "failure": f"plain model fails at {tuple(size)}: "
                                                    f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        if check == "deploy":
            return _deploy_record(check_deploy(name, lambda: build_model(name), x), size)
        result = check_round_trip(name, lambda: build_model(name), x, **expand_kwargs)
        return _record(result, size)
    return record


def _deploy_record(result, size) -> dict:
    check = result.float64
    rec = {"input": list(size), "seconds": round(result.seconds, 2), "params": result.params, "convs": result.convs,
           "norms_left": result.norms_left, "error": result.error, "gamma_scale": result.gamma_scale,
           "error_f64": check.error_f64 if check else None, "noise_f32": check.noise_f32 if check else None,
           "converted_noise_f32": check.converted_noise_f32 if check else None, "failure": result.failure}
    if result.report is not None:
        rep = result.report
        rec.update(collapsed=len(rep.of("collapsed")), folded=len(rep.of("folded")), skipped=rep.skip_reasons(),
                   untraced=[e.name or "<model>" for e in rep.of("untraced")],
                   structure_changes=len(rep.structure_changes))
    rec["status"] = "error" if result.failure else "pass" if result.ok else "fail"
    return rec


def _record(result, size) -> dict:
    rec = {"input": list(size), "seconds": round(result.seconds, 2), "params": result.params,
           "class_kept": result.class_kept, "train_step_finite": result.train_step_finite,
           "error": result.error, "local_error": result.local_error, "error_f64": result.error_f64,
           "noise_f32": result.noise_f32, "collapsed_vs_f64": result.collapsed_vs_f64,
           "converted_noise_f32": result.collapsed_noise_f32,
           "gamma_scale": result.gamma_scale,
           "strict_reload": result.strict_reload, "failure": result.failure}
    if result.expand_report is not None:
        rep = result.expand_report
        rec.update(expanded=len(rep.of("expanded")), skipped=rep.skip_reasons(),
                   untraced=[e.name or "<model>" for e in rep.of("untraced")])
    if result.collapse_report is not None:
        rep = result.collapse_report
        rec.update(collapsed=len(rep.of("collapsed")),
                   collapse_skipped={e.name: e.detail for e in rep.skipped},
                   structure_changes=len(rep.structure_changes))
    if result.failure:
        rec["status"] = "error"
    elif not rec.get("expanded"):
        rec["status"] = "no sites"
    else:
        rec["status"] = "pass" if result.ok else "fail"
    return rec


def _worker(tasks, results, threads: int, budget: int, img_size: int, batch_size: int,
            expand_kwargs: dict, check: str) -> None:
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        task = tasks.get()
        if task is None:
            return
        phase, name = task
        results.put(("start", name, os.getpid()))
        signal.alarm(budget)
        start = time.perf_counter()
        try:
            rec = _pairs_on_meta(name) if phase == "detect" else _run_one(name, img_size, batch_size, expand_kwargs, check)
        except _Timeout:
            rec = {"status": "timeout", "failure": f"over the {budget} s budget"}
        except Exception as error:
            rec = {"status": "error", "failure": f"{type(error).__name__}: {str(error)[:300]}"}
        finally:
            signal.alarm(0)
        rec.setdefault("seconds", round(time.perf_counter() - start, 2))
        results.put(("done", name, rec))


# ----------------------------------------------------------------------------------------- parent side

def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


# glibc keeps freed blocks under its (growing) mmap threshold for reuse, so a worker's memory after a freed
# model and its gradients stays taken. At 1 MiB every tensor above it goes back to the system when freed: the
# largest models' round trips (regnety_2560 expanded by mobileone is 2.2e9 parameters, 18 GB in float64) then
# fit in 24 GiB. Set in the environment the spawned workers start with; a value the user set is kept.
MALLOC_MMAP_THRESHOLD = 1 << 20


def run_pool(phase: str, names, args) -> dict:
    """Run ``phase`` ("detect" or "check") on every name in worker processes; name -> record."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for name in names:
        tasks.put((phase, name))
    budget = args.detect_budget if phase == "detect" else args.budget
    spawn = lambda: ctx.Process(target=_worker, args=(tasks, results, args.threads, budget, args.img_size,  # noqa
                                                      args.batch_size, expand_kwargs(args), args.check),
                                daemon=True)
    workers = [spawn() for _ in range(args.workers)]
    for w in workers:
        w.start()
    running, records, bar = {}, {}, _progress(len(names), phase)
    while len(records) < len(names):
        try:
            kind, name, payload = results.get(timeout=5)
        except queue.Empty:
            _reap(workers, running, records, spawn, budget, bar, left=len(names) - len(records))
            continue
        if kind == "start":
            running[name] = (payload, time.time())
        else:
            running.pop(name, None)
            records[name] = payload
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{name}: {payload.get('status', 'ok')}")
    for _ in workers:
        tasks.put(None)
    if bar is not None:
        bar.close()
    return records


def _reap(workers, running, records, spawn, budget, bar, left: int) -> None:
    """Replace dead workers (crash, out of memory) while models are ``left``, and kill ones stuck far past the
    budget."""
    by_pid = {pid: (name, t0) for name, (pid, t0) in running.items()}
    for i, w in enumerate(workers):
        stuck = w.pid in by_pid and time.time() - by_pid[w.pid][1] > 2 * budget + 60
        if w.is_alive() and not stuck:
            continue
        if stuck:
            w.kill()
        w.join(timeout=5)
        if w.pid in by_pid:
            name = by_pid[w.pid][0]
            running.pop(name, None)
            records[name] = {"status": "timeout" if stuck else "crash",
                             "failure": "killed far past the budget" if stuck else f"worker died (exit {w.exitcode})"}
            if bar is not None:
                bar.update(1)
            left -= 1
        if left > len(running):  # models no running worker holds (a worker started now for none would
            workers[i] = spawn()  # fail to start once the sweep has ended)
            workers[i].start()


def expand_kwargs(args) -> dict:
    """The expand options of the sweep (the defaults: ACNet's block)."""
    return dict(include_unnormed=args.include_unnormed, recipe=args.recipe, mode=args.mode)


def default_stem(args) -> Path:
    """benchmarks/results/coverage_<source>, with the recipe and mode when they are not the defaults, or
    _deploy for the deploy check."""
    suffix = ("" if args.recipe == "acb" else "_" + args.recipe.replace("+", "_")) + \
        ("" if args.mode == "exact" else "_" + args.mode) + ("_deploy" if args.check == "deploy" else "")
    return RESULTS / f"coverage_{args.source}{suffix}"


def _detected_before(path: str, names: list) -> dict:
    """The conv→BN pairs a previous sweep found (its meta_ fields), for the names it has; the others: none."""
    rows = json.loads(Path(path).read_text())["results"]
    return {n: ({k.removeprefix("meta_"): v for k, v in rows[n].items() if k.startswith("meta_")} if n in rows
                else {"pairs": 0}) for n in names}


def _candidates(args) -> list:
    if args.source == "timm":
        import timm
        names = timm.list_models()
    else:
        import torchvision
        names = ["tv:" + n for n in torchvision.models.list_models(module=torchvision.models)]
    names = [n for n in names if fnmatch.fnmatch(n.removeprefix("tv:"), args.filter)]
    return names[: args.limit] if args.limit else names


def write_arch_list(names, path) -> None:
    """The list acfx.timm registers acb_ variants for."""
    import timm
    header = (f"# timm architectures with a conv→BN pair (timm {timm.__version__}), found by tracing each model\n"
              "# on the meta device: python benchmarks/coverage.py --write-archs acfx/timm_archs.txt\n")
    Path(path).write_text(header + "\n".join(names) + "\n")


def _merged(path: Path, run: dict) -> dict:
    """The results at ``path`` with this run's models replaced; each re-run row records its own run's args."""
    payload = json.loads(path.read_text())
    for name, row in run["results"].items():
        if name not in payload["results"]:
            raise SystemExit(f"--merge: {name} is not in {path}; run the full sweep first")
        payload["results"][name] = {**row, "run_args": {k: run["args"][k] for k in ("img_size", "batch_size")}}
    payload.setdefault("merged_runs", []).append({"environment": run["environment"], "args": run["args"],
                                                  "models": sorted(run["results"])})
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--filter", default="*", help="glob on model names (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N models (0: all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--budget", type=int, default=240, help="seconds per model for the check (default: 240)")
    parser.add_argument("--detect-budget", type=int, default=120, help="seconds per model to find conv→BN pairs")
    parser.add_argument("--img-size", type=int, default=96,
                        help="input size, unless the model has a fixed one (default: 96)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch of the check (default: 2; 1 fits the largest models in memory)")
    parser.add_argument("--max-params", type=float, default=400e6,
                        help="models with more parameters are not run on this machine (default: 4e8)")
    parser.add_argument("--min-params", type=float, default=0,
                        help="only models with at least this many parameters (e.g. to run the largest apart)")
    parser.add_argument("--large", type=float, default=100e6,
                        help="models with more parameters run one at a time, budget doubled (default: 1e8)")
    parser.add_argument("--include-unnormed", action="store_true", help="expand convs without BN too")
    from acfx.passes.options import ExpandOptions
    parser.add_argument("--recipe", choices=ExpandOptions.choices("recipe"), default="acb",
                        help="the recipe expand builds (default: acb)")
    parser.add_argument("--mode", choices=ExpandOptions.choices("mode"), default="exact")
    parser.add_argument("--check", choices=("round-trip", "deploy"), default="round-trip",
                        help="round-trip (default): expand, train a step, collapse, reload strictly; deploy: "
                             "collapse(fold_bn=True) of the model as built (its own rep blocks fused, every "
                             "conv→BN pair folded) against the model")
    parser.add_argument("--every", type=int, default=1,
                        help="every N-th model with a conv→BN pair, in name order (default: 1, all); the others "
                             "are listed as not run, so that runs with other --offset values and --merge fill "
                             "the table in over several sittings")
    parser.add_argument("--offset", type=int, default=0,
                        help="with --every N: start at the K-th model (0 <= K < N; default 0)")
    parser.add_argument("--pairs-from", default=None, metavar="JSON",
                        help="take the conv→BN pairs from a previous sweep's results instead of finding them")
    parser.add_argument("--out", default=None, help="output stem (default: benchmarks/results/coverage_<source>, "
                                                    "_<recipe>_<mode> added where not the defaults)")
    parser.add_argument("--merge", action="store_true",
                        help="replace this run's models in the existing results at --out (and re-count), "
                             "instead of writing a new table")
    parser.add_argument("--write-archs", default=None, metavar="PATH",
                        help="write the timm models with a conv→BN pair to PATH (acfx/timm_archs.txt) and stop")
    args = parser.parse_args(argv)
    if args.check == "deploy" and (args.recipe, args.mode, args.include_unnormed) != ("acb", "exact", False):
        parser.error("--check deploy collapses the model as built: --recipe, --mode and --include-unnormed are "
                     "options of expand")
    if args.every < 1 or not 0 <= args.offset < args.every:
        parser.error(f"--every must be at least 1 and --offset in [0, {max(args.every, 1)}); "
                     f"got --every {args.every} --offset {args.offset}")

    names = _candidates(args)
    if args.pairs_from:
        print(f"{len(names)} {args.source} models; conv→BN pairs from {args.pairs_from}", flush=True)
        detected = _detected_before(args.pairs_from, names)
    else:
        print(f"{len(names)} {args.source} models; finding conv→BN pairs", flush=True)
        detected = run_pool("detect", names, args)
    all_pairs = [n for n in names if detected[n].get("pairs")]
    with_pairs = all_pairs[args.offset::args.every]
    if args.write_archs:
        write_arch_list(all_pairs, args.write_archs)
        return 0
    if args.min_params:
        with_pairs = [n for n in with_pairs if detected[n].get("params", 0) >= args.min_params]
    runnable = [n for n in with_pairs if detected[n].get("params", 0) <= args.max_params]
    print(f"{len(with_pairs)} with a conv→BN pair, {len(runnable)} under {args.max_params:.0e} parameters", flush=True)
    # Large models one at a time (memory), with a longer budget.
    small = [n for n in runnable if detected[n]["params"] <= args.large]
    large = [n for n in runnable if detected[n]["params"] > args.large]
    checked = run_pool("check", small, args) if small else {}
    if large:
        print(f"{len(large)} models over {args.large:.0e} parameters: one worker", flush=True)
        checked.update(run_pool("check", large, argparse.Namespace(
            **{**vars(args), "workers": 1, "threads": args.threads * args.workers, "budget": 2 * args.budget})))
    rows = {}
    for name in with_pairs:
        rows[name] = {**{f"meta_{k}": v for k, v in detected[name].items() if k != "seconds"},
                      **checked.get(name, {"status": "not run", "failure": f"over --max-params "
                                                                            f"({detected[name]['params']:,} parameters)"})}
    from outputs import output_file

    from coverage_report import NOT_SAMPLED, write_markdown
    stem = Path(args.out) if args.out else default_stem(args)
    merge = args.merge and output_file(stem, ".json").exists()
    if args.merge and not merge:
        print(f"--merge: no {output_file(stem, '.json')} yet; writing a new table", flush=True)
    if not merge:  # a sampled run lists the models it leaves, for later runs to fill in
        sampled = set(with_pairs)
        for name in all_pairs:
            if name not in sampled and detected[name].get("params", 0) >= args.min_params:
                rows[name] = {**{f"meta_{k}": v for k, v in detected[name].items() if k != "seconds"},
                              "status": "not run", "failure": NOT_SAMPLED}
        rows = dict(sorted(rows.items()))
    undetected = {n: detected[n] for n in names if detected[n].get("status") in ("error", "timeout", "crash")}
    stem.parent.mkdir(parents=True, exist_ok=True)
    from environment import collect, stamp
    payload = stamp({"environment": {"device": "cpu"}, "args": vars(args), "models_listed": len(names),
                     "with_conv_bn_pair": len(all_pairs), "detection_failures": undetected, "results": rows},
                    collect(argv, __file__))
    if merge:
        payload = _merged(output_file(stem, ".json"), payload)
        rows = payload["results"]
    output_file(stem, ".json").write_text(json.dumps(payload, indent=1, default=str))
    output_file(stem, ".md").write_text(write_markdown(payload))
    statuses = [r["status"] for r in rows.values()]
    print({s: statuses.count(s) for s in sorted(set(statuses))})
    return 0 if all(s in ("pass", "not run") for s in statuses) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
