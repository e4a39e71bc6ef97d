"""Tests of sb_keras.tuning: a tiny keras-tuner search end to end."""

import numpy as np
import pytest

import sb_keras

kt = pytest.importorskip("keras_tuner")
from sb_keras import tuning  # noqa: E402

SHAPE = (8, 8, 3)


def _data(n, seed):
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 2
    # Learnable: class 1 images are bright, class 0 dark.
    x = rng.uniform(0, 120, size=(n, *SHAPE)) + 120 * y[:, None, None, None]
    return x.astype("uint8"), y


@pytest.mark.slow  # about 25 s on 2 CPU cores (builds and traces two models)
def test_tiny_search_runs_and_loads_the_best_model(tmp_path):
    x, y = _data(32, 0)
    xv, yv = _data(16, 1)
    tuner = tuning.tune(
        x,
        y,
        validation_data=(xv, yv),
        tuner="random",
        max_trials=2,
        epochs=1,
        batch_size=16,
        augment=False,
        directory=str(tmp_path),
        depth=14,
        sharings=("single", "double"),
        shared_ranks=(2,),
        unique_ranks=(1,),
        verbose=0,
    )
    rows = tuning.results_table(tuner)
    assert len(rows) == 2
    assert all(r["status"] == "COMPLETED" for r in rows)
    best = tuner.get_best_models(1)[0]
    best_hp = tuner.get_best_hyperparameters(1)[0]
    assert isinstance(best, sb_keras.ResNet)
    assert best.sharing == best_hp.values["sharing"]
    assert best.shared_rank == best_hp.values["shared_rank"]
    # The table's size is the size of the model it describes.
    assert rows[0]["params"] == sb_keras.count_params(best)
    assert rows[0]["macs"] == sb_keras.count_macs(best)
    # The loaded weights are the checkpointed best epoch: evaluating them on
    # the validation data gives the score the oracle recorded.
    pred = best.predict(xv.astype("float32"), verbose=0).argmax(-1)
    assert np.mean(pred == yv) == pytest.approx(rows[0]["val_accuracy"], abs=1e-6)


def _hp(**values):
    hp = kt.HyperParameters()
    hp.values.update(values)
    return hp


def test_budget_penalizes_oversized_models_without_training():
    x, y = _data(8, 0)
    small = sb_keras.ResNet(
        14,
        share=True,
        sharing="single",
        shared_rank=2,
        unique_rank=1,
        input_shape=SHAPE,
        num_classes=2,
    )
    budget = sb_keras.count_params(small)
    hm = tuning.SharedBasisHyperModel(
        depth=14, num_classes=2, input_shape=SHAPE, max_params=budget
    )
    over = _hp(sharing="plain", learning_rate=0.1)
    model = hm.build(over)
    assert sb_keras.count_params(model) > budget
    assert not hm.within_budget(hm.size_of(over))
    before = [np.array(v) for v in model.trainable_variables]
    result = hm.fit(over, model, x, y, epochs=1, verbose=0)
    assert result == {"val_accuracy": 0.0}
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))
    under = _hp(
        sharing="single",
        shared_rank=2,
        unique_rank=1,
        orthogonality=10.0,
        learning_rate=0.1,
    )
    model = hm.build(under)
    assert hm.size_of(under)["params"] == budget
    history = hm.fit(under, model, x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_budget_skip_mode_fails_the_trial():
    hm = tuning.SharedBasisHyperModel(
        depth=14, num_classes=2, input_shape=SHAPE, max_macs=1, budget_mode="skip"
    )
    with pytest.raises(kt.errors.FailedTrialError, match="Over budget"):
        hm.build(_hp(sharing="plain", learning_rate=0.1))


def test_pareto_front_and_plot(tmp_path):
    rows = [
        {"sharing": "plain", "params": 100, "val_accuracy": 0.9},
        {
            "sharing": "single",
            "shared_rank": 8,
            "unique_rank": 1,
            "orthogonality": 10.0,
            "params": 40,
            "val_accuracy": 0.85,
        },
        {
            "sharing": "double",
            "shared_rank": 16,
            "unique_rank": 1,
            "orthogonality": 0.0,
            "params": 60,
            "val_accuracy": 0.8,  # dominated by the 40-param row
        },
        {"sharing": "single", "params": 30, "val_accuracy": None},
    ]
    front = tuning.pareto_front(rows)
    assert [r["params"] for r in front] == [40, 100]
    path = tmp_path / "sub" / "pareto.png"
    tuning.plot_pareto(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 8}, "depth=8"),
        ({"sharings": ("triple",)}, "sharings="),
        ({"unique_ranks": ()}, "unique_ranks=()"),
        ({"learning_rate": (0.1, 0.01)}, "learning_rate="),
        ({"max_params": -5}, "max_params=-5"),
        ({"budget_mode": "drop"}, "budget_mode='drop'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tuning.SharedBasisHyperModel(**kwargs)


def test_search_space_conditions_ranks_on_sharing():
    hm = tuning.SharedBasisHyperModel(depth=14, input_shape=SHAPE)
    hp = _hp(sharing="plain")
    kwargs = hm.model_kwargs(hp)
    assert "share" not in kwargs
    assert not hp.is_active("shared_rank")
    hp.values.update(sharing="double", shared_rank=8, unique_rank=2, orthogonality=1.0)
    kwargs = hm.model_kwargs(hp)
    assert kwargs["sharing"] == "double" and kwargs["shared_rank"] == 8
    assert hm.size_of(hp)["params"] == sb_keras.count_params(sb_keras.ResNet(**kwargs))


@pytest.mark.slow  # about 27 s on 2 CPU cores
def test_search_under_mirrored_strategy(tmp_path, mirrored_strategy):
    import tensorflow as tf

    strategy = mirrored_strategy
    x, y = _data(32, 0)
    tuner = tuning.tune(
        x,
        y,
        validation_data=(x[:16], y[:16]),
        tuner="random",
        max_trials=1,
        epochs=1,
        batch_size=16,
        augment=False,
        directory=str(tmp_path),
        strategy=strategy,
        depth=14,
        sharings=("double",),
        shared_ranks=(2,),
        unique_ranks=(1,),
        verbose=0,
    )
    (row,) = tuning.results_table(tuner)
    assert row["status"] == "COMPLETED" and row["val_accuracy"] is not None
    best = tuner.get_best_models(1)[0]
    bases = [
        v
        for layer in best._flatten_layers()
        if isinstance(layer, sb_keras.layers.FilterBasis)
        for v in layer.bases
    ]
    assert len({id(v) for v in bases}) == 6  # 3 stages x 2 bases, one each
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in bases)


def test_cli_tune_parses_and_reports_bad_arguments(capsys):
    from sb_keras import cli

    args = cli.build_parser().parse_args(
        ["tune", "--depth", "14", "--shared-ranks", "4,8", "--max-params", "1000"]
    )
    assert args.func.__name__ == "_cmd_tune"
    assert (args.shared_ranks, args.max_params, args.tuner) == ("4,8", 1000, "bayesian")
    rng = np.random.RandomState(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            "sb_keras.data.load_arrays",
            lambda *a, **k: (
                rng.uniform(0, 255, (8, *SHAPE)).astype("uint8"),
                np.zeros(8),
            ),
        )
        assert cli.main(["tune", "--val-split", "2"]) == 2
        assert "val_split=2" in capsys.readouterr().err
        assert cli.main(["tune", "--budget-mode", "drop", "--depth", "14"]) == 2
        assert "budget_mode='drop'" in capsys.readouterr().err
