"""Which convs expand finds in every zoo model, on the meta device: a regression check for matching changes.

    python benchmarks/zoo_sites.py --out before.json        # on one commit
    python benchmarks/zoo_sites.py --out after.json         # on another
    python benchmarks/zoo_sites.py --compare before.json after.json

Every timm architecture with a conv→BN pair (acfx/timm_archs.txt), torchvision's classification models and
its detection and segmentation models are built on the meta device (no weights, no downloads) and
expanded in train and in eval mode; the expanded site names and each skip reason are recorded, beside the
run's "environment" (benchmarks/environment.py). About 15 minutes on one core. --compare lists the models whose
sites differ and why the lost ones were skipped.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import collect, stamp  # noqa: E402

ENVIRONMENT = "environment"  # the one key of a recorded file that is not a model

_DETECTION_AND_SEGMENTATION = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn",
                               "keypointrcnn_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
                               "deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large")


def _names():
    import torchvision
    archs = Path(__file__).resolve().parent.parent / "acfx" / "timm_archs.txt"
    timm_names = [line.strip() for line in archs.read_text().splitlines() if line.strip() and not line.startswith("#")]
    tv = torchvision.models.list_models(module=torchvision.models) + list(_DETECTION_AND_SEGMENTATION)
    return timm_names + [f"tv:{name}" for name in tv]


def record(out: str, pattern: str = "*") -> None:
    import torch

    import acfx
    from acfx.tools.zoo import build_model
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sites, start = {}, time.perf_counter()
    names = [n for n in _names() if fnmatch.fnmatch(n, pattern)]
    for i, name in enumerate(names):
        try:
            with torch.device("meta"):
                model = build_model(name)
            for mode in ("train", "eval"):
                model.train(mode == "train")
                _, report = acfx.expand(model, return_report=True)
                sites[f"{name}|{mode}"] = {"expanded": sorted(e.name for e in report.of("expanded")),
                                           "skipped": {e.name: e.detail for e in report.of("skipped")}}
        except Exception as error:  # a model that cannot be built on the meta device: recorded as such
            sites[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        if i % 100 == 0:
            print(f"{i}/{len(names)} {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(out).write_text(json.dumps(stamp(sites, collect(script=__file__))))
    total = sum(len(v.get("expanded", ())) for v in sites.values())
    print(f"{len(names)} models, {total} sites (train and eval mode counted apart): {out}")


def compare(before: str, after: str) -> int:
    old, new = ({k: v for k, v in json.loads(Path(path).read_text()).items() if k != ENVIRONMENT}
                for path in (before, after))
    lost_reasons = collections.Counter()
    changed = 0
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, {}), new.get(key, {})
        lost = set(a.get("expanded", ())) - set(b.get("expanded", ()))
        gained = set(b.get("expanded", ())) - set(a.get("expanded", ()))
        if lost or gained or a.get("error") != b.get("error"):
            changed += 1
            print(f"{key}: {len(lost)} lost, {len(gained)} gained {b.get('error', '')}")
            lost_reasons.update(b.get("skipped", {}).get(site, "?")[:160] for site in lost)
    for reason, count in lost_reasons.most_common():
        print(f"  lost {count:5d}: {reason}")
    totals = [sum(len(v.get("expanded", ())) for v in d.values()) for d in (old, new)]
    print(f"{changed} of {len(set(old) | set(new))} entries differ; sites {totals[0]} → {totals[1]}")
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="record the sites of every zoo model to this JSON file")
    parser.add_argument("--filter", default="*", help="glob on model names (default: all)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two recorded files")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE or --compare BEFORE AFTER")
    record(args.out, args.filter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
