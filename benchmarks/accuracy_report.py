"""Summary statistics, markdown and plot of an accuracy run (benchmarks/accuracy.py).

    python benchmarks/accuracy_report.py benchmarks/results/accuracy_digits.json   # re-render .md and .png

Kept apart from the harness so that a JSON file can be re-rendered without training anything. Every
function here takes the JSON-shaped payload (plain dicts), never live models.

Statistics: per variant, mean ± sample standard deviation over seeds; against the base model, the paired
difference on the same seed (same initial weights, data order and augmentation), with its mean, standard
deviation, a 95% t-interval and the count of seeds where the variant is above / equal / below the base.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from environment import caption, stamp

__all__ = ["METRICS", "Stat", "Paired", "stat", "paired", "payload", "markdown", "plot", "headline", "one_line"]

# (JSON key, label): what is summarised per variant and compared with the base on the same seed.
METRICS = [
    ("top1", "top-1"),
    ("top1_rot90", "rot 90°"),
    ("top1_rot180", "rot 180°"),
    ("top1_flipud", "up-down flip"),
    ("top1_fliplr", "left-right flip"),
    ("top1_int8", "int8 (per-channel)"),
    ("top1_int8_per_tensor", "int8 (per-tensor)"),
    ("top1_int8_weights_only", "int8 weights only (per-channel)"),
    ("top1_int8_per_tensor_weights_only", "int8 weights only (per-tensor)"),
    ("top1_int8_qat", "int8 after QAT (per-channel)"),
    ("top1_int8_per_tensor_qat", "int8 after QAT (per-tensor)"),
    ("drop_int8", "int8 drop (per-channel)"),
    ("drop_int8_per_tensor", "int8 drop (per-tensor)"),
    ("drop_int8_per_tensor_weights_only", "drop, per-tensor weights only"),
    ("drop_int8_qat", "drop after QAT (per-channel)"),
    ("drop_int8_per_tensor_qat", "drop after QAT (per-tensor)"),
    ("skeleton_ratio", "skeleton / corners"),
    ("skeleton_ratio_init", "skeleton / corners at init"),
    ("sqnr_kxk_per_tensor_db", "k×k weight SQNR per-tensor (dB)"),
    ("sqnr_kxk_per_channel_db", "k×k weight SQNR per-channel (dB)"),
    ("sqnr_kxk_channel_spread", "k×k channel range spread"),
    ("sqnr_kxk_peak_to_rms", "k×k peak / rms weight"),
]


def _derived(row: dict) -> Dict[str, Optional[float]]:
    """The row's metrics, with the int8 drops (trained top-1 − int8 top-1) and SQNR summary flattened in."""
    out = {key: row.get(key) for key, _ in METRICS}
    for suffix in ("", "_per_tensor", "_per_tensor_weights_only", "_qat", "_per_tensor_qat"):
        value = row.get(f"top1_int8{suffix}")
        out[f"drop_int8{suffix}"] = None if value is None else row["top1"] - value
    for key, value in row.get("sqnr", {}).items():
        out[f"sqnr_{key}"] = value
    return out


@dataclass
class Stat:
    """Mean and sample standard deviation of one metric over seeds."""
    mean: float
    std: float  # nan with one seed
    n: int


@dataclass
class Paired:
    """Variant − base on the same seeds."""
    mean: float
    std: float
    ci95: float  # half-width of the 95% t-interval of the mean difference (nan with one seed)
    above: int  # seeds where the variant is higher
    equal: int
    below: int
    n: int


def stat(values: Sequence[float]) -> Optional[Stat]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


def _t975(df: int) -> float:
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:  # the table, for the small seed counts this harness uses
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(df, 1.96 + 2.5 / df)


def paired(pairs: Sequence[tuple]) -> Optional[Paired]:
    """Summary of (variant value, base value) pairs from the same seeds."""
    diffs = [v - b for v, b in pairs if v is not None and b is not None]
    if not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    ci = _t975(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    eps = 1e-12
    return Paired(statistics.fmean(diffs), std, ci, sum(d > eps for d in diffs), sum(abs(d) <= eps for d in diffs),
                  sum(d < -eps for d in diffs), len(diffs))


def _summaries(rows: List[dict], variants: List[str]) -> Dict[str, Dict[str, Optional[dict]]]:
    derived = [(_derived(r), r) for r in rows]
    out = {}
    for variant in variants:
        mine = [d for d, r in derived if r["variant"] == variant]
        out[variant] = {key: _asdict(stat([d[key] for d in mine])) for key, _ in METRICS}
    return out


def _paired(rows: List[dict], variants: List[str]) -> Dict[str, Dict[str, Optional[dict]]]:
    base = {r["seed"]: _derived(r) for r in rows if r["variant"] == "base"}
    out = {}
    for variant in variants:
        if variant == "base" or not base:
            continue
        mine = [(_derived(r), base.get(r["seed"])) for r in rows if r["variant"] == variant]
        out[variant] = {key: _asdict(paired([(d[key], b[key]) for d, b in mine if b is not None]))
                        for key, _ in METRICS}
    return out


def _asdict(value) -> Optional[dict]:
    return None if value is None else dataclasses.asdict(value)


def _mean_matrix(rows: List[dict], variant: str, key: str = "kernel_magnitude") -> Optional[List[List[float]]]:
    matrices = [r[key] for r in rows if r["variant"] == variant and r.get(key)]
    if not matrices:
        return None
    return [[statistics.fmean(m[i][j] for m in matrices) for j in range(len(matrices[0][0]))]
            for i in range(len(matrices[0]))]


def payload(environment: dict, rows: list, variants: Dict[str, str]) -> dict:
    """The JSON document: environment, variant descriptions (``variants``: name → one line), summaries, paired
    differences, rows (dataclasses or dicts)."""
    rows = [r if isinstance(r, dict) else dataclasses.asdict(r) for r in rows]
    names = [v for v in environment["variants"] if any(r["variant"] == v for r in rows)]
    return {"environment": environment,
            "variants": {name: variants[name] for name in names},
            "summary": _summaries(rows, names),
            "paired_vs_base": _paired(rows, names),
            "kernel_magnitude_mean": {name: _mean_matrix(rows, name) for name in names},
            "kernel_magnitude_init_mean": {name: _mean_matrix(rows, name, "kernel_magnitude_init") for name in names},
            "rows": rows}


# ----------------------------------------------------------------------------------------------- text

def _pct(s: Optional[dict], signed: bool = False) -> str:
    if s is None:
        return "n/a"
    sign = "+" if signed else ""
    spread = "" if math.isnan(s["std"]) else f" ± {100 * s['std']:.2f}"
    return f"{100 * s['mean']:{sign}.2f}{spread}"


def _num(s: Optional[dict], digits: int = 2) -> str:
    if s is None:
        return "n/a"
    spread = "" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{spread}"


def _delta(p: Optional[dict], scale: float = 100, digits: int = 2) -> str:
    if p is None:
        return ""
    ci = "" if math.isnan(p["ci95"]) else f" [±{scale * p['ci95']:.{digits}f}]"
    return f"{scale * p['mean']:+.{digits}f}{ci} ({p['above']}/{p['equal']}/{p['below']})"


def _table(pl: dict, keys: Sequence[str], pct: bool = True, digits: int = 2) -> List[str]:
    labels = dict(METRICS)
    head = ["variant"] + [labels[k] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant in pl["variants"]:
        cells = [variant]
        for key in keys:
            s = pl["summary"][variant][key]
            cell = _pct(s) if pct else _num(s, digits)
            p = pl["paired_vs_base"].get(variant, {}).get(key)
            if p is not None:
                cell += "<br>Δ " + (_delta(p) if pct else _delta(p, 1, digits))
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _matrix_lines(pl: dict) -> List[str]:
    lines = []
    for variant in ("base", "acnet"):
        for key, when in (("kernel_magnitude_init_mean", "at initialisation"), ("kernel_magnitude_mean", "trained")):
            m = pl.get(key, {}).get(variant)
            if m:
                lines += ["", f"{variant}, {when} (mean over seeds):", "", "```"] + \
                         ["  ".join(f"{v:.3f}" for v in row) for row in m] + ["```"]
    return lines


def _parity_lines(rows: List[dict]) -> List[str]:
    worst_c = max(r["parity"]["max_logit_diff_collapsed"] for r in rows)
    worst_f = max(r["parity"]["max_logit_diff_fold_bn"] for r in rows)
    margin = min(r["parity"]["min_margin"] for r in rows)
    ties = sum(r["parity"]["near_ties"] for r in rows)
    return [f"Predictions of the trained, collapsed and fold_bn models are identical on every test image of every "
            f"run (asserted). Largest logit difference: collapse {worst_c:.2g}, fold_bn {worst_f:.2g}; smallest "
            f"top-two logit gap of a trained model {margin:.2g}; test images whose gap is within twice their logit "
            f"difference (where float32 rounding could flip a prediction): {ties} over all runs."]


def markdown(pl: dict) -> str:
    env, rows = pl["environment"], pl["rows"]
    r = env["recipe"]
    qat = "no QAT" if not r["qat_epochs"] else f"QAT {r['qat_epochs']} epochs from lr {r['qat_lr']}"
    workers = env.get("workers", 1)
    procs = f"{workers} worker processes × {env['threads']} thread" if workers > 1 else f"{env['threads']} threads"
    lines = [f"# Accuracy of ACNet on {env['data']}: base vs ACNet variants, end to end", "",
             f"{env['data_about']}. Model {env['model']}; seeds {env['seeds']}.",
             f"Recipe (the same for every variant): SGD momentum {r['momentum']}, lr {r['lr']} cosine to 0, "
             f"weight decay {r['weight_decay']}, batch {r['batch_size']}, {r['epochs']} epochs, random shift ±"
             f"{r['translate']} px, left-right flips {'on' if r['hflip'] else 'off'}. int8: {env['int8_api']}, "
             f"{env['int8_engine']} engine, calibrated on {r['calibration_images']} training images; {qat}.",
             f"acfx {env.get('acfx', 'n/a')}; {env['cpu']} ({env['device']}, {procs}), torch "
             f"{env['torch']}, timm {env['timm']}, "
             f"scikit-learn {env.get('scikit-learn', 'n/a')}, {env['date']}; wall time {env['wall_seconds']:.0f} s.",
             "", "Cells: mean ± std over seeds (percent); Δ: paired difference to base on the same seed, mean "
             "[95% t-interval half-width] (seeds above/equal/below base).", "",
             "## Accuracy and robustness (rotated / flipped test images; training never sees them)", ""]
    lines += _table(pl, ["top1", "top1_rot90", "top1_rot180", "top1_flipud", "top1_fliplr"])
    lines += ["", "## int8 (post-training quantization of the collapsed model)", ""]
    lines += _table(pl, ["top1_int8", "drop_int8", "top1_int8_per_tensor", "drop_int8_per_tensor",
                         "drop_int8_per_tensor_weights_only", "drop_int8_qat", "drop_int8_per_tensor_qat"])
    lines += ["", "## Weights: quantization error and the kernel skeleton", ""]
    lines += _table(pl, ["sqnr_kxk_per_tensor_db", "sqnr_kxk_per_channel_db", "sqnr_kxk_channel_spread",
                         "sqnr_kxk_peak_to_rms", "skeleton_ratio_init", "skeleton_ratio"], pct=False)
    lines += ["", "Average kernel magnitude matrix (the paper's Sect. 4.4: |kernel| summed over filters and "
              "channels per layer, normalised to its maximum, averaged over layers; BN folded, branches fused). "
              "At initialisation: the untrained model with its BN statistics estimated on 512 training images, "
              "i.e. the function it computes before the first step:"]
    lines += _matrix_lines(pl)
    lines += ["", "## Collapse", ""] + _parity_lines(rows)
    lines += ["", "## Runs", "", "| variant | seed | top-1 | collapsed | fold_bn | int8 | int8 per-tensor | QAT | "
              "rot180 | flipud | skeleton | train s | eval s |", "|" + " --- |" * 13]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for row in rows:
        lines.append(f"| {row['variant']} | {row['seed']} | {fmt(row['top1'])} | {fmt(row['top1_collapsed'])} | "
                     f"{fmt(row['top1_fold_bn'])} | {fmt(row['top1_int8'])} | {fmt(row['top1_int8_per_tensor'])} | "
                     f"{fmt(row['top1_int8_qat'])} | {fmt(row['top1_rot180'])} | {fmt(row['top1_flipud'])} | "
                     f"{row['skeleton_ratio']:.2f} | {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} |")
    return stamp("\n".join(lines) + "\n", env)


def one_line(row: dict) -> str:
    """A progress line for one finished run."""
    fmt = lambda v: "  n/a" if v is None else f"{100 * v:5.2f}"  # noqa: E731
    return (f"{row['variant']:13s} seed {row['seed']}: top-1 {fmt(row['top1'])} (collapsed "
            f"{fmt(row['top1_collapsed'])},"
            f" fold_bn {fmt(row['top1_fold_bn'])}) int8 {fmt(row['top1_int8'])} / per-tensor "
            f"{fmt(row['top1_int8_per_tensor'])} / QAT {fmt(row['top1_int8_qat'])}, rot180 {fmt(row['top1_rot180'])}, "
            f"flipud {fmt(row['top1_flipud'])}, skeleton {row['skeleton_ratio']:.2f}, "
            f"train {row['train_seconds']:.0f} s")


def headline(pl: dict) -> str:
    """A few lines for the terminal: top-1 and the paired difference per variant."""
    out = []
    for variant in pl["variants"]:
        s = pl["summary"][variant]
        p = pl["paired_vs_base"].get(variant, {})
        out.append(f"{variant:13s} top-1 {_pct(s['top1'])} {_delta(p.get('top1'))}  int8 drop "
                   f"{_pct(s['drop_int8'], True)} (per-tensor {_pct(s['drop_int8_per_tensor'], True)})  rot180 "
                   f"{_pct(s['top1_rot180'])}  flipud {_pct(s['top1_flipud'])}  skeleton {_num(s['skeleton_ratio'])}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- plot

def _curves(ax, rows: List[dict], variants: List[str], key: str, ylabel: str) -> None:
    for i, variant in enumerate(variants):
        curves = [[e[key] for e in r["curve"]] for r in rows if r["variant"] == variant and r["curve"]]
        if not curves:
            continue
        epochs = list(range(1, min(map(len, curves)) + 1))
        per_epoch = [[c[e - 1] for c in curves] for e in epochs]
        mean = [statistics.fmean(v) for v in per_epoch]
        ax.plot(epochs, mean, color=f"C{i}", lw=1.2, label=variant)
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _paired_dots(ax, pl: dict, variants: List[str], keys: Sequence[str], title: str) -> None:
    """Per-seed paired differences to base (dots) and their mean with the 95% t-interval (bar), per variant."""
    rows, labels = pl["rows"], dict(METRICS)
    base = {r["seed"]: _derived(r) for r in rows if r["variant"] == "base"}
    others = [v for v in variants if v != "base"]
    offsets = [0.25 * (i - (len(keys) - 1) / 2) for i in range(len(keys))]
    for k, (key, offset) in enumerate(zip(keys, offsets)):
        for x, variant in enumerate(others):
            pairs = [(_derived(r)[key], base[r["seed"]][key]) for r in rows
                     if r["variant"] == variant and r["seed"] in base]
            diffs = [100 * (v - b) for v, b in pairs if v is not None and b is not None]
            ax.plot([x + offset] * len(diffs), diffs, ".", color=f"C{k}", alpha=0.5, ms=4)
            p = pl["paired_vs_base"][variant][key]
            if p is not None:
                ci = 0 if math.isnan(p["ci95"]) else 100 * p["ci95"]
                ax.errorbar(x + offset, 100 * p["mean"], yerr=ci, fmt="_", color=f"C{k}", ms=12, capsize=2,
                            label=labels[key] if x == 0 else None)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels(others, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("variant − base, points (same seed)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6)


def _heatmap(ax, fig, matrix, title: str) -> None:
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _sqnr(ax, rows: List[dict], variants: List[str]) -> None:
    for i, variant in enumerate(variants):
        if variant not in ("base", "acnet"):
            continue
        mine = [r["sqnr_layers"] for r in rows if r["variant"] == variant]
        if not mine:
            continue
        n = len(mine[0])
        for key, style in (("per_tensor_db", "-o"), ("per_channel_db", "--^")):
            ys = [statistics.fmean(layers[j][key] for layers in mine) for j in range(n)]
            ax.plot(range(n), ys, style, color=f"C{i}", ms=3, lw=1, label=f"{variant} {key.split('_db')[0]}")
    ax.set_xlabel("layer (conv / fc, in model order)")
    ax.set_ylabel("weight SQNR, dB (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot(pl: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, variants, env = pl["rows"], list(pl["variants"]), pl["environment"]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    _curves(axes[0, 0], rows, variants, "test_top1", "test top-1 (mean, band: min-max over seeds)")
    axes[0, 0].legend(fontsize=7)
    _curves(axes[0, 1], rows, variants, "train_loss", "training loss")
    axes[0, 1].set_yscale("log")
    _paired_dots(axes[0, 2], pl, variants, ["top1"], "clean top-1: paired difference to base")
    _paired_dots(axes[0, 3], pl, variants, ["top1_rot180", "top1_flipud", "drop_int8", "drop_int8_per_tensor"],
                 "robustness and int8 drop: paired difference to base")
    panels = (("base", "kernel_magnitude_mean", "skeleton_ratio", "trained"),
              ("acnet", "kernel_magnitude_init_mean", "skeleton_ratio_init", "at init"),
              ("acnet", "kernel_magnitude_mean", "skeleton_ratio", "trained"))
    for ax, (variant, key, ratio_key, when) in zip(axes[1, :3], panels):
        matrix = pl.get(key, {}).get(variant)
        ratio = pl["summary"].get(variant, {}).get(ratio_key)
        if matrix and ratio:
            _heatmap(ax, fig, matrix, f"{variant} {when}: kernel magnitude, skeleton/corners {ratio['mean']:.2f}")
        else:
            ax.axis("off")
    _sqnr(axes[1, 3], rows, variants)
    fig.suptitle(f"acfx accuracy harness: {env['model']} on {env['data']}, {len(env['seeds'])} seed(s), "
                 f"{env['recipe']['epochs']} epochs; {env['cpu']}, torch {env['torch']}, {env['date']}\n"
                 f"{caption(env, width=250)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path = Path(args[0])
    stored = json.loads(path.read_text())
    pl = payload(stored["environment"], stored["rows"], stored["variants"])  # statistics recomputed from the rows
    path.with_suffix(".md").write_text(markdown(pl))
    plot(pl, path.with_suffix(".png"))
    print(headline(pl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
