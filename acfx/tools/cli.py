"""The `acfx` command line: check, expand, collapse and kernels."""
from __future__ import annotations

import argparse
import ast
import collections
import math
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["main"]


def _expand_options(parser: argparse.ArgumentParser, for_checkpoint: bool = True) -> None:
    """The expand options that change a model's modules and tensors, from ExpandOptions' fields."""
    from ..passes.options import ExpandOptions
    group = parser.add_argument_group(
        "expand options (must match those the checkpoint was trained with; left at their defaults, they are "
        "taken from a train.py checkpoint's acb_ keywords, and --mode from the checkpoint's keys)"
        if for_checkpoint else "expand options")
    for field in ExpandOptions.fields(structural=True):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"]
        if field.type in (bool, "bool"):
            group.add_argument(flag, action="store_true", help=help_text)
        elif ExpandOptions.choices(field.name):
            default = f" (default: {field.default})" if field.default is not None else ""
            group.add_argument(flag, choices=ExpandOptions.choices(field.name), default=field.default,
                               help=help_text + default)
        else:
            group.add_argument(flag, type=ExpandOptions.value_type(field.name), default=field.default, help=help_text)


def _expand_kwargs(args: argparse.Namespace, recorded: Optional[dict] = None) -> dict:
    """The expand options of the command line; where a flag is left at its default, the value a timm
    train.py checkpoint records as an ``acb_<option>`` model keyword (``recorded``, prefix removed)."""
    from ..passes.options import ExpandOptions
    options = {}
    for field in ExpandOptions.fields(structural=True):
        value = getattr(args, field.name)
        if recorded and field.name in recorded and value == field.default:
            value = recorded[field.name]
        options[field.name] = value
    try:  # checked here, where a wrong value is the user's (a flag or a checkpoint's acb_ keyword)
        ExpandOptions.resolve(None, options)
    except TypeError as error:
        raise ValueError(str(error)) from error
    return options


def _sites_summary(report, action: str) -> str:
    kinds = collections.Counter(e.what for e in report.of(action))
    return ", ".join(f"{n}× {what}" for what, n in kinds.most_common()) or "none"


def _print_check(result, show_sites: bool) -> None:
    from ..passes.report import Report
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
    print(f"round trip (eval, random BN statistics): max|Δ|/max|y| = {result.error:.2e}; "
          f"worst fused layer on its block's input: {result.local_error:.2e} (tolerance {result.tolerance:.0e})")
    if result.error_f64 is not None:
        print(f"  over the tolerance end to end, so measured in float64 too: round trip {result.error_f64:.2e}; "
              f"the float32 expanded and collapsed models are {result.noise_f32:.2e} and "
              f"{result.collapsed_noise_f32 or 0.0:.2e} from their float64 results (float32 noise floors)")
    print(f"exact: {'OK' if result.exact else 'FAILED'}")
    if result.strict_reload is None:
        print(f"strict reload of the collapsed state_dict into a fresh {result.name}: OK")
    elif result.structure_changed:
        print(f"strict reload: not expected ({len(result.collapse_report.structure_changes)} structure changes)")
    else:
        print(f"strict reload: FAILED: {result.strict_reload}")


def cmd_check(args: argparse.Namespace) -> int:
    from .diagnostics import check_round_trip
    from .zoo import build_model, input_size_for, is_detection, model_source, unsupported_task

    if args.model.startswith("acb_"):  # the plug-in's name for the expanded model: check its base
        args.model = args.model[len("acb_"):]
    source, _ = model_source(args.model)
    task = unsupported_task(args.model)
    if task:
        raise ValueError(f"{args.model} is a {task} model: `acfx check` runs image models that take (N, C, H, W) "
                         "inputs; expand it in Python and compare its outputs yourself")
    if is_detection(args.model):
        raise ValueError(f"{args.model} is a detection model: its forward needs targets in train mode and returns "
                         "detections, so `acfx check` (classification and segmentation models) cannot run it; "
                         "expand it in Python as the README's 'Detection and segmentation' section shows")
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


def _model_name(args: argparse.Namespace, container) -> str:
    """--model, or the 'arch' a timm train.py checkpoint records (without the acb_ prefix)."""
    name = args.model or container.arch
    if not name:
        raise ValueError(f"{args.checkpoint} ({container.layout}) does not record its architecture (only timm "
                         "train.py checkpoints do, as 'arch'): pass --model NAME")
    return name[len("acb_"):] if name.startswith("acb_") else name


def _parse_kwargs(items: List[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-kwargs takes KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _model_kwargs(args: argparse.Namespace, container) -> Tuple[dict, dict]:
    """--model-kwargs over the model arguments a train.py checkpoint records (bn_eps, ...), and apart from
    them the acb_ plug-in keywords it records (expand options, prefix removed; acb_impl only chose a
    training forward and changes no weight)."""
    recorded = {k: v for k, v in container.model_kwargs.items() if not k.startswith("acb_")}
    acb = {k[len("acb_"):]: v for k, v in container.model_kwargs.items() if k.startswith("acb_") and k != "acb_impl"}
    if recorded:
        print(f"model arguments recorded in the checkpoint: {recorded}")
    if acb:
        print(f"expand options recorded in the checkpoint (acb_ keywords): {acb}")
    given = _parse_kwargs(args.model_kwargs)
    if "num_classes" in given:  # the builder gets it once, from --num-classes or from here
        classes = given.pop("num_classes")
        args.num_classes = classes if args.num_classes is None else args.num_classes
    acb.update({k[len("acb_"):]: given.pop(k) for k in list(given) if k.startswith("acb_")})
    acb.pop("impl", None)
    return {**recorded, **given}, acb


def _print_read(checkpoint) -> None:
    """Where the weights were found, and the other copies of them the file holds."""
    print(f"read {checkpoint.describe()}")
    for other in checkpoint.selection.others:
        print(f"  also in the file: {other.describe()} (choose it with {other.options}"
              + (" or --use-ema)" if other.averaged else ")"))


def _read(args: argparse.Namespace):
    """The checkpoint, read once, with its model name, model arguments and recorded expand options; the
    model's weights found in it by the keys of the plain model."""
    from .checkpoint import expanded_mode, read_checkpoint
    from .checkpoint_files import read_container
    from .zoo import build_model
    container = read_container(args.checkpoint)
    name = _model_name(args, container)
    kwargs, acb = _model_kwargs(args, container)
    classes = {} if args.num_classes is None else {"num_classes": args.num_classes}
    checkpoint = read_checkpoint(container, args.use_ema, model=build_model(name, **classes, **kwargs),
                                 checkpoint_key=args.checkpoint_key, prefix=args.prefix)
    mode = expanded_mode(checkpoint.state)
    if mode and "mode" not in acb:
        acb["mode"] = mode  # what the keys show; --mode given explicitly still wins
    return checkpoint, name, kwargs, acb


def _print_conversion(result, verb: str) -> None:
    print(result.report.summary())
    for reason, n in result.report.skip_reasons().items():
        print(f"  skipped {n:4d}: {reason}")
    print(f"{verb} model vs source model on a random input: max|Δ|/max|y| = {result.error:.2e} "
          f"(tolerance {result.tolerance:.0e})")
    if result.float64 is not None:
        check = result.float64
        print(f"  over the tolerance, so repeated in float64: {check.error_f64:.2e}; the float32 source and {verb} "
              f"models are {check.noise_f32:.2e} and {check.converted_noise_f32:.2e} from their float64 results "
              "(float32 noise floors)")
    if result.written:
        print(f"wrote {result.output}")
        if result.dropped:
            print("  the container as it was, but:")
        for entry in result.dropped:
            replacement = "removed" if entry.replacement == "removed" else f"now {entry.replacement}"
            print(f"  {entry.where}: {replacement} ({entry.reason})")
    else:
        print(f"NOT written: the {verb.split()[0]} model does not match the source beyond float rounding",
              file=sys.stderr)


def _output_directory(checkpoint: str, output: Optional[str], suffix: str, force: bool) -> str:
    """Where --keep-container writes a checkpoint directory: ``output``, or ``<directory>-<suffix>`` beside the
    input; checked before any work, never the input, an existing directory only with --force."""
    import os
    source = Path(checkpoint)
    path = Path(output) if output else source.with_name(f"{source.name}-{suffix}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {str(path)!r} is a file; --keep-container writes a checkpoint directory: choose "
                         "a directory name with -o")
    if path.exists() and path.resolve() == source.resolve():
        raise ValueError(f"output {str(path)!r} is the input checkpoint directory; choose another -o")
    if path.exists() and not force:
        raise ValueError(f"output {str(path)!r} exists; pass --force to replace it, or choose another -o")
    parent = next((p for p in path.absolute().parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(path)!r} cannot be written: {str(parent)!r} is not a writable directory")
    return str(path)


def _conversion_output(args: argparse.Namespace, suffix: str) -> str:
    """The output path, checked before any work: a plain state_dict (.pth, or -o), or with --keep-container
    a file of the input's kind (its extension kept: .ckpt, .pth.tar, .safetensors) or a directory."""
    from .outputs import default_output, output_path
    if not args.keep_container:
        return output_path(args.checkpoint, args.output, suffix, args.force)
    if Path(args.checkpoint).is_dir():
        return _output_directory(args.checkpoint, args.output, suffix, args.force)
    name = Path(args.checkpoint).name
    stem = Path(default_output(args.checkpoint, "", "")).name[:-1]  # the name without the extension it drops
    extension = name[len(stem):] or ".pth"
    return output_path(args.checkpoint, args.output or default_output(args.checkpoint, suffix, extension), suffix,
                       args.force)


def cmd_collapse(args: argparse.Namespace) -> int:
    from .convert import collapse_checkpoint
    output = _conversion_output(args, "collapsed")  # before any work
    checkpoint, name, kwargs, acb = _read(args)
    _print_read(checkpoint)
    if acb.get("mode") and not any(k.endswith(".layout") for k in checkpoint.state):
        print("warning: this checkpoint records no block layouts (written before acfx 0.2.0), so the expand "
              "options cannot be checked against it: pass exactly those of training (--placement, --branches, "
              "--norm, --include-unnormed, --mode)", file=sys.stderr)
    result = collapse_checkpoint(checkpoint, name, output, num_classes=args.num_classes, fold_bn=args.fold_bn,
                                 model_kwargs=kwargs, tolerance=args.tolerance, keep_container=args.keep_container,
                                 **_expand_kwargs(args, acb))
    _print_conversion(result, "collapsed")
    if result.written and not args.keep_container and (result.own_blocks or not args.fold_bn):
        print(_load_line(name, kwargs, result, output))
    if result.written and args.export:
        return _export(result, args.export)
    return 0 if result.written else 1


def _export(result, path: str) -> int:
    """The checked collapsed model as a torch.export program: runs without acfx, the model's code or timm."""
    import torch
    try:
        program = torch.export.export(result.converted.eval(), (result.probe,))
    except Exception as error:  # the model's own code may not export; the checkpoint is written all the same
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"NOT exported: torch.export of the collapsed {result.model} failed ({type(error).__name__}: "
              f"{first}); the checkpoint above is written", file=sys.stderr)
        return 1
    torch.export.save(program, path)
    print(f"exported {path} (torch.export, input {tuple(result.probe.shape)}; load it with torch.export.load)")
    return 0


def _load_line(name: str, kwargs: dict, result, output: str) -> str:
    """How to load the written plain checkpoint without acfx, or why it does not load into the plain model."""
    from .zoo import model_source
    if result.own_blocks:
        return (f"its blocks are the deploy forms acfx.collapse builds, so load it into one: "
                f"acfx.collapse(<{name} as built>.eval()).load_state_dict(torch.load({output!r})), or write a "
                "program that needs neither acfx nor the model's code with --export PROGRAM.pt2")
    changed = result.report.structure_changes
    if changed:
        return (f"note: {len(changed)} conv(s) gained a bias in the collapse (include_unnormed: no BN after them to "
                "hold the shift), so the file does not load strictly into the plain architecture; load it with "
                "strict=False and check, or collapse in Python and keep the module objects")
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items() if k != "bn_momentum")
    classes = f", num_classes={result.num_classes}" if result.num_classes is not None else ""
    source, bare = model_source(name)
    if source == "torchvision":
        return (f"load it without acfx: torchvision.models.get_model({bare!r}{classes}{extra})"
                f".load_state_dict(torch.load({output!r}))")
    return f"load it without acfx: timm.create_model({name!r}{classes}{extra}, checkpoint_path={output!r})"


def cmd_expand(args: argparse.Namespace) -> int:
    from .convert import expand_checkpoint
    output = _conversion_output(args, "acb")  # before any work
    checkpoint, name, kwargs, acb = _read(args)
    _print_read(checkpoint)
    result = expand_checkpoint(checkpoint, name, output, num_classes=args.num_classes, model_kwargs=kwargs,
                               tolerance=args.tolerance, keep_container=args.keep_container,
                               **_expand_kwargs(args, acb))
    _print_conversion(result, "expanded (init='preserve')")
    return 0 if result.written else 1


def cmd_kernels(args: argparse.Namespace) -> int:
    from ..passes.expand import expand
    from .checkpoint import expanded_mode, load_into_expanded, load_state_dict_strict
    from .convert import build_matching
    from .kernels import format_grid, kernel_magnitude, save_heatmap
    from .outputs import output_path

    output = output_path(args.checkpoint, args.output, "kernels", args.force, extension=".png")  # before any work
    checkpoint, name, kwargs, acb = _read(args)
    state = checkpoint.state
    model = build_matching(name, state, args.num_classes, **kwargs)
    expanded = expanded_mode(state) is not None
    if expanded:
        model, report = expand(model, inplace=True, return_report=True, **_expand_kwargs(args, acb))
        load_into_expanded(model, report, state, checkpoint.source)
    else:
        load_state_dict_strict(model, state, checkpoint.source)
    size = (args.kernel_size, args.kernel_size) if args.kernel_size else None
    matrix, layers = kernel_magnitude(model.eval(), size)
    kind = "expanded (ACNet), fused" if expanded else "plain, BN folded"
    print(f"average kernel magnitude, {name} ({kind}), {layers} layers of {matrix.shape[0]}x{matrix.shape[1]}:")
    print(format_grid(matrix))
    save_heatmap(matrix, output, f"{name} ({kind}), {layers} layers")
    print(f"wrote {output}")
    _print_read(checkpoint)
    return 0


def _positive_int(text: str) -> int:
    """A size or count: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    """A --tolerance: a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _checkpoint_args(parser: argparse.ArgumentParser, output_help: str) -> None:
    parser.add_argument("checkpoint",
                        help="a checkpoint file (.pth, .pth.tar, .ckpt, .bin, .safetensors; read with "
                             "weights_only=True) or a sharded checkpoint directory (model.safetensors.index.json "
                             "or pytorch_model.bin.index.json and its shards): a plain state_dict, or the dict of "
                             "timm's train.py, torchvision's reference scripts, PyTorch Lightning or PyTorch's "
                             "tutorial; the weights are found in it by the model's keys, under any key path and "
                             "prefix (model., module., _orig_mod.)")
    parser.add_argument("--model", default=None,
                        help="timm model name, or torchvision's with 'tv:' (default: the checkpoint's 'arch')")
    parser.add_argument("-o", "--output", default=None, help=output_help)
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output (never the input checkpoint unless -o names it, never "
                             "an input directory)")
    parser.add_argument("--use-ema", action="store_true",
                        help="use the averaged (EMA) weights: timm's state_dict_ema, torchvision's model_ema, "
                             "Lightning's weight averaging, or a key or prefix naming an EMA (default: the "
                             "non-EMA weights)")
    parser.add_argument("--checkpoint-key", default=None, metavar="KEY",
                        help="where the weights are, when the file holds several matching sets: the key path "
                             "listed by the refusal (keys joined by '/', e.g. state_dict, state_dict_ema; '' for "
                             "the top level); it also chooses between EMA and non-EMA weights")
    parser.add_argument("--prefix", default=None, metavar="PREFIX",
                        help="the prefix of the weights' keys to strip, when several match (e.g. model., "
                             "module.; '' for none); by default the one that makes the keys the model's")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the model (default: read off the checkpoint's classifier)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model builder arguments, as in train.py (e.g. bn_eps=1e-3); those a train.py "
                             "checkpoint records (bn_eps, bn_momentum, model_kwargs) are used by default")


def _conversion_args(parser: argparse.ArgumentParser, output_help: str) -> None:
    _checkpoint_args(parser, output_help)
    parser.add_argument("--keep-container", action="store_true",
                        help="write the input's container with the converted weights in place of the old ones "
                             "(same key, same prefix) so that its framework loads or resumes from it: the same "
                             "dict (Lightning, train.py, torchvision, tutorial), a safetensors file with its "
                             "metadata, or for a sharded directory a directory of as many shards with the same "
                             "names and an index. Optimizer and LR scheduler states and other copies of the "
                             "weights (EMA) would be wrong for the converted model: they are dropped (emptied "
                             "where the framework reads the key back: Lightning's optimizer_states and "
                             "lr_schedulers become []) and listed. Default: a plain state_dict")
    parser.add_argument("--tolerance", type=_tolerance, default=1e-5,
                        help="max relative error of the converted model vs the source (default: 1e-5); "
                             "over it, the conversion is repeated in float64, and nothing is written "
                             "unless that shows float32 rounding")
    _expand_options(parser)


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
    check.add_argument("--img-size", type=_positive_int, default=None, help="input size (default: the model's)")
    check.add_argument("--batch-size", type=_positive_int, default=2, help="batch size (default: 2)")
    check.add_argument("--tolerance", type=_tolerance, default=1e-5,
                       help="max relative error, a positive number (default: 1e-5)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    check.add_argument("--sites", action="store_true", help="print every site, not a summary")
    _expand_options(check, for_checkpoint=False)
    check.set_defaults(func=cmd_check)

    col = sub.add_parser("collapse", help="expanded (ACNet) training checkpoint → checkpoint of the plain model; "
                                          "a model's own rep blocks (RepVGG, MobileOne, ...) → their deploy form",
                         description="Load a checkpoint of acfx.expand(MODEL), collapse it, check the result "
                                     "against the expanded model, and write a plain state_dict that "
                                     "timm.create_model(MODEL, checkpoint_path=OUT) loads strictly without acfx "
                                     "(or, with --keep-container, the input's container with the collapsed "
                                     "weights in it). A checkpoint of MODEL itself, when MODEL has "
                                     "re-parameterisable blocks of its own (timm's repvgg, mobileone, fastvit, "
                                     "repghostnet, ...), gives their deploy form the same way, checked against "
                                     "the trained model; --export also writes it as a torch.export program. "
                                     "The weights are found in the checkpoint by the keys of "
                                     "MODEL; several equally matching sets are refused, listed, for "
                                     "--checkpoint-key / --prefix to choose. Nothing is written if the checkpoint "
                                     "does not match.")
    _conversion_args(col, "output .pth or .safetensors (default: <checkpoint>-collapsed.pth); with "
                          "--keep-container a file in the input's format (default: its extension kept, "
                          "last-collapsed.ckpt) or a directory for a directory (default: <directory>-collapsed)")
    col.add_argument("--fold-bn", action="store_true", help="also fold every BN into its conv (deploy form; "
                                                             "no longer loads into the plain architecture)")
    col.add_argument("--export", metavar="PROGRAM.pt2", default=None,
                     help="also write the checked collapsed model as a torch.export program (torch.export.load "
                          "runs it without acfx or the model's code), traced on the check's input shape")
    col.set_defaults(func=cmd_collapse)

    exp = sub.add_parser("expand", help="plain checkpoint → ACNet checkpoint (function-preserving init)",
                         description="Load a plain checkpoint of MODEL, expand it with init='preserve' (the new "
                                     "branches start at zero, the function is unchanged) and write the expanded "
                                     "state_dict, for a fine-tuning run (e.g. train.py --model acb_MODEL "
                                     "--initial-checkpoint OUT), or with --keep-container the input's container "
                                     "with the expanded weights in it. The weights are found as by collapse.")
    _conversion_args(exp, "output .pth or .safetensors (default: <checkpoint>-acb.pth); with --keep-container "
                          "a file in the input's format (default: its extension kept) or a directory for a "
                          "directory (default: <directory>-acb)")
    exp.set_defaults(func=cmd_expand)

    ker = sub.add_parser("kernels", help="average kernel magnitude matrix (ACNet Sect. 4.4) as a grid and a PNG",
                         description="Per k×k layer, sum |kernel| (after BN folding; an expanded model is fused "
                                     "first) over filters and input channels, normalise by its maximum, average "
                                     "over layers: ACNet strengthens the skeleton (centre row and column).")
    _checkpoint_args(ker, "heatmap PNG (default: <checkpoint>-kernels.png)")
    ker.add_argument("--kernel-size", type=int, default=None,
                     help="which k×k layers (default: the most common kernel size)")
    _expand_options(ker)
    ker.set_defaults(func=cmd_kernels)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `acfx` command; returns the exit code (2 for bad input, which the commands raise as
    ValueError or OSError, or a missing optional dependency; other exceptions are bugs and propagate with
    their traceback)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # the user's input: a checkpoint, a path, a model or its arguments;
        print(f"acfx {args.command}: error: {error}", file=sys.stderr)  # anything else is acfx's bug: traceback
        return 2
    except ImportError as error:  # an optional dependency (matplotlib for the heat map) that is not installed
        print(f"acfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
