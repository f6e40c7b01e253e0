"""Markdown table and plot of a latency run (benchmarks/latency.py)."""
from __future__ import annotations

import json
import sys

from environment import caption, stamp

__all__ = ["write_markdown", "write_plot"]


def _settings(rows):
    keys = sorted({(r["mode"], r["dtype"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    return [(k, [r for r in rows if (r["mode"], r["dtype"], r["batch"]) == k]) for k in keys]


def _summary(rows) -> list:
    within = [r for r in rows if abs(r["collapsed/original"] - 1) <= max(r["noise"], 0.01)]
    fold_ok = [r for r in rows if r["fold_bn/original"] <= 1 + max(r["noise"], 0.01)]
    ratios = sorted(r["collapsed/original"] for r in rows)
    return [f"- collapsed/original: median {ratios[len(ratios) // 2]:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}; "
            f"within max(noise floor, 1%) in {len(within)} of {len(rows)} settings.",
            f"- same kernels as the original (names and counts): {sum(r['same_kernels'] for r in rows)} of "
            f"{len(rows)} settings.",
            f"- fold_bn at or below the original (within noise): {len(fold_ok)} of {len(rows)} settings."]


def write_markdown(payload: dict) -> str:
    env, rows = payload["environment"], payload["rows"]
    lines = ["# Inference latency: original vs expanded vs collapsed vs fold_bn", "",
             f"{env['device']}, torch {env['torch']}, timm {env['timm']}, {env['date']}; input "
             f"{env['img_size']} px, channels_last, median of {env['rounds']} interleaved rounds "
             "(CUDA-graph replays timed with CUDA events on the GPU, wall clock on the CPU). Noise: "
             "|original timed again / original − 1| in the same run.", ""] + _summary(rows)
    for (mode, dtype, batch), group in _settings(rows):
        lines += ["", f"## {mode}, {dtype}, batch {batch}", "",
                  "| model | original ms | again ms | expanded ms | collapsed ms | fold_bn ms | collapsed/orig | "
                  "noise | fold_bn/orig | expanded/orig | same kernels |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(group, key=lambda r: r["model"]):
            ms = r["ms"]
            lines.append(f"| {r['model']} | {ms['original']:.3f} | {ms['original (again)']:.3f} | "
                         f"{ms['expanded']:.3f} | {ms['collapsed']:.3f} | {ms['fold_bn']:.3f} | "
                         f"{r['collapsed/original']:.3f} | {r['noise']:.3f} | {r['fold_bn/original']:.3f} | "
                         f"{r['expanded/original']:.2f} | {'yes' if r['same_kernels'] else 'NO'} |")
    return stamp("\n".join(lines) + "\n", env)


def write_plot(payload: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _settings(payload["rows"])
    fig, axes = plt.subplots(len(settings), 1, figsize=(11, 2.6 * len(settings)), squeeze=False, sharex=False)
    for ax, ((mode, dtype, batch), group) in zip(axes[:, 0], settings):
        group = sorted(group, key=lambda r: r["model"])
        xs = list(range(len(group)))
        ax.errorbar(xs, [1.0] * len(xs), yerr=[r["noise"] for r in group], fmt="none", ecolor="0.6", elinewidth=6,
                    alpha=0.6, label="noise floor (original timed twice)")
        ax.plot(xs, [r["collapsed/original"] for r in group], "o", label="collapsed")
        ax.plot(xs, [r["fold_bn/original"] for r in group], "^", label="fold_bn")
        for x, r in zip(xs, group):  # the expanded model is off this scale: written out
            ax.annotate(f"exp ×{r['expanded/original']:.2f}", (x, 1.42), ha="center", fontsize=6, color="C2")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["model"] for r in group], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("time / original")
        ax.set_ylim(0.5, 1.5)
        ax.set_title(f"{mode}, {dtype}, batch {batch}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper left")
    env = payload["environment"]
    fig.suptitle(f"acfx inference latency, {env['device']}, torch {env['torch']}, {env['date']}\n"
                 f"{caption(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    print(write_markdown(data))
