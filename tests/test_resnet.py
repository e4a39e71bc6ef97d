"""The ResNet family: the model checklist, sharing through every path a Keras
model travels, and argument validation."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import SharedConv2D
from tests import helpers


@pytest.mark.parametrize(
    "kwargs,params",
    [
        (dict(depth=8), None),
        (dict(depth=14, share=True), None),
        (dict(depth=14, share=True, sharing="single", unique_rank=0), None),
        (dict(depth=8, share=True, shared_rank=0, unique_rank=4), None),
        pytest.param(
            dict(depth=18, stem="cifar", share=True, num_classes=7),
            None,
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(depth=50, share=True, sharing="double", input_shape=(32, 32, 3)),
            18_262_056 - (1000 - 10) * 2049,
            marks=pytest.mark.slow,
        ),
    ],
    ids=["plain", "double", "shared_only", "non_shared", "r18_cifar", "r50_double"],
)
def test_model_checklist(kwargs, params):
    if "num_classes" not in kwargs and kwargs["depth"] == 50:
        kwargs = {**kwargs, "num_classes": 10}
    model = sb_keras.ResNet(**kwargs)
    helpers.run_model_test(model, expected_params=params)


def _users(model):
    """{basis layer name: [user layer names]} read off the graph."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, (BasisConv2D, SharedConv2D)):
            node = layer._inbound_nodes[0]
            for t in node.input_tensors[1:]:
                owner = t._keras_history.operation
                out.setdefault(owner.name, set()).add(layer.name)
    return out


@pytest.fixture(scope="module")
def saved_double(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = sb_keras.ResNet(depth=14, share=True, sharing="double")
    path = str(tmp_path_factory.mktemp("m") / "model.keras")
    model.save(path)
    return model, path


def test_load_model_keeps_one_variable_per_basis(saved_double):
    model, path = saved_double
    restored = keras.models.load_model(path)
    assert type(restored) is sb_keras.ResNet
    assert restored.get_config() == model.get_config()
    # 3 stages x 2 bases; each one variable, stored once.
    bases = helpers.basis_variables(restored)
    assert len(bases) == 6
    assert helpers.unique_variable_count(restored) == len(model.weights)
    assert _users(restored) == _users(model)
    assert all(len(u) == 2 for u in _users(restored).values())  # depth 14: n=2

    # Assigning to one basis changes every user's output.
    owner = restored.get_layer("stage2_basis")
    users = sorted(_users(restored)["stage2_basis"])
    probe = keras.Model(restored.input, [restored.get_layer(u).output for u in users])
    x = np.random.RandomState(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    before = [np.array(t) for t in probe(x)]
    owner.bases[0].assign(np.array(owner.bases[0]) * 0.5)
    owner.bases[1].assign(np.array(owner.bases[1]) * 0.5)
    after = [np.array(t) for t in probe(x)]
    for b, a in zip(before, after):
        assert np.abs(a - b).max() > 1e-3


def test_weights_file_stores_each_basis_once(saved_double):
    import zipfile

    import h5py

    _, path = saved_double
    with zipfile.ZipFile(path) as z, z.open("model.weights.h5") as f:
        data = f.read()
    tmp = path + ".h5"
    with open(tmp, "wb") as f:
        f.write(data)
    shapes = []
    with h5py.File(tmp, "r") as h5:
        h5.visititems(
            lambda n, o: shapes.append(n) if isinstance(o, h5py.Dataset) else None
        )
    # Keras keys layers by class name: layers/filter_basis{,_1,_2}/vars/{0,1}
    basis_entries = [n for n in shapes if n.startswith("layers/filter_basis")]
    assert len(basis_entries) == 6, basis_entries


def test_clone_model_keeps_sharing(saved_double):
    model, _ = saved_double
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    assert len(helpers.basis_variables(clone)) == 6
    assert helpers.unique_variable_count(clone) == len(model.weights)
    x = helpers.random_images(model)
    np.testing.assert_allclose(clone(x), model(x), atol=1e-6)
    clone2 = sb_keras.ResNet.from_config(model.get_config())
    assert len(helpers.basis_variables(clone2)) == 6


def test_export_saved_model_keeps_one_basis(saved_double, tmp_path):
    model, _ = saved_double
    path = str(tmp_path / "saved")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    x = helpers.random_images(model)
    np.testing.assert_allclose(
        reloaded.serve(tf.constant(x)), model(x, training=False), atol=1e-5
    )
    names = [v.name for v in reloaded.variables if "basis" in v.name]
    names = [n for n in names if "unique" not in n and "bn" not in n]
    assert len(names) == 6, names


def test_optimizer_has_one_slot_per_basis():
    model = sb_keras.ResNet(depth=14, share=True, sharing="single")
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = helpers.random_images(model, batch=4)
    model.fit(x, np.arange(4), epochs=1, verbose=0)
    slots = [v for v in opt.variables if v.path.endswith("_momentum")]
    assert len(slots) == len(model.trainable_weights)
    basis_slots = [v for v in opt.variables if "_basis_basis" in v.path]
    assert len(basis_slots) == 3


def test_default_share_variant_cifar():
    model = sb_keras.ResNet(depth=56, share=True)
    assert model.name == "resnet56_s16u1_double"
    assert (model.shared_rank, model.unique_rank, model.sharing) == (16, 1, "double")


@pytest.mark.slow
def test_default_share_variants():
    r34 = sb_keras.ResNet(depth=34, share=True, stem="cifar")
    assert (r34.shared_rank, r34.unique_rank, r34.sharing) == (16, 1, "single")
    assert r34.num_classes == 100
    r34i = sb_keras.ResNet(depth=34, share=True)
    assert (r34i.shared_rank, r34i.sharing, r34i.num_classes) == (32, "double", 1000)
    r50 = sb_keras.ResNet(depth=50, share=True, input_shape=(64, 64, 3))
    assert r50.sharing == "single"
    assert sum(isinstance(layer, FilterBasis) for layer in r50.layers) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(depth=21), "depth=21"),
        (dict(depth="56"), "depth='56'"),
        (dict(depth=56, share=True, shared_rank=-1), "shared_rank=-1"),
        (dict(depth=56, share=True, unique_rank=-2), "unique_rank=-2"),
        (dict(depth=56, share=True, shared_rank=200), "shared_rank=200"),
        (dict(depth=56, share=True, shared_rank=0, unique_rank=0), "shared_rank=0"),
        (dict(depth=56, share=True, sharing="triple"), "sharing='triple'"),
        (dict(depth=56, shared_rank=16), "shared_rank=16"),
        (dict(depth=56, stem="imagenet"), "stem='imagenet'"),
        (dict(depth=34, stem="tiny"), "stem='tiny'"),
        (dict(depth=50, share=True, unique_rank=1), "unique_rank=1"),
        (dict(depth=56, input_shape=(32, 32)), r"input_shape=\(32, 32\)"),
        (dict(depth=56, input_shape=(4, 4, 3)), r"input_shape=\(4, 4, 3\)"),
        (dict(depth=34, input_shape=(16, 16, 3)), r"input_shape=\(16, 16, 3\)"),
        (dict(depth=56, num_classes=0), "num_classes=0"),
        (dict(depth=56, orthogonality=-1), "orthogonality=-1"),
        (dict(depth=56, preprocessing="bogus"), "preprocessing='bogus'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb_keras.ResNet(**kwargs)


def test_registry():
    names = sb_keras.list_models()
    assert len(names) == len(set(names)) > 40
    assert "resnet56_s16u1_double" in names
    assert sb_keras.list_models("resnet101*") == [
        "resnet101_imagenet",
        "resnet101_shared_double_imagenet",
        "resnet101_shared_imagenet",
    ]
    with pytest.raises(ValueError, match="name='resnet57'"):
        sb_keras.get_model("resnet57")
    info = sb_keras.model_info("resnet56_s0u16")
    assert info["shared_rank"] == 0 and info["unique_rank"] == 16


def test_summary_is_readable(capsys):
    sb_keras.ResNet(depth=14, share=True).summary(line_length=100)
    text = capsys.readouterr().out
    assert "stage1_basis (FilterBasis)" in text
    assert "BasisConv2D" in text


def test_no_machine_paths_in_package():
    root = os.path.join(os.path.dirname(__file__), "..", "sb_keras")
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    text = fh.read()
                assert "/work/" not in text and "/root/" not in text, f
