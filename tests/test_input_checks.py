"""Arguments, data and output paths are checked, not guessed (issue 11, item 5).

Command-line cases run ``sb-keras`` in a fresh process, as typed: each must
exit non-zero with one line naming the flag or the path, and no traceback.
"""

import os

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras import data
from sb_keras import export
from tests import cli_helpers
from tests.cli_helpers import error_line
from tests.cli_helpers import sb_keras as run_cli


def _npz_folder(folder, x, y, split="train"):
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, f"{split}.npz"), x=x, y=y)
    return str(folder)


def _pixels(n=8, dtype=np.uint8, low=0, high=256):
    rng = np.random.default_rng(0)
    return rng.integers(low, high, (n, 32, 32, 3)).astype(dtype)


# --- data: refused before training -----------------------------------------


@pytest.mark.parametrize(
    "x, message",
    [
        (_pixels(dtype=np.float32, high=2) / 2.0, "float"),  # images in [0, 1]
        (_pixels(dtype=np.int32, low=200, high=456), r"\[200, 455\]"),
        (np.full((8, 32, 32, 3), np.nan, np.float32), "NaN"),
        (_pixels(dtype=np.float64), "float64"),  # even if they look like pixels
    ],
)
def test_images_that_are_not_uint8_pixels_are_refused(tmp_path, x, message):
    folder = _npz_folder(tmp_path, x, np.arange(8) % 10)
    with pytest.raises(ValueError, match=message) as info:
        data.load_arrays("cifar10", "train", data_dir=folder)
    assert "Received: x.dtype=" in str(info.value)
    assert "train.npz" in str(info.value)


def test_integer_pixels_in_range_are_kept_exactly(tmp_path):
    x = _pixels(dtype=np.int64)
    folder = _npz_folder(tmp_path, x, np.arange(8) % 10)
    got, y = data.load_arrays("cifar10", "train", data_dir=folder)
    assert got.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(got.astype(np.int64), x)


@pytest.mark.parametrize(
    "y, dataset, message",
    [
        (np.arange(8) + 3, "cifar10", r"labels in \[3, 10\]"),
        (np.arange(8) - 1, "cifar10", r"labels in \[-1, 6\]"),
        (np.arange(8) * 20, "cifar100", r"labels in \[0, 140\]"),
        (np.arange(8) + 0.5, "cifar10", "y.dtype=float64"),
    ],
)
def test_labels_outside_the_classes_are_refused(tmp_path, y, dataset, message):
    folder = _npz_folder(tmp_path, _pixels(), y)
    with pytest.raises(ValueError, match=message):
        data.load_arrays(dataset, "train", data_dir=folder)


def test_train_refuses_float_images_before_training(tmp_path):
    folder = _npz_folder(
        tmp_path / "data", _pixels(dtype=np.float32) / 255.0, np.zeros(8)
    )
    _npz_folder(tmp_path / "data", _pixels(), np.zeros(8, int), split="test")
    err = error_line(
        run_cli(
            "train",
            "--data-dir",
            folder,
            "--output",
            tmp_path / "run",
            "--epochs",
            1,
            "--batch-size",
            4,
            "--verbose",
            0,
        )
    )
    assert "train.npz" in err and "Received: x.dtype=float32" in err
    assert not os.path.exists(tmp_path / "run" / "model.keras")


# --- flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "--batch-size", "0"], "--batch-size"),
        (["evaluate", "m.keras", "--batch-size", "-5"], "--batch-size"),
        (
            ["export", "m.keras", "m.tflite", "--calibration-count", "-1"],
            "--calibration-count",
        ),
    ],
)
def test_bad_numbers_name_the_flag(argv, flag):
    err = error_line(run_cli(*argv))
    assert f"argument {flag}: must be an integer >= 1" in err


def test_evaluate_refuses_a_dataset_the_model_does_not_predict(tmp_path):
    model = sb_keras.ResNet(depth=8)  # 10 classes
    path = str(tmp_path / "m.keras")
    model.save(path)
    folder = _npz_folder(tmp_path / "cifar10", _pixels(), np.arange(8) % 10, "test")
    err = error_line(
        run_cli("evaluate", path, "--data-dir", folder, "--dataset", "cifar100")
    )
    assert "predicts 10 classes" in err and "Received: dataset='cifar100'" in err


def test_train_model_args_cannot_set_what_the_data_sets(tmp_path, capsys):
    from sb_keras import cli
    from sb_keras.training import TrainConfig

    with pytest.raises(ValueError, match=r"cannot set input_shape, num_classes"):
        TrainConfig(model_args={"num_classes": 10, "input_shape": (8, 8, 3)}).validate()
    code = cli.main(
        ["train", "--model-args", '{"num_classes": 10}', "--output", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Received: model_args={'num_classes': 10}" in err
    assert "Traceback" not in err


# --- output paths ------------------------------------------------------------


def test_train_output_that_is_a_file_or_under_a_file(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for output, says in ((afile, "it is a file"), (afile / "run", "lies under")):
        err = error_line(run_cli("train", "--output", output, "--epochs", 1))
        assert says in err and f"Received: output={str(output)!r}" in err
    assert afile.read_text() == "x"


def test_export_path_that_cannot_be_written(tmp_path):
    path = str(tmp_path / "m.keras")
    sb_keras.ResNet(depth=8).save(path)
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for out in (afile / "m.tflite", tmp_path):
        err = error_line(run_cli("export", path, out))
        assert str(out) in err and ".part" not in err
    err = error_line(run_cli("convert", "any.pth", afile / "m.keras"))
    assert f"Received: output={str(afile / 'm.keras')!r}" in err


def test_save_logits_path_is_checked_before_evaluating(tmp_path, capsys):
    from sb_keras import cli

    folder = _npz_folder(tmp_path, _pixels(), np.arange(8) % 10, "test")
    path = str(tmp_path / "m.keras")
    sb_keras.ResNet(depth=8).save(path)
    bad = str(tmp_path / "nowhere" / "l.npy")
    assert cli.main(["evaluate", path, "--data-dir", folder, "--save-logits", bad]) == 2
    assert f"Received: logits_path={bad!r}" in capsys.readouterr().err


# --- export ----------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_representative_data_must_be_finite(tmp_path, value):
    folded = export.fold_model(sb_keras.ResNet(depth=8))
    x = _pixels(4).astype(np.float32)
    x[1, 3, 4, 0] = value
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match="must be finite") as info:
        export.convert(folded, path, quantize="int8", representative_data=x)
    assert "Received: representative_data" in str(info.value)
    assert not path.exists()


def test_tflite_files_are_written_with_the_usual_permissions(tmp_path):
    path = tmp_path / "m.tflite"
    export.convert(export.fold_model(sb_keras.ResNet(depth=8)), path)
    other = tmp_path / "other"
    other.write_bytes(b"")
    assert os.stat(path).st_mode & 0o777 == os.stat(other).st_mode & 0o777


# --- a loaded QAT model computes the int8 path at once ------------------------


def test_loaded_qat_model_runs_the_integer_path_right_after_load(tmp_path):
    qat = export.quantize_aware_model(export.fold_model(sb_keras.ResNet(depth=8)))
    x = _pixels(16).astype(np.float32)
    export.calibrate(qat, x, batch_size=8)
    ref = np.asarray(qat(x, training=False))  # linked: the int8 kernels' numbers
    with export.simulated():
        sim = np.asarray(qat(x, training=False))
    assert not np.array_equal(sim, ref)  # so the test can tell the two apart
    qat.save(tmp_path / "qat.keras")
    for first in ("predict", "call"):
        loaded = keras.models.load_model(tmp_path / "qat.keras")
        if first == "predict":
            np.testing.assert_array_equal(loaded.predict(x, verbose=0), ref)
        np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), ref)
        # link_ranges afterwards changes nothing and leaves no stale function.
        assert export.link_ranges(loaded) > 0
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), ref)


def test_import_sb_keras_registers_the_optimizer_of_saved_runs(tmp_path):
    from sb_keras.training import PyTorchSGD

    model = sb_keras.ResNet(depth=8)
    model.compile(optimizer=PyTorchSGD(0.1), loss="mse")
    path = str(tmp_path / "m.keras")
    model.save(path)
    code = (
        "import sys, sb_keras, keras; "
        "m = keras.models.load_model(sys.argv[1], safe_mode=True); "
        "print(type(m.optimizer).__name__)"
    )
    out = cli_helpers.ok(cli_helpers.python(code, path))
    assert out.strip().splitlines()[-1] == "PyTorchSGD"


# --- fine-tuning from a file ---------------------------------------------------


def test_init_from_is_checked(tmp_path):
    from sb_keras.training import TrainConfig
    from sb_keras.training import finetune

    with pytest.raises(ValueError, match=r"Received: init_from='m\.onnx'"):
        TrainConfig(init_from="m.onnx").validate()
    with pytest.raises(FileNotFoundError, match="absent.keras"):
        TrainConfig(init_from=str(tmp_path / "absent.keras")).validate()
    path = str(tmp_path / "m.keras")
    sb_keras.ResNet(depth=8, name="tiny").save(path)
    with pytest.raises(ValueError, match="Received: precision='mixed_bfloat16'"):
        TrainConfig(init_from=path, precision="mixed_bfloat16").validate()
    for config, match in (
        (TrainConfig(init_from=path, model="resnet20"), r"'tiny'.*model='resnet20'"),
        (TrainConfig(init_from=path, model_args={"depth": 14}), "model_args="),
        (TrainConfig(init_from=path, dataset="cifar100"), "predicts 10 classes"),
    ):
        with pytest.raises(ValueError, match=match):
            finetune.initial_model(
                config, 100 if config.dataset != "cifar10" else 10, (32, 32, 3)
            )


def test_init_from_keeps_the_weights_and_sets_the_runs_lambda(tmp_path):
    from sb_keras.training import TrainConfig
    from sb_keras.training import finetune

    model = sb_keras.ResNet(depth=8, share=True, orthogonality=10.0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    config = TrainConfig(init_from=path, orthogonality=0.5)
    loaded = finetune.initial_model(config, 10, (32, 32, 3))
    assert loaded.get_config()["orthogonality"] == 0.5
    x = _pixels(4).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)),
        np.asarray(model(x, training=False)),
        atol=1e-5,
    )
    qat = finetune.quantize_aware(loaded)
    assert export.tflite.has_fake_quant(qat)
    assert finetune.quantize_aware(qat) is qat
