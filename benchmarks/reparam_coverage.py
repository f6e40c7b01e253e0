"""timm's reparameterize_model (validate.py / benchmark.py --reparam) on every acb_ model of the families
that have their own re-parameterisable blocks.

The families are found by listing: every timm.models submodule with a class defining fuse /
reparameterize / switch_to_deploy, and in it every registered acb_ model that uses one. For each: the
acb_ model with random BN statistics in eval, against reparameterize_model of it (exact up to float32
rounding, judged as `acfx check` judges it), and against reparameterize_model of the plain base model
(the same module types, and a state_dict that loads strictly). Results go to
benchmarks/results/reparam_timm.json and .md.

    python benchmarks/reparam_coverage.py
    python benchmarks/reparam_coverage.py --filter 'fastvit*' --batch-size 1
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import acfx.timm  # noqa: E402
from acfx.tools.reparam_check import check_reparameterize, rep_families  # noqa: E402
from acfx.tools.zoo import input_size_for  # noqa: E402

from environment import collect, stamp  # noqa: E402

RESULTS = HERE / "results"


def _size(name: str, max_size: int) -> tuple:
    import timm
    with torch.device("meta"):
        model = timm.create_model(name)
    channels, height, width = input_size_for(model, name)
    if (model.pretrained_cfg or {}).get("fixed_input_size"):
        return channels, height, width
    return channels, min(height, max_size), min(width, max_size)


def _row(family: str, name: str, args) -> dict:
    size = _size(name, args.img_size)
    result = check_reparameterize(name, torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0)))
    f64 = result.float64
    return {"family": family, "model": name, "input": list(size), "ok": result.ok, "error": result.error,
            "error_f64": f64.error_f64 if f64 else None, "noise_f32": f64.noise_floor if f64 else None,
            "same_types": result.same_types, "strict_reload": result.strict_reload, "failure": result.failure}


def _markdown(run: dict) -> str:
    env, rows = run["environment"], run["rows"]
    passed = sum(r["ok"] for r in rows)
    lines = ["# timm reparameterize_model on acb_ models of re-parameterisable families\n",
             f"{env['date']}, torch {env['torch']}, timm {env['timm']}, Python {env['python']}, {env['machine']} CPU, "
             f"float32, batch {run['args']['batch_size']}, random BN statistics, eval.\n",
             f"Families found by listing (classes with fuse / reparameterize / switch_to_deploy): "
             f"{', '.join(sorted(run['families']))}.\n",
             f"**{passed} of {len(rows)} models pass**: reparameterize_model(acb_ model) computes what the acb_ model "
             "computes (max|Δ|/max|y| ≤ 1e-5, or float32 rounding shown by the float64 repeat), has the module types "
             "of reparameterize_model(base model), and its state_dict loads strictly into it.\n",
             "| family | model | input | ok | error | f64 error | f32 noise | same types | strict reload |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f64 = f"{r['error_f64']:.1e}" if r["error_f64"] is not None else ""
        noise = f"{r['noise_f32']:.1e}" if r["noise_f32"] is not None else ""
        reload = "ok" if r["strict_reload"] is None else r["strict_reload"][:60]
        status = "pass" if r["ok"] else (r["failure"] or "FAIL")
        lines.append(f"| {r['family']} | {r['model']} | {'x'.join(map(str, r['input'][1:]))} | {status} | "
                     f"{r['error']:.1e} | {f64} | {noise} | {r['same_types']} | {reload} |")
    return stamp("\n".join(lines) + "\n", env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="*", help="glob on base model names (default: all)")
    parser.add_argument("--img-size", type=int, default=224, help="largest input side (fixed-size models keep theirs)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "reparam_timm"), help="output stem (.json and .md)")
    args = parser.parse_args(argv)
    from tqdm import tqdm
    families = rep_families(acfx.timm.registered())
    todo = [(family, name) for family, names in families.items() for name in names if fnmatch.fnmatch(name, args.filter)]
    rows = []
    bar = tqdm(todo, unit="model")
    for family, name in bar:
        rows.append(_row(family, name, args))
        bar.set_postfix_str(f"{name}: {'pass' if rows[-1]['ok'] else 'FAIL'}")
    run = stamp({"args": vars(args), "families": sorted(families), "rows": rows}, collect(argv, __file__))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(run, indent=1))
    Path(args.out + ".md").write_text(_markdown(run))
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} pass; wrote {args.out}.md")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
