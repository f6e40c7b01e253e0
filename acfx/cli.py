"""The `acfx` command line: check, expand, collapse and kernels."""
from __future__ import annotations

import argparse
import collections
import sys
from typing import List, Optional

import torch

__all__ = ["main"]


def _expand_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("expand options (must match those the checkpoint was trained with)")
    group.add_argument("--branches", choices=("both", "hor", "ver"), default="both",
                       help="asymmetric branches to add (default: both)")
    group.add_argument("--norm", choices=("branch", "sum"), default="branch",
                       help="one BN per branch (default) or one BN after the sum")
    group.add_argument("--placement", choices=("centre", "border"), default="centre",
                       help="asymmetric kernels on the centre row/column (default) or the border")
    group.add_argument("--include-unnormed", action="store_true",
                       help="also expand k×k convs that no BN follows (their collapsed conv gains a bias)")


def _expand_kwargs(args: argparse.Namespace) -> dict:
    return dict(branches=args.branches, norm=args.norm, placement=args.placement,
                include_unnormed=args.include_unnormed)


def _sites_summary(report, action: str) -> str:
    kinds = collections.Counter(e.what for e in report.of(action))
    return ", ".join(f"{n}× {what}" for what, n in kinds.most_common()) or "none"


def _print_check(result, show_sites: bool) -> None:
    from .report import Report
    expand_report: Report = result.expand_report
    if show_sites:
        print(expand_report.format_table())
    else:
        print(expand_report.summary())
        print(f"  expanded: {_sites_summary(expand_report, 'expanded')}")
        for reason, n in expand_report.skip_reasons().items():
            print(f"  skipped {n:4d}: {reason}")
        for entry in expand_report.of("untraced"):
            print(f"  untraced: {entry.name or '<model>'}: {entry.detail}")
    print(result.collapse_report.summary())
    for entry in result.collapse_report.skipped + result.collapse_report.structure_changes:
        print(f"  {entry.name}: {entry.detail}")
    p = result.params
    print(f"parameters: plain {p['plain']:,}  expanded {p['expanded']:,} "
          f"(+{100 * (p['expanded'] / p['plain'] - 1):.1f}%)  collapsed {p['collapsed']:,}")
    print(f"class kept: {'yes' if result.class_kept else 'NO'}; "
          f"training step: {'finite gradients' if result.train_step_finite else 'NON-FINITE gradients'}")
    verdict = "OK" if result.error <= result.tolerance else "FAILED"
    print(f"round trip (eval, random BN statistics): max|Δ|/max|y| = {result.error:.2e} "
          f"(tolerance {result.tolerance:.0e}) {verdict}")
    if result.strict_reload is None:
        print(f"strict reload of the collapsed state_dict into a fresh {result.name}: OK")
    elif result.structure_changed:
        print(f"strict reload: not expected ({len(result.collapse_report.structure_changes)} structure changes)")
    else:
        print(f"strict reload: FAILED: {result.strict_reload}")


def cmd_check(args: argparse.Namespace) -> int:
    from .diagnostics import check_round_trip
    from .zoo import build_model, input_size_for, model_source

    source, _ = model_source(args.model)
    torch.manual_seed(args.seed)
    probe = build_model(args.model)
    channels, height, width = input_size_for(probe, args.model)
    if args.img_size:
        height = width = args.img_size
    x = torch.randn(args.batch_size, channels, height, width)
    print(f"acfx check {args.model} ({source}, random weights, input {tuple(x.shape)})")
    result = check_round_trip(args.model, lambda: build_model(args.model), x, args.tolerance,
                              **_expand_kwargs(args))
    if result.failure:
        print(f"FAILED: {result.failure}")
        return 1
    _print_check(result, args.sites)
    return 0 if result.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acfx", description="ACNet training for any CNN: expand k×k convs into Asymmetric Convolution "
                                 "Blocks, collapse them back after training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="expand and collapse a timm/torchvision model, report sites and error",
                           description="Build MODEL with random weights, expand it, take a training step, "
                                       "randomise BN statistics, collapse it, and report the sites, parameter "
                                       "counts, the round-trip error and a strict reload into a fresh model. "
                                       "Exit code 1 if any check fails.")
    check.add_argument("model", nargs="?", default="resnet50",
                       help="timm model name, or torchvision's with a 'tv:' prefix (default: resnet50)")
    check.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    check.add_argument("--batch-size", type=int, default=2, help="batch size (default: 2)")
    check.add_argument("--tolerance", type=float, default=1e-5, help="max relative error (default: 1e-5)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    check.add_argument("--sites", action="store_true", help="print every site, not a summary")
    _expand_options(check)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `acfx` command; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        print(f"acfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
