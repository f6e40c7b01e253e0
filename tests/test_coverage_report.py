"""The coverage tables (benchmarks/coverage_report.py): what a deploy-form run's markdown says."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import coverage_report  # noqa: E402
import environment  # noqa: E402


def _payload(rows):
    env = environment.collect(["--check", "deploy"], "benchmarks/coverage.py")
    args = {"source": "timm", "check": "deploy", "img_size": 96, "batch_size": 2, "every": 1}
    return environment.stamp({"environment": {"device": "cpu"}, "args": args, "models_listed": 4,
                              "with_conv_bn_pair": 3, "results": rows}, env)


def test_a_deploy_run_counts_what_was_fused_and_lists_what_does_not_pass():
    passing = dict(status="pass", error=2e-7, collapsed=3, folded=10, skipped={"the sum adds x (a.b)": 2},
                   convs={"plain": 19, "deployed": 13}, norms_left=1, seconds=1.5)
    rows = {"a": passing, "b": {**passing, "collapsed": 0, "folded": 5, "norms_left": 0, "skipped": {}},
            "c": dict(status="fail", error=3e-2, noise_f32=1e-7, error_f64=2e-2, collapsed=1, folded=1,
                      convs={"plain": 3, "deployed": 2}, norms_left=0, seconds=0.5),
            "d": dict(status="not run", failure=coverage_report.NOT_SAMPLED)}
    text = coverage_report.write_markdown(_payload(rows))
    assert "deploy form (collapse with fold_bn=True" in text
    assert ("15 conv→BN pairs folded; 3 blocks of the models' own fused, in 1 models; 1 models keep a BN" in text), text
    assert "| 2 | the sum adds x … |" in text, text  # skip reasons grouped over the passing models
    assert "| c | fail | deploy-form error 3.0e-02 (float32 noise floor 1.0e-07, float64 2.0e-02) |" in text, text
    assert "| a | pass | 3 | 10 | 2 | 19 → 13 | 1 | 2.0e-07 |" in text, text
    assert "| d |" not in text  # a model of a sampled run not run yet is counted, not listed
