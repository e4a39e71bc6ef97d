"""Authors' key layout (CIFAR-100 DenseNet/ResNeXt): writer -> reader round trip."""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.checkpoints import densenext
from sb_keras.checkpoints.reader import CheckpointError
from sb_keras.checkpoints.reader import read_state_dict
from tests.test_densenet import small as small_densenet
from tests.test_resnext import small as small_resnext

MODELS = {
    "densenet_authors": lambda: small_densenet(
        share=True, shared_rank=8, unique_rank=2, authors_layout=True
    ),
    "densenet_plain": lambda: small_densenet(),
    "resnext": lambda: small_resnext(share=True, shared_rank=8, unique_rank=4),
    "resnext_plain": lambda: small_resnext(),
}


def pixels(n):
    return np.random.RandomState(0).uniform(0, 255, (n, 16, 16, 3)).astype("float32")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_writer_reader_round_trip(name, tmp_path):
    model = MODELS[name]()
    x = pixels(4)
    model(x, training=True)  # BN statistics
    path = tmp_path / f"{name}.pth"
    densenext.save_state_dict(model, path)
    keras.utils.set_random_seed(99)  # other initial weights
    clone = MODELS[name]()
    sd = read_state_dict(path)
    densenext.load_state_dict(clone, sd)
    np.testing.assert_array_equal(
        np.asarray(clone(x, training=False)), np.asarray(model(x, training=False))
    )
    assert "linear.weight" in sd and "conv1.weight" in sd
    # The parameters of the authors' module: per-layer basis copies are the
    # same tensor, BN statistics are buffers.
    params = sum(
        v.size
        for k, v in sd.items()
        if not k.endswith((".shared_basis.weight", "running_mean", "running_var"))
        and not k.endswith("num_batches_tracked")
    )
    assert params == sb_keras.count_params(model)
    if name == "densenet_authors":
        # Block 4 (index 3) holds block 3's basis; shared_basis_4 unused.
        key = "features.dense_block_layer_3.bottle_neck_layer_0.shared_basis.weight"
        np.testing.assert_array_equal(sd[key], sd["shared_basis_3.weight"])
        assert not np.array_equal(sd[key], sd["shared_basis_4.weight"])
    if name == "resnext":
        np.testing.assert_array_equal(
            sd["layer2.1.shared_basis.weight"], sd["shared_basis_2.weight"]
        )
        assert sd["shared_basis_2.weight"].shape == (16, 16, 3, 3)  # grouped


def test_inconsistent_basis_copies_and_extra_keys_are_refused():
    model = MODELS["resnext"]()
    sd = densenext.state_dict(model)
    bad = dict(sd)
    bad["layer1.1.shared_basis.weight"] = sd["layer1.1.shared_basis.weight"] + 1.0
    with pytest.raises(CheckpointError, match="layer1.1.shared_basis"):
        densenext.load_state_dict(MODELS["resnext"](), bad)
    extra = dict(sd, surplus=np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="surplus"):
        densenext.load_state_dict(MODELS["resnext"](), extra)
    densenext.load_state_dict(MODELS["resnext"](), extra, strict=False)
