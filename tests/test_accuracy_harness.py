"""The accuracy harness (benchmarks/accuracy.py): its collapse / fold_bn / int8 path on a 1-epoch run, the
identical-predictions assertion, QAT on a collapsed model, and the pieces its statistics rest on."""
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import acfx  # noqa: E402

import accuracy  # noqa: E402
import accuracy_int8 as int8  # noqa: E402
import accuracy_report as report  # noqa: E402

CPU = torch.device("cpu")
TINY = accuracy.Recipe(epochs=1, qat_epochs=1, calibration_images=128)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests train small models: one torch thread is nearly as fast as two on tiny convs, and it does not
    slow down tenfold when another process holds a core (two OpenMP threads spin on one core then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return accuracy.load_digits(16)


@pytest.fixture(scope="module")
def one_epoch_rows(digits):
    """base and acnet, ResNet-8, one epoch, one seed: the whole measurement path, no progress bars."""
    return accuracy.run(digits, "cifar_resnet8", ["base", "acnet"], [0], TINY, CPU, progress=False)


def test_digits_split_is_scikit_learns_example_split(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    raw = load_digits()
    _, _, y_train, y_test = train_test_split(raw.images, raw.target, test_size=0.5, shuffle=False)
    assert (len(digits.train), len(digits.test)) == (898, 899)
    assert torch.equal(digits.train.labels, torch.tensor(y_train))
    assert torch.equal(digits.test.labels, torch.tensor(y_test))
    assert digits.train.images.shape[1:] == (1, 16, 16)
    assert 0 <= digits.train.images.min() and digits.train.images.max() <= 1


def test_one_epoch_run_collapse_fold_bn_and_int8(one_epoch_rows):
    rows = {row.variant: row for row in one_epoch_rows}
    assert set(rows) == {"base", "acnet"}
    for row in rows.values():
        # identical predictions (asserted in the harness) give identical accuracies
        assert row.top1 == row.top1_collapsed == row.top1_fold_bn, (row.top1, row.top1_collapsed, row.top1_fold_bn)
        assert row.parity["max_logit_diff_collapsed"] < 1e-4, row.parity
        assert row.parity["max_logit_diff_fold_bn"] < 1e-4, row.parity
        for key, value in dataclasses.asdict(row).items():
            if key.startswith("top1"):
                assert value is not None and 0.0 <= value <= 1.0, (key, value)
        # every conv of ResNet-8 (7 3×3, 2 1×1 shortcuts) and the fc ran as an int8 module
        assert row.int8_modules == 10, row.int8_modules
        assert row.params_deployed == rows["base"].params_deployed
        assert len(row.curve) == 1 and row.curve[0]["epoch"] == 1
    assert rows["acnet"].params_trained > rows["acnet"].params_deployed


def test_worker_processes_give_the_rows_of_a_sequential_run(digits):
    """Tasks rebuild everything from the seed: a spawned one-thread worker trains the same model as this process."""
    recipe = dataclasses.replace(TINY, qat_epochs=0, calibration_images=64)
    assert torch.get_num_threads() == 1  # (the module's fixture) as in the one-thread workers
    [here] = accuracy.run(digits, "cifar_resnet8", ["acnet"], [1], recipe, CPU, progress=False)
    [there] = accuracy.run(digits, "cifar_resnet8", ["acnet"], [1], recipe, CPU, progress=False, workers=2)
    assert here.curve == there.curve, (here.curve, there.curve)
    assert (here.top1, here.top1_int8, here.skeleton_ratio) == (there.top1, there.top1_int8, there.skeleton_ratio)


def test_payload_markdown_plot(one_epoch_rows, tmp_path):
    env = {"variants": ["base", "acnet"], "seeds": [0], "recipe": dataclasses.asdict(TINY), "data": "digits",
           "data_about": "test", "model": "cifar_resnet8", "int8_api": "fx", "int8_engine": int8.backend(),
           "cpu": "cpu", "device": "cpu", "threads": 1, "torch": torch.__version__, "timm": "x", "date": "today",
           "wall_seconds": 1.0}
    pl = report.payload(env, one_epoch_rows, {name: v.about for name, v in accuracy.VARIANTS.items()})
    text = json.dumps(pl)  # JSON-serialisable, with the interface
    row = json.loads(text)["rows"][0]
    for key in ("variant", "seed", "top1", "top1_collapsed", "top1_fold_bn", "top1_int8", "top1_rot90",
                "top1_rot180", "top1_flipud", "skeleton_ratio"):
        assert key in row, key
    assert pl["paired_vs_base"]["acnet"]["top1"]["n"] == 1
    assert "| acnet |" in report.markdown(pl)
    report.plot(pl, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_identical_predictions_pass_and_count_near_ties():
    gap = 2.0 ** -20  # binary fractions: no rounding in the test itself
    trained = torch.tensor([[2.0, 1.0, 0.0], [gap, 0.0, -1.0]])
    nudged = trained.clone()
    nudged[1, 1] += 0.75 * gap  # image 1 keeps its class, but its gap is within twice the difference: a near-tie
    parity = accuracy.assert_identical_predictions({"trained": trained, "collapsed": nudged, "fold_bn": trained})
    assert parity.near_ties == 1, parity
    assert parity.max_logit_diff_collapsed == 0.75 * gap and parity.max_logit_diff_fold_bn == 0.0, parity
    assert parity.min_margin == gap, parity


def test_identical_predictions_fail_with_indices_and_margins():
    trained = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 1.9]])
    flipped = trained.clone()
    flipped[2] = torch.tensor([1.9, 2.0])
    with pytest.raises(accuracy.PredictionMismatch, match=r"fold_bn .* 1 of 3 images \(image 2: trained class 0 "
                                                          r"margin 0\.1, fold_bn class 1"):
        accuracy.assert_identical_predictions({"trained": trained, "collapsed": trained, "fold_bn": flipped})


def test_harness_asserts_on_a_collapse_that_changes_predictions(digits, monkeypatch):
    """evaluate() itself must stop when collapse(fold_bn=True) changes a prediction."""
    torch.manual_seed(0)
    model = accuracy.build_model("cifar_resnet8", 1, 10)
    real_collapse = acfx.collapse

    def broken(m, **kwargs):
        out = real_collapse(m, **kwargs)
        if kwargs.get("fold_bn"):
            with torch.no_grad():
                out.fc.bias[3] += 1e3  # class 3 everywhere
        return out
    monkeypatch.setattr(accuracy.acfx, "collapse", broken)
    with pytest.raises(accuracy.PredictionMismatch, match="fold_bn predicts differently"):
        accuracy.evaluate(model, accuracy.VARIANTS["base"], digits, TINY, 0, CPU, accuracy.Training([], 0.0))


@pytest.fixture(scope="module")
def folded(digits):
    """An ACNet ResNet-8 trained for one epoch, in deploy form (collapse(fold_bn=True))."""
    torch.manual_seed(0)
    model = accuracy.make_variant(accuracy.build_model("cifar_resnet8", 1, 10), accuracy.VARIANTS["acnet"], 0)
    accuracy.fit(model, digits, TINY, 0, CPU)
    return acfx.collapse(model.eval(), fold_bn=True).eval()


def test_prepare_qat_on_a_collapsed_model_trains_and_converts(digits, folded):
    x = digits.normalise(digits.test.pixels(slice(0, 256)))
    with torch.no_grad():
        reference = folded(x)
    qat_model = int8.prepare_qat(folded, x)
    with torch.no_grad():
        fake_train = qat_model(x)  # training mode, as QAT starts: no BN left to re-normalise with batch statistics
        fake = qat_model.eval()(x)
    # measured about 21 dB (8-bit weights and activations through 8 layers); QAT from collapse() instead, whose BNs
    # re-normalise with batch statistics in training mode, gives a few dB on a trained ACNet
    assert int8.sqnr_db(reference, fake_train) > 15, int8.sqnr_db(reference, fake_train)
    assert int8.sqnr_db(reference, fake) > 15, int8.sqnr_db(reference, fake)
    qat_model.train()
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=1e-3, momentum=0.9)
    before = [p.detach().clone() for p in qat_model.parameters()]
    loss = nn.functional.cross_entropy(qat_model(x), digits.test.labels[:256])
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(b, p) for b, p in zip(before, qat_model.parameters()))
    from torch.ao.quantization.quantize_fx import convert_fx
    with int8.quiet_ao(), torch.no_grad():
        quantized = convert_fx(qat_model.eval())
        fake_after, int8_after = qat_model(x), quantized(x)
    assert int8.int8_module_count(quantized) == 10
    assert int8.sqnr_db(fake_after, int8_after) > 15, int8.sqnr_db(fake_after, int8_after)  # measured about 20 dB


def test_ptq_runs_int8_kernels_close_to_float(digits, folded):
    calibration = digits.normalise(digits.train.pixels(slice(0, 128)))
    x = digits.normalise(digits.test.pixels(slice(0, 256)))
    for scheme in int8.SCHEMES:
        quantized = int8.ptq(folded, calibration, scheme)
        assert int8.int8_module_count(quantized) == 10
        with torch.no_grad():
            error = int8.sqnr_db(folded(x), quantized(x))
        assert error > 15, (scheme, error)  # measured about 23 dB for both schemes


def test_weight_sqnr_matches_a_hand_computation():
    conv = nn.Conv2d(2, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-1, 0.25, 36).view(2, 2, 3, 3))
    w = conv.weight.detach().double()

    def expected(scale):  # symmetric int8: scale = max|w| / 127.5, integers in [-128, 127]
        q = torch.clamp(torch.round(w / scale), -128, 127) * scale
        return 10 * math.log10(w.pow(2).sum().item() / (w - q).pow(2).sum().item())
    per_channel_scale = w.abs().flatten(1).amax(1).view(2, 1, 1, 1) / 127.5
    [layer] = int8.weight_sqnr(nn.Sequential(conv))
    assert layer.per_tensor_db == pytest.approx(expected(w.abs().max() / 127.5), abs=1e-3)
    assert layer.per_channel_db == pytest.approx(expected(per_channel_scale), abs=1e-3)
    assert layer.per_channel_db > layer.per_tensor_db  # channel 0 spans [-1, ...], channel 1 only [..., 0.25]
    maxes = w.abs().flatten(1).amax(1)
    assert layer.channel_spread == pytest.approx((maxes.max() / maxes.min()).item())  # median of two: the lower


def test_skeleton_ratio_by_hand():
    m = torch.tensor([[0.2, 0.5, 0.2], [0.5, 1.0, 0.5], [0.2, 0.5, 0.2]])
    assert accuracy.skeleton_ratio(m) == pytest.approx((4 * 0.5 + 1.0) / 5 / 0.2)
    even = torch.full((4, 4), 0.1)
    even[1:3, :] = 1.0
    even[:, 1:3] = 1.0
    assert accuracy.skeleton_ratio(even) == pytest.approx(10.0)


def test_same_data_order_and_augmentation_for_every_variant(digits):
    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return [accuracy.augment(digits.train.pixels(i), 2, True, generator)
                for i in accuracy.batch_order(len(digits.train), 64, generator)]
    first, again, other = epoch(3), epoch(3), epoch(4)
    assert len(first) == 14  # 898 // 64: the incomplete batch is dropped
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_variants_start_from_the_base_initialisation():
    torch.manual_seed(0)
    base = accuracy.build_model("cifar_resnet8", 1, 10)
    acnet = accuracy.make_variant(base, accuracy.VARIANTS["acnet"], 0)
    again = accuracy.make_variant(base, accuracy.VARIANTS["acnet"], 0)
    block = acnet.layers[0].conv1
    assert isinstance(block, acfx.ACBlock)
    assert torch.equal(block.square.weight, base.layers[0].conv1.weight)
    assert torch.equal(block.hor.weight, again.layers[0].conv1.hor.weight)  # the new branches are seeded
    assert block.square.weight.data_ptr() != base.layers[0].conv1.weight.data_ptr()  # a copy: base untouched
    gamma3 = accuracy.make_variant(base, accuracy.VARIANTS["acnet-gamma3"], 0).layers[0].conv1
    assert torch.allclose(gamma3.hor_bn.weight, torch.full_like(gamma3.hor_bn.weight, 1 / 3))


def test_rotations_are_the_papers_transforms():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    t = accuracy.TRANSFORMS
    assert torch.equal(t["rot180"](x), t["flipud"](t["fliplr"](x)))
    assert torch.equal(t["rot90"](t["rot90"](x)), t["rot180"](x))
    assert t["rot90"](x)[0, 0, 0, 0] == 3.0  # counter-clockwise: the top-right pixel moves to the top-left


def test_paired_statistics_by_hand():
    p = report.paired([(0.9, 0.8), (0.8, 0.8), (0.7, 0.8)])
    assert (p.above, p.equal, p.below, p.n) == (1, 1, 1, 3)
    assert p.mean == pytest.approx(0.0, abs=1e-12)
    assert p.std == pytest.approx(0.1)
    assert p.ci95 == pytest.approx(4.302652729 * 0.1 / math.sqrt(3), rel=1e-6)
    assert report.stat([0.5]).n == 1 and math.isnan(report.stat([0.5]).std)


def test_image_folder_tree_is_split_per_class(tmp_path):
    from PIL import Image
    for label, colour in (("a", 0), ("b", 255)):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (7, 5), (colour, i, 0)).save(tmp_path / label / f"{i}.png")
    data = accuracy.load_folder(str(tmp_path), 8)
    assert (len(data.train), len(data.test), data.num_classes, data.in_chans, data.size) == (16, 4, 2, 3, 8)
    assert data.test.labels.tolist().count(0) == 2
    assert data.train.images.dtype == torch.uint8


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS default 30, --quick 5" in text and accuracy.Recipe().epochs == 30
    assert "--batch-size BATCH_SIZE default 64" in text and accuracy.Recipe().batch_size == 64
    compact = text.replace(" ", "")  # argparse wraps lines at hyphens
    for name in accuracy.VARIANTS:
        assert name in compact, name
    args = accuracy.parse_args([])
    assert (args.variants, args.seeds, args.size) == (list(accuracy.VARIANTS), 5, 16)
    assert args.workers == min(2, os.cpu_count() or 1)


def test_a_training_fraction_keeps_every_class_and_the_test_split():
    digits = accuracy.load_digits(8)
    part = accuracy.train_subset(digits, 0.25)
    assert torch.equal(part.test.labels, digits.test.labels)
    full, kept = torch.bincount(digits.train.labels), torch.bincount(part.train.labels)
    assert ((kept - full * 0.25).abs() <= 1).all(), (full, kept)  # stratified: a quarter of each class
    again = accuracy.train_subset(digits, 0.25)
    assert torch.equal(again.train.images, part.train.images)  # fixed: the same images every run
    assert accuracy.train_subset(digits, 1.0) is digits
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--train-fraction", "0"])
