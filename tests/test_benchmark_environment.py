"""The benchmarks' shared environment record (benchmarks/environment.py), timer (benchmarks/timing.py) and
result file names (benchmarks/outputs.py)."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import outputs  # noqa: E402

import environment  # noqa: E402
import timing  # noqa: E402

FIELDS = ("date", "command", "python", "python_implementation", "platform", "machine", "cpu", "cpu_count",
          "threads", "torch", "torchvision", "timm", "acfx", "git_commit", "git_dirty", "gpu", "cuda", "cudnn")


def test_record_has_its_fields():
    env = environment.collect(["--cpu", "--models", "a b"], "benchmarks/latency.py")
    assert tuple(f.name for f in dataclasses.fields(env)) == FIELDS
    assert env.torch == torch.__version__ and env.threads == torch.get_num_threads()
    assert env.command == "python benchmarks/latency.py --cpu --models 'a b'"
    assert (env.gpu is None) == (not torch.cuda.is_available()) and (env.cuda is None) == (env.gpu is None)
    json.dumps(env.as_dict())  # serialisable as it is


def test_record_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(environment.subprocess, "run", no_git)
    env = environment.collect([])
    assert env.git_commit is None and env.git_dirty is None
    assert "acfx" in environment.describe(env)


def test_stamped_into_json_with_the_scripts_own_settings_kept():
    env = environment.collect([], "benchmarks/train.py")
    payload = {"environment": {"img_size": 96, "threads": 1}, "rows": [{"model": "m"}]}
    stamped = json.loads(json.dumps(environment.stamp(payload, env)))
    assert list(stamped) == ["environment", "rows"] and stamped["rows"] == [{"model": "m"}]
    assert set(FIELDS) <= set(stamped["environment"]) and stamped["environment"]["img_size"] == 96
    assert stamped["environment"]["threads"] == 1  # the script's own entry wins
    assert payload == {"environment": {"img_size": 96, "threads": 1}, "rows": [{"model": "m"}]}  # not mutated
    assert list(environment.stamp({"rows": []}, env)) == ["environment", "rows"]


def test_stamped_into_markdown_under_the_title():
    env = environment.collect(["--quick"], "benchmarks/accuracy.py")
    text = environment.stamp("# Title\n\n| a | b |\n| --- | --- |\n", env)
    title, blank, line, blank2, table = text.split("\n")[:5]
    assert (title, blank, blank2, table) == ("# Title", "", "", "| a | b |")
    assert line.startswith(f"Environment: {env.date}") and f"torch {env.torch}" in line
    assert "`python benchmarks/accuracy.py --quick`" in line
    assert environment.stamp("| a |\n", env).startswith("Environment: ")
    assert "`" not in environment.caption(env)
    with pytest.raises(TypeError):
        environment.stamp(1, env)


def test_an_old_record_read_back_is_described_with_what_it_has():
    line = environment.describe({"date": "2026-11-24", "torch": "2.14", "machine": "x86_64", "threads": 2})
    assert line == "2026-11-24; torch 2.14; CPU (x86_64), 2 torch threads"


def test_timer_gives_the_base_twice_noise_floor():
    x = torch.randn(64, 64)
    timers = {"base": timing.make_timer(torch.mm, x, x, warmup=2),
              "base (again)": timing.make_timer(torch.mm, x, x, warmup=2),
              "slower": timing.make_timer(lambda a: [a @ a for _ in range(4)], x, warmup=2)}
    stats = timing.interleaved_medians(timers, rounds=5, target_ms=2)
    for s in stats.values():
        assert s["rounds"] == len(s["samples_ms"]) == 5 and s["min_ms"] <= s["median_ms"] <= s["max_ms"]
    noise = timing.noise_floor(stats, "base", "base (again)")
    assert 0 <= noise < float("inf")
    assert noise == abs(stats["base (again)"]["median_ms"] / stats["base"]["median_ms"] - 1)


def test_rounds_are_interleaved_and_repeats_fixed_on_request():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def measure(self, n):
            calls.append((self.name, n))
            return 1.0
    stats = timing.interleaved_medians({"a": Fake("a"), "b": Fake("b")}, rounds=3, repeats=2)
    assert calls == [("a", 2), ("b", 2)] * 3
    assert stats["a"]["median_ms"] == 1.0 and stats["a"]["repeats"] == 2
    with pytest.raises(ValueError):
        timing.interleaved_medians({"a": Fake("a")}, rounds=1)


def test_a_call_without_tensors_is_timed_on_the_cpu():
    count = []
    timer = timing.make_timer(lambda: count.append(1), warmup=3)
    assert len(count) == 3 and timer.measure(4) >= 0 and len(count) == 7


@pytest.mark.parametrize("stem, suffix, name", [
    ("results/accuracy_digits_frac0.25", ".json", "accuracy_digits_frac0.25.json"),  # with_suffix: frac0.json
    ("results/accuracy_digits_frac0.1", ".md", "accuracy_digits_frac0.1.md"),
    ("results/coverage_timm", ".png", "coverage_timm.png"),
])
def test_result_files_keep_a_stem_with_a_dot(stem, suffix, name):
    path = outputs.output_file(stem, suffix)
    assert path == Path("results") / name, path
