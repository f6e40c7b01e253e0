"""Markdown summary of a coverage run (benchmarks/coverage.py)."""
from __future__ import annotations

import collections
import json
import re
import sys

from environment import stamp

__all__ = ["write_markdown"]

NOT_SAMPLED = "not in a sampled run yet (--every, --offset)"  # coverage.py's mark


def _reason_key(text: str) -> str:
    """A failure message with names and numbers blanked, to group similar failures."""
    text = re.sub(r"'[^']*'", "'…'", text or "")
    return re.sub(r"\(.*?\)|\b\d+(\.\d+)?(e[-+]?\d+)?\b", "…", text)[:160]


def _fmt_error(value) -> str:
    return "" if value is None or value != value else f"{value:.1e}"


def _noise_floor(row: dict):
    """The float32 noise floor a row was judged by: the larger of the two models' own distances to their
    float64 results (rows measured before the converted model's was recorded carry the source's only);
    None where the float64 check did not run."""
    floors = [row[key] for key in ("noise_f32", "converted_noise_f32") if row.get(key) is not None]
    return max(floors) if floors else None


def _failure_text(row: dict) -> str:
    if row.get("failure"):
        return row["failure"]
    parts = []
    if not row.get("class_kept", True):
        parts.append("class changed")
    if not row.get("train_step_finite", True):
        parts.append("non-finite gradients")
    local, error, noise = row.get("local_error"), row.get("error"), _noise_floor(row) or 0.0
    error_f64 = row.get("error_f64")
    if local is not None and not local <= 1e-5:
        parts.append(f"a fused layer differs from its block by {local:.1e}")
    if error is not None and not (error <= max(4 * noise, 1e-5) or (error_f64 is not None and error_f64 <= 1e-10)):
        parts.append(f"round-trip error {error:.1e} (float32 noise floor {noise:.1e}, "
                     f"float64 round trip {_fmt_error(error_f64)})")
    if row.get("strict_reload") and not row.get("structure_changes"):
        parts.append(f"strict reload: {row['strict_reload']}")
    for name, detail in (row.get("collapse_skipped") or {}).items():
        parts.append(f"collapse skipped {name}: {detail}")
    return "; ".join(parts)


def _deploy_failure_text(row: dict) -> str:
    if row.get("failure"):
        return row["failure"]
    return (f"deploy-form error {_fmt_error(row.get('error'))} (float32 noise floor {_fmt_error(_noise_floor(row))}, "
            f"float64 {_fmt_error(row.get('error_f64'))})")


def _deploy_body(rows: dict) -> list:
    """What a --check deploy run measured: the pass bar, the totals, and the skip reasons grouped."""
    passing = [r for r in rows.values() if r["status"] == "pass"]
    lines = ["", "A model passes when `collapse(model, fold_bn=True)` (its own re-parameterisable blocks fused, "
                 "every conv→BN pair folded) computes what the model computes: max|Δ|/max|y| ≤ 1e-5 in float32, "
                 "or, where a deep network amplifies float32 rounding beyond that, within 4× of the float32 noise "
                 "floor (the larger of the two models' own distances to their float64 results) or exact to 1e-10 when the conversion is repeated in float64. BN statistics and affine "
                 "parameters are random."]
    if passing:
        errors = sorted(r["error"] for r in passing)
        with_blocks = [r for r in passing if r.get("collapsed")]
        lines += ["", f"Passing models: error median {errors[len(errors) // 2]:.1e}, max {errors[-1]:.1e}; "
                      f"{sum(r.get('folded', 0) for r in passing)} conv→BN pairs folded; "
                      f"{sum(r.get('collapsed', 0) for r in passing)} blocks of the models' own fused, in "
                      f"{len(with_blocks)} models; {sum(bool(r.get('norms_left')) for r in passing)} models keep "
                      "a BN that follows no conv (a BN after a pooling, a sum or a linear layer)."]
    skips = collections.Counter()
    for r in passing:
        for reason, count in (r.get("skipped") or {}).items():
            skips[_reason_key(reason)] += count
    if skips:
        lines += ["", "## What the deploy form leaves, grouped by reason (passing models)", "",
                  "| sites | reason |", "| --- | --- |"]
        lines += [f"| {n} | {reason} |" for reason, n in skips.most_common(15)]
    return lines


def _deploy_rows(rows: dict) -> list:
    lines = ["", "## All models", "",
             "| model | status | collapsed | folded | skipped | convs | BNs left | error | f32 noise | f64 error | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(rows.items()):
        if r.get("failure") == NOT_SAMPLED:
            continue
        convs = r.get("convs") or {}
        lines.append(f"| {name} | {r['status']} | {r.get('collapsed', '')} | {r.get('folded', '')} | "
                     f"{sum((r.get('skipped') or {}).values()) if 'skipped' in r else ''} | "
                     f"{convs.get('plain', '')} → {convs.get('deployed', '')} | {r.get('norms_left', '')} | "
                     f"{_fmt_error(r.get('error'))} | {_fmt_error(_noise_floor(r))} | "
                     f"{_fmt_error(r.get('error_f64'))} | {r.get('seconds', '')} |")
    return lines


def write_markdown(payload: dict) -> str:
    env, rows = payload["environment"], payload["results"]
    statuses = collections.Counter(r["status"] for r in rows.values())
    recipe, mode = payload["args"].get("recipe", "acb"), payload["args"].get("mode", "exact")
    deploy = payload["args"].get("check") == "deploy"
    form = "" if (recipe, mode) == ("acb", "exact") else f", recipe {recipe}" + ("" if mode == "exact" else f" ({mode})")
    form += ", deploy form (collapse with fold_bn=True of each model as built)" if deploy else ""
    every = payload["args"].get("every", 1)
    lines = [f"# acfx coverage: {payload['args']['source']}{form}", "",
             f"{env['date']}, torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, "
             f"Python {env['python']}, {env['machine']} CPU ({env['cpu_count']} cores), float32, "
             f"input {payload['args']['img_size']} px unless the model has a fixed size, "
             f"batch {payload['args'].get('batch_size', 2)}.", ""]
    for run in payload.get("merged_runs", []):
        step = run["args"].get("every", 1)
        which = (f"every {step}-th model from offset {run['args'].get('offset', 0)} ({len(run['models'])} models)"
                 if step > 1 else ", ".join(run["models"]))
        lines += [f"Re-run apart on {run['environment']['date']} (merged into this table): "
                  f"{which}, batch {run['args']['batch_size']}, "
                  f"up to {run['args']['max_params']:.0e} parameters.", ""]
    lines += [f"{payload['models_listed']} models listed, {payload['with_conv_bn_pair']} with a conv→BN pair "
              "(found by tracing each model on the meta device)" +
              (f"; sampled runs (every {every}-th in name order, offsets merged) have checked "
               f"{sum(r.get('failure') != NOT_SAMPLED for r in rows.values())} of them so far, the others are "
               "listed as not run." if every > 1 else ".")
              , "", "| status | models |", "| --- | --- |"]
    lines += [f"| {s} | {n} |" for s, n in statuses.most_common()]
    if deploy:
        return _deploy_markdown(payload, lines)
    passing = [r for r in rows.values() if r["status"] == "pass"]
    if passing:
        errors = sorted(r["error"] for r in passing)
        local = sorted(r["local_error"] for r in passing)
        noisy = [r for r in passing if r["error"] > 1e-5]
        tame = [r for r in passing if r.get("gamma_scale", 1.0) < 1.0]
        lines += ["", "A model passes when its class is kept, a training step gives finite gradients, every fused "
                      "layer reproduces its block on the input the block saw (max|Δ|/max|y| ≤ 1e-5, float32), the "
                      "whole collapsed model matches the expanded one (≤ 1e-5; where a deep network amplifies "
                      "float32 rounding beyond that: within 4× of the float32 noise floor, the larger of the "
                      "expanded and the collapsed models' own distances to their float64 results, or exact to 1e-10 when the round trip is "
                      "repeated in float64), and the collapsed state_dict loads strictly into a freshly built "
                      "model. BN statistics and affine parameters are random.", "",
                  f"Passing models: end-to-end error median {errors[len(errors) // 2]:.1e}, max {errors[-1]:.1e}; "
                  f"per fused layer max {local[-1]:.1e}.",
                  f"{len(noisy)} passing models are over 1e-5 end to end: deep networks with random BN statistics "
                  "amplify float32 rounding; for each, the table gives the float32 noise floor and the round trip "
                  "in float64."]
        if noisy:
            f64_exact = [r for r in noisy if r.get("error_f64") is not None and r["error_f64"] <= 1e-10]
            chaotic = len(noisy) - len(f64_exact)
            lines.append(f"{len(f64_exact)} of them round-trip in float64 to ≤ 1e-10. The other {chaotic} are so "
                         "ill-conditioned with random statistics that even float64 rounding grows past 1e-10 and "
                         "their float32 outputs are mostly rounding (float32 noise floor up to "
                         f"{max(_noise_floor(r) or 0.0 for r in noisy):.1e}): for them the end-to-end number says "
                         "nothing, and the evidence is the per-layer check, every fused layer within "
                         f"{max(r['local_error'] for r in noisy):.1e} of its block.")
        if tame:
            lines.append(f"{len(tame)} model(s) overflowed with the first random statistics and were checked with "
                         "γ scaled down (gamma_scale in the JSON).")
    lines += _not_passing(payload, _failure_text)
    lines += ["", "## All models", "",
              "| model | status | conv→BN pairs | expanded | skipped | collapsed | error | per layer | f32 noise | "
              "f64 error | strict reload | s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(rows.items()):
        if r.get("failure") == NOT_SAMPLED:
            continue
        reload = "" if r["status"] in ("not run", "error", "timeout", "crash") else (
            "ok" if not r.get("strict_reload") else ("n/a" if r.get("structure_changes") else "FAIL"))
        lines.append(f"| {name} | {r['status']} | {r.get('meta_pairs', '')} | {r.get('expanded', '')} | "
                     f"{sum((r.get('skipped') or {}).values()) if 'skipped' in r else ''} | "
                     f"{r.get('collapsed', '')} | {_fmt_error(r.get('error'))} | {_fmt_error(r.get('local_error'))} | "
                     f"{_fmt_error(_noise_floor(r))} | "
                     f"{_fmt_error(r.get('error_f64'))} | {reload} | "
                     f"{r.get('seconds', '')} |")
    return stamp("\n".join(lines) + "\n", env)


def _not_passing(payload: dict, text) -> list:
    """The models that do not pass (grouped by reason, then one by one) and those that could not be inspected."""
    rows, lines = payload["results"], []
    failures = {n: r for n, r in rows.items() if r["status"] not in ("pass",)}
    if failures:
        groups = collections.Counter(_reason_key(text(r)) for r in failures.values())
        lines += ["", "## Not passing, grouped by reason", "", "| models | reason |", "| --- | --- |"]
        lines += [f"| {n} | {reason} |" for reason, n in groups.most_common()]
        lines += ["", "## Not passing, per model", "", "| model | status | reason |", "| --- | --- | --- |"]
        lines += [f"| {n} | {r['status']} | {text(r)[:300]} |" for n, r in sorted(failures.items())
                  if r.get("failure") != NOT_SAMPLED]  # those are counted above, and listed by name in the JSON
    if payload.get("detection_failures"):
        lines += ["", "## Models that could not be inspected", "", "| model | reason |", "| --- | --- |"]
        lines += [f"| {n} | {r.get('failure', '')[:200]} |" for n, r in sorted(payload["detection_failures"].items())]
    return lines


def _deploy_markdown(payload: dict, lines: list) -> str:
    rows = payload["results"]
    lines = lines + _deploy_body(rows) + _not_passing(payload, _deploy_failure_text) + _deploy_rows(rows)
    return stamp("\n".join(lines) + "\n", payload["environment"])


if __name__ == "__main__":
    path = sys.argv[1]
    print(write_markdown(json.load(open(path))))
