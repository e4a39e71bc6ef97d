"""The user's journeys, each step a fresh ``sb-keras`` process (as typed).

train -> evaluate -> export int8 -> evaluate the file; fine-tune from the
``.keras`` file -> QAT -> export -> the QAT model and its int8 file agree;
and every file the package wrote loads with ``keras.models.load_model`` in
a process that ran only ``import sb_keras`` (also with ``safe_mode=True``).
On real CIFAR-10 images (a small subset, tiny budgets).
"""

import glob
import json
import os
import re

import keras
import numpy as np
import pytest

import sb_keras
from tests import cli_helpers
from tests.cli_helpers import ok
from tests.cli_helpers import sb_keras as run_cli
from tests.conftest import shared_path

CIFAR10 = shared_path("datasets", "cifar10")
NET_RL2 = shared_path("pretrained", "net_rl2")
TINY = ["--model", "resnet20_s16u1_double", "--model-args", '{"depth": 8}']
BUDGET = ["--epochs", 1, "--batch-size", 64, "--verbose", 0, "--no-tensorboard"]
QAT = ["--qat", "--lr", 1e-5, "--schedule", "constant"]  # QAT wants a tiny lr

LOAD_ONLY_WITH_IMPORT_SB_KERAS = """
import sys
import sb_keras  # nothing else of sb_keras is imported
import keras
for path in sys.argv[1:]:
    for safe in (True, False):
        model = keras.models.load_model(path, safe_mode=safe)
    print(path, model.name)
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not os.path.isfile(os.path.join(CIFAR10, "test.npz")):
        pytest.skip("the real CIFAR-10 is not beside this checkout")
    return cli_helpers.subset_folder(CIFAR10, str(tmp_path_factory.mktemp("data")))


def _test_arrays(data_dir):
    with np.load(os.path.join(data_dir, "test.npz")) as f:
        return f["x"], f["y"]


def _evaluate(path, data_dir, logits_path):
    """``sb-keras evaluate PATH --save-logits``: (correct, total), logits."""
    out = ok(
        run_cli("evaluate", path, "--data-dir", data_dir, "--save-logits", logits_path)
    )
    match = re.search(r"top-1 [0-9.]+% \((\d+)/(\d+)\)", out)
    assert match, out
    return (int(match[1]), int(match[2])), np.load(logits_path)


def _assert_top1_line_is_the_logits(counts, logits, y):
    assert counts == (int(np.sum(logits.argmax(-1) == y)), len(y))


def _assert_qat_file_equals_model(qat_keras, qat_tflite, data_dir, tmp):
    """The loaded QAT model and its int8 file: same top-1, same int8 outputs."""
    _, y = _test_arrays(data_dir)
    counts_k, logits_k = _evaluate(qat_keras, data_dir, os.path.join(tmp, "qk.npy"))
    counts_t, logits_t = _evaluate(qat_tflite, data_dir, os.path.join(tmp, "qt.npy"))
    _assert_top1_line_is_the_logits(counts_k, logits_k, y)
    assert counts_k == counts_t
    np.testing.assert_array_equal(logits_k.argmax(-1), logits_t.argmax(-1))
    # Bit-exact in the int8 codes (tflite/README.md): the two float outputs
    # are the same code dequantized (they may differ in the last float bit).
    step = sb_keras.export.qat.output_quant_step(keras.models.load_model(qat_keras))
    # Known defect (open): one CI run of the authors' ResNet56 journey had one
    # logit exactly one int8 step apart (top-1 and argmax still equal).
    diff = np.abs(logits_k - logits_t) / step
    assert diff.max() < 1.01 and np.mean(diff > 0.01) < 1e-3


def _assert_every_file_loads(paths):
    paths = sorted(paths)
    assert paths
    result = cli_helpers.python(LOAD_ONLY_WITH_IMPORT_SB_KERAS, *paths)
    out = ok(result)
    assert len(out.strip().splitlines()) == len(paths), out


def test_train_evaluate_export_finetune_qat(data_dir, tmp_path):
    tmp = str(tmp_path)
    run, qat = os.path.join(tmp, "run"), os.path.join(tmp, "qat")
    x, y = _test_arrays(data_dir)

    # train -> evaluate model.keras
    ok(run_cli("train", *TINY, *BUDGET, "--data-dir", data_dir, "--output", run))
    model_path = os.path.join(run, "model.keras")
    counts, logits = _evaluate(model_path, data_dir, os.path.join(tmp, "k.npy"))
    _assert_top1_line_is_the_logits(counts, logits, y)
    model = keras.models.load_model(model_path)
    np.testing.assert_allclose(
        logits, np.asarray(model(x.astype("float32"), training=False)), atol=1e-5
    )
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["test_accuracy"] == pytest.approx(counts[0] / counts[1], abs=1e-6)

    # export --quantize int8 -> evaluate the file (written 0644)
    int8 = os.path.join(tmp, "model_int8.tflite")
    ok(
        run_cli(
            "export",
            model_path,
            int8,
            "--quantize",
            "int8",
            "--data-dir",
            data_dir,
            "--calibration-count",
            128,
        )
    )
    assert os.stat(int8).st_mode & 0o777 == 0o644 & ~_umask()
    counts_t, logits_t = _evaluate(int8, data_dir, os.path.join(tmp, "t.npy"))
    _assert_top1_line_is_the_logits(counts_t, logits_t, y)
    # Post-training int8 stays close to the float model (not bit-exact): a
    # one-epoch model has a few outlier logits (one of 2000 was 11 % of the
    # spread away once), the bulk is within a few percent.
    spread = logits.max() - logits.min()
    diff = np.abs(logits_t - logits)
    assert np.quantile(diff, 0.99) < 0.05 * spread, np.quantile(diff, [0.5, 0.99, 1])
    assert diff.max() < 0.25 * spread
    assert np.mean(logits_t.argmax(-1) == logits.argmax(-1)) >= 0.9

    # Fine-tune from the file with QAT -> export -> same numbers.
    err = cli_helpers.error_line(
        run_cli(
            "train",
            "--init-from",
            model_path,
            "--model",
            "resnet56",
            "--output",
            qat,
            "--data-dir",
            data_dir,
            *BUDGET,
        )
    )
    assert "Received: model='resnet56'" in err and "resnet20_s16u1_double" in err
    ok(
        run_cli(
            "train",
            "--init-from",
            model_path,
            *QAT,
            *BUDGET,
            "--data-dir",
            data_dir,
            "--output",
            qat,
        )
    )
    qat_model = os.path.join(qat, "model.keras")
    qat_int8 = os.path.join(tmp, "qat_int8.tflite")
    ok(run_cli("export", qat_model, qat_int8, "--quantize", "int8"))
    _assert_qat_file_equals_model(qat_model, qat_int8, data_dir, tmp)

    _assert_every_file_loads(
        glob.glob(os.path.join(tmp, "**", "*.keras"), recursive=True)
    )


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_authors_checkpoint_convert_finetune_qat(data_dir, tmp_path):
    """convert the authors' ResNet56 -> fine-tune (from the .keras and from
    the .pth) -> QAT -> export: the fine-tuned model keeps the authors'
    accuracy, and the QAT model equals its int8 file."""
    pth56 = os.path.join(NET_RL2, "CIFAR10_ResNet56_S16U1_7.46err.pth.pth")
    pth32 = os.path.join(NET_RL2, "CIFAR10_ResNet32_Double_S16U1_6.93err.pth")
    if not os.path.isfile(pth56):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    tmp = str(tmp_path)
    converted = os.path.join(tmp, "resnet56.keras")
    out = ok(run_cli("convert", pth56, converted))
    assert "resnet56_s16u1" in out
    small = [
        "--epochs",
        1,
        "--batch-size",
        64,
        "--limit",
        128,
        "--verbose",
        0,
        "--no-tensorboard",
        "--lr",
        0.001,
        "--schedule",
        "constant",
    ]
    for source, name in ((converted, "keras"), (pth32, "pth")):
        run = os.path.join(tmp, f"fine_{name}")
        ok(
            run_cli(
                "train",
                "--init-from",
                source,
                *small,
                "--data-dir",
                data_dir,
                "--output",
                run,
            )
        )
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        # The authors' weights were the start (about 81 % on this JPEG test
        # set before fine-tuning); a random start scores about 10 %.
        assert metrics["test_accuracy"] > 0.6, metrics
    qat = os.path.join(tmp, "qat")
    ok(
        run_cli(
            "train",
            "--init-from",
            os.path.join(tmp, "fine_keras", "model.keras"),
            *small,
            *QAT,
            "--data-dir",
            data_dir,
            "--output",
            qat,
        )
    )
    assert json.load(open(os.path.join(qat, "metrics.json")))["test_accuracy"] > 0.6
    qat_model = os.path.join(qat, "model.keras")
    qat_int8 = os.path.join(tmp, "qat_int8.tflite")
    ok(run_cli("export", qat_model, qat_int8, "--quantize", "int8"))
    _assert_qat_file_equals_model(qat_model, qat_int8, data_dir, tmp)
    _assert_every_file_loads(
        glob.glob(os.path.join(tmp, "**", "*.keras"), recursive=True)
    )


@pytest.mark.slow
def test_train_plain_compress_finetune(data_dir, tmp_path):
    """train plain -> compress (exact ranks, then small ranks) -> fine-tune.

    At ranks that hold every filter (single sharing: S = 2 layers x filters
    per stage, u = 0) the compressed file's logits equal the plain file's;
    at small ranks it fine-tunes with ``--init-from`` into a shared model.
    """
    tmp = str(tmp_path)
    plain_run = os.path.join(tmp, "plain")
    plain_args = ["--model", "resnet20", "--model-args", '{"depth": 14}']
    ok(
        run_cli(
            "train", *plain_args, *BUDGET, "--data-dir", data_dir, "--output", plain_run
        )
    )
    plain = os.path.join(plain_run, "model.keras")
    _, y = _test_arrays(data_dir)
    _, logits_plain = _evaluate(plain, data_dir, os.path.join(tmp, "p.npy"))

    exact = os.path.join(tmp, "exact.keras")
    out = ok(run_cli("compress", plain, exact, "--shared-rank", 32, "--unique-rank", 0))
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) parameters", out)]
    assert len(counts) == 2 and counts[0] == sb_keras.count_params(
        keras.models.load_model(plain)
    ), out
    _, logits_exact = _evaluate(exact, data_dir, os.path.join(tmp, "e.npy"))
    scale = np.abs(logits_plain).max()
    np.testing.assert_allclose(logits_exact, logits_plain, atol=1e-3 * scale)

    small = os.path.join(tmp, "small.keras")
    ok(
        run_cli(
            "compress",
            plain,
            small,
            "--shared-rank",
            4,
            "--unique-rank",
            1,
            "--sharing",
            "double",
            "--data-dir",
            data_dir,
            "--calibration-count",
            64,
        )
    )
    tuned_run = os.path.join(tmp, "tuned")
    ok(
        run_cli(
            "train",
            "--init-from",
            small,
            *BUDGET,
            "--lr",
            0.01,
            "--schedule",
            "cosine",
            "--data-dir",
            data_dir,
            "--output",
            tuned_run,
        )
    )
    tuned = os.path.join(tuned_run, "model.keras")
    counts, logits = _evaluate(tuned, data_dir, os.path.join(tmp, "t.npy"))
    _assert_top1_line_is_the_logits(counts, logits, y)
    before = keras.models.load_model(small)
    after = keras.models.load_model(tuned)
    assert after.get_config()["share"] and after.get_config()["sharing"] == "double"
    assert after.get_config()["shared_rank"] == 4
    assert sb_keras.count_params(after) == sb_keras.count_params(before)
    assert sb_keras.count_params(after) < sb_keras.count_params(
        keras.models.load_model(plain)
    )
    moved = [
        not np.allclose(a, b) for a, b in zip(before.get_weights(), after.get_weights())
    ]
    assert np.mean(moved) > 0.5
    _assert_every_file_loads([plain, exact, small, tuned])
