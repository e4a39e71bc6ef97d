"""`rebalance`: same inference function, kernels at He norms, SGD-stable.

The folded plain ResNet of a shared network has filters far smaller than
SGD trains them; conv -> BN is scale-invariant, so its steps are far too
large for their size. `rebalance` moves the scale into the BN.
"""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.compression import rebalance
from sb_keras.layers import BasisConv2D
from tests.conftest import shared_path


def _randomize(model, rng, kernel_scale):
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(
                rng.normal(0, kernel_scale, layer.kernel.shape).astype("float32")
            )
        if isinstance(layer, BasisConv2D):
            layer.coefficients.assign(
                rng.normal(0, kernel_scale, layer.coefficients.shape).astype("float32")
            )
            bns = [layer.basis_bn, layer.bn]
        elif isinstance(layer, keras.layers.BatchNormalization):
            bns = [layer]
        else:
            continue
        for bn in bns:
            c = bn.moving_mean.shape[0]
            # Variances of the order of eps: the gamma correction matters.
            bn.moving_variance.assign(rng.uniform(1e-6, 1e-3, c).astype("float32"))
            bn.moving_mean.assign(rng.normal(0, 1e-2, c).astype("float32"))
            bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            bn.beta.assign(rng.normal(0, 0.1, c).astype("float32"))


@pytest.mark.parametrize("share", [False, True])
def test_same_function_and_he_norms(share):
    rng = np.random.default_rng(0)
    model = sb_keras.ResNet(8, share=share)
    _randomize(model, rng, kernel_scale=1e-3)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    assert rebalance(model) > 0
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max()
    )
    for layer in model.layers:
        if type(layer) is keras.layers.Conv2D and not layer.use_bias:
            k = np.asarray(layer.kernel)
            norms = np.linalg.norm(k.reshape(-1, k.shape[-1]), axis=0)
            target = np.sqrt(2.0 * k.shape[2] / k.shape[3])
            np.testing.assert_allclose(norms, target, rtol=1e-5)
        if isinstance(layer, BasisConv2D):
            a = np.asarray(layer.coefficients)[0, 0]
            norms = np.linalg.norm(a, axis=0)
            np.testing.assert_allclose(
                norms, np.sqrt(2.0 * a.shape[0] / a.shape[1]), rtol=1e-5
            )


@pytest.mark.slow
def test_folded_authors_resnet_fine_tunes_at_usual_learning_rate():
    """16 SGD steps at lr 0.01: top-1 holds; without rebalancing it collapses."""
    data = shared_path("datasets", "cifar10", "lossless_subset.npz")
    checkpoint = shared_path(
        "pretrained", "net_rl2", "CIFAR10_ResNet32_Double_S16U1_6.93err.pth"
    )
    with np.load(data) as f:
        x, y = f["x_test"][:500].astype("float32"), f["y_test"][:500]
        xt, yt = f["x_train"][:2048].astype("float32"), f["y_train"][:2048]
    plain = sb_keras.unshare(sb_keras.load_authors_checkpoint(checkpoint))
    results = {}
    for name in ("rebalanced", "as folded"):
        model = plain if name == "rebalanced" else _unbalanced(checkpoint)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = model.evaluate(x, y, verbose=0)[1]
        model.fit(xt, yt, batch_size=128, epochs=1, verbose=0, shuffle=False)
        results[name] = (start, model.evaluate(x, y, verbose=0)[1])
    start, end = results["rebalanced"]
    assert start > 0.85 and end > start - 0.06, results
    assert results["as folded"][1] < end - 0.2, results  # the problem is real


def _unbalanced(checkpoint):
    """The folded plain ResNet without rebalancing (undone per layer)."""
    from sb_keras.compression import resnet as cr

    shared = sb_keras.load_authors_checkpoint(checkpoint)
    target = sb_keras.ResNet(**shared.baseline_config())
    cr._copy_unshared_into_plain(shared, target)
    return target
