"""The one record of where and with what a benchmark ran, stamped into every result it writes.

A number means little without the versions, the machine and the code that produced it, and a results file
outlives the run. Every benchmark builds this record with :func:`collect` and puts it into its results with
:func:`stamp`: the JSON's ``"environment"`` field (the script's own settings beside it) and a line under the
title of its Markdown; a figure adds :func:`caption` to its title.

    env = collect(argv, __file__)
    payload = stamp({"environment": {"img_size": 160}, "rows": rows}, env)
    text = stamp("# Latency\\n\\n| model | ms |\\n...", env)
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

__all__ = ["Environment", "collect", "stamp", "describe", "caption", "device_label"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout the benchmarks come from


@dataclasses.dataclass(frozen=True)
class Environment:
    """Versions, machine and code of one benchmark run; every field is JSON-serialisable."""

    date: str  # ISO date the record was made
    command: str  # the command line, as one could type it again ("python benchmarks/x.py --cpu")
    python: str  # platform.python_version()
    python_implementation: str  # CPython, PyPy, ...
    platform: str  # OS and kernel: platform.platform()
    machine: str  # x86_64, aarch64, ...
    cpu: str  # the processor's model name where the OS says it, else platform.processor()
    cpu_count: Optional[int]  # logical cores of the machine (os.cpu_count())
    threads: int  # torch intra-op threads when the record was made
    torch: str
    torchvision: Optional[str]  # None: not installed
    timm: Optional[str]
    acfx: Optional[str]  # acfx.__version__; the code itself is named by git_commit
    git_commit: Optional[str]  # HEAD of the checkout acfx was imported from (else the benchmarks'); None: no git
    git_dirty: Optional[bool]  # uncommitted changes (untracked files included) in that checkout
    gpu: Optional[str]  # name of the current CUDA device; None: no GPU
    cuda: Optional[str]  # torch.version.cuda, with a GPU only
    cudnn: Optional[int]  # torch.backends.cudnn.version(), with a GPU only

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def collect(argv: Optional[Sequence[str]] = None, script: Optional[str] = None) -> Environment:
    """The record for this process, now.

    ``argv`` is the script's arguments when its ``main(argv)`` was called with them (default: ``sys.argv[1:]``);
    ``script`` its file (default: ``sys.argv[0]``), shown relative to the checkout.
    """
    import torch
    gpu = torch.cuda.is_available()
    checkout = _acfx_checkout()
    return Environment(
        date=date.today().isoformat(), command=_command(argv, script), python=platform.python_version(),
        python_implementation=platform.python_implementation(), platform=platform.platform(),
        machine=platform.machine(), cpu=_cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        torch=torch.__version__, torchvision=_version("torchvision"), timm=_version("timm"), acfx=_version("acfx"),
        git_commit=_git(checkout, "rev-parse", "HEAD"), git_dirty=_dirty(checkout),
        gpu=torch.cuda.get_device_name() if gpu else None, cuda=torch.version.cuda if gpu else None,
        cudnn=torch.backends.cudnn.version() if gpu else None)


def stamp(result: Union[dict, str], environment: Union[Environment, Mapping]) -> Union[dict, str]:
    """``result`` with the record in it; a new object, the argument is left as it was.

    A dict (a JSON payload) gets the record as its first field, ``"environment"``, with the entries the
    script already put there after it: those are its own settings (image size, rounds, ...) and win on a
    clash. A str (Markdown) gets :func:`describe` as a line under its title. ``environment`` may also be a
    mapping read back from a results file, so that a re-rendered table says what produced the numbers.
    """
    record = environment.as_dict() if isinstance(environment, Environment) else dict(environment)
    if isinstance(result, dict):
        own = result.get("environment") or {}
        return {"environment": {**record, **own}, **{k: v for k, v in result.items() if k != "environment"}}
    if isinstance(result, str):
        line = f"Environment: {describe(record)}."
        title, _, body = result.partition("\n")
        if title.startswith("# "):
            return f"{title}\n\n{line}\n\n{body.lstrip()}"
        return f"{line}\n\n{result}"
    raise TypeError(f"stamp() takes a JSON payload (dict) or Markdown (str), not {type(result).__name__}")


def describe(environment: Union[Environment, Mapping], command: bool = True) -> str:
    """One line; fields a record lacks (results written before it had them) are left out."""
    env = environment.as_dict() if isinstance(environment, Environment) else environment
    parts = [env.get("date"), _code(env), ", ".join(f"{k} {env[k]}" for k in ("torch", "torchvision", "timm")
                                                    if env.get(k)),
             _joined("Python", env.get("python_implementation"), env.get("python")), env.get("platform"),
             _cpu(env), env.get("gpu") and f"{env['gpu']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}",
             command and env.get("command") and f"`{env['command']}`"]
    return "; ".join(str(p) for p in parts if p)


def _code(env: Mapping) -> Optional[str]:
    if not (env.get("acfx") or env.get("git_commit")):
        return None
    text = f"acfx {env.get('acfx') or '?'}"
    if env.get("git_commit"):
        text += f" at {str(env['git_commit'])[:12]}{' (uncommitted changes)' if env.get('git_dirty') else ''}"
    return text


def _cpu(env: Mapping) -> Optional[str]:
    name = _joined("CPU", env.get("cpu"), env.get("machine") and f"({env['machine']})")
    counts = [f"{env[k]} {label}" for k, label in (("cpu_count", "cores"), ("threads", "torch threads")) if env.get(k)]
    return ", ".join([name or "CPU", *counts]) if name or counts else None


def _joined(label: str, *values) -> Optional[str]:
    present = [str(v) for v in values if v]
    return " ".join([label, *present]) if present else None


def caption(environment: Union[Environment, Mapping], width: int = 160) -> str:
    """:func:`describe` without the command, wrapped to ``width`` characters: the last lines of a figure's title."""
    return textwrap.fill(describe(environment, command=False), width)


def device_label(device: str, environment: Environment) -> str:
    """What a run's device is called in its tables: the GPU's name, or "CPU (machine, N threads)"."""
    if str(device).startswith("cuda"):
        return environment.gpu or str(device)
    return f"CPU ({environment.machine}, {environment.threads} threads)"


def _command(argv: Optional[Sequence[str]], script: Optional[str]) -> str:
    arguments = list(sys.argv[1:] if argv is None else argv)
    path = script or (sys.argv[0] if sys.argv and sys.argv[0] else "python")
    try:
        path = str(Path(path).resolve().relative_to(ROOT))
    except ValueError:  # outside the checkout: as given
        pass
    return shlex.join(["python", path, *arguments])


def _version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def _acfx_checkout() -> Optional[Path]:
    """The checkout the numbers' code is in: the one whose top holds the acfx package imported (None: acfx was
    installed, e.g. in site-packages), else the benchmarks' own."""
    try:
        import acfx
    except ImportError:
        return ROOT
    top = Path(acfx.__file__).resolve().parents[1]
    found = _git(top, "rev-parse", "--show-toplevel")
    return top if found is not None and Path(found).resolve() == top else None


def _git(cwd: Optional[Path], *args: str) -> Optional[str]:
    """Output of ``git args`` in ``cwd``; None when git is missing or ``cwd`` is in no checkout (or None)."""
    if cwd is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _dirty(cwd: Optional[Path]) -> Optional[bool]:
    status = _git(cwd, "status", "--porcelain")
    return None if status is None else bool(status)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
