"""Constructor arguments are checked, not guessed (issue 11, item 5).

Each case of the issue is a test, and a property-based test (hypothesis,
about a minute) draws arguments for `ResNet`, `MobileNetV2`, `ACDCResNet`
and `get_model`: every call either builds or raises ``ValueError`` whose
message names a passed argument ("Received: arg=value"). To keep it cheap,
the constructor's checks run first through ``resolve_config`` (the same
code, without building); configurations that pass are built when small.
"""

import inspect
import re
import time

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import sb_keras

RECEIVED = re.compile(r"Received: (\w+)=")


@pytest.mark.parametrize(
    "cls,kwargs,named",
    [
        (
            sb_keras.ResNet,
            dict(depth=20, share=True, sharring="single", shared_rnak=8),
            "sharring",
        ),
        (sb_keras.ResNet, dict(depth=20, share="no"), "share"),
        (sb_keras.ResNet, dict(depth=20, share=1), "share"),
        (sb_keras.ResNet, dict(depth=20, include_top="yes"), "include_top"),
        (sb_keras.ResNet, dict(depth=20, orthogonality=float("nan")), "orthogonality"),
        (sb_keras.ResNet, dict(depth=20, orthogonality=float("inf")), "orthogonality"),
        (sb_keras.ResNet, dict(depth=20, orthogonality="10"), "orthogonality"),
        (sb_keras.ResNet, dict(depth=20, orthogonality_include_unique=0), None),
        (sb_keras.ResNet, dict(depth=20, num_classes=10**9), "num_classes"),
        (sb_keras.ResNet, dict(depth=20, input_shape=(32, 32, 10**6)), "input_shape"),
        (sb_keras.ResNet, dict(depth=20, classifier_activation="relux"), None),
        (sb_keras.ResNet, dict(depth=20, preprocessing=["imagenet"]), None),
        (sb_keras.ResNet, dict(depth=20, dtype="int8"), "dtype"),
        (sb_keras.ResNet, dict(depth=20, name=""), "name"),
        (sb_keras.ResNet, dict(depth=20, trainable="no"), "trainable"),
        (sb_keras.MobileNetV2, dict(alpha=float("inf")), "alpha"),
        (sb_keras.MobileNetV2, dict(alpha="1.0"), "alpha"),
        (sb_keras.MobileNetV2, dict(alpha=1000.0), "alpha"),
        (sb_keras.MobileNetV2, dict(share="no"), "share"),
        (sb_keras.MobileNetV2, dict(dropout=float("nan")), "dropout"),
        (sb_keras.MobileNetV2, dict(variant="cifar", widht=2), "widht"),
        (sb_keras.ACDCResNet, dict(depth=20, batchnorm="true"), "batchnorm"),
        (sb_keras.ACDCResNet, dict(depth=20, decompose_shortcuts=1), None),
        (sb_keras.ACDCResNet, dict(depth=20, num_atoms=10**6), "num_atoms"),
        (sb_keras.ACDCResNet, dict(depth=20, atom_initializer="nope"), None),
        (sb_keras.ACDCResNet, dict(sharing="network", group_size=5), "group_size"),
    ],
)
def test_bad_arguments_raise_before_building(cls, kwargs, named):
    named = named or next(k for k in kwargs if k != "depth")
    with pytest.raises(ValueError, match=f"Received: .*{named}="):
        cls(**kwargs)
    with pytest.raises(ValueError, match=f"Received: .*{named}="):
        cls.resolve_config(**kwargs)


def test_absurd_depth_fails_fast_with_its_bound():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"\[8, 1202\]. Received: depth=12002"):
        sb_keras.ResNet(depth=12002, share=True)
    with pytest.raises(ValueError, match="Received: depth=12002"):
        sb_keras.ACDCResNet(depth=12002)
    assert time.perf_counter() - start < 2.0


def test_get_model_name_errors_are_value_errors():
    with pytest.raises(ValueError, match="Received: name=56"):
        sb_keras.get_model(56)
    with pytest.raises(ValueError, match=r"Received: name=\['resnet20'\]"):
        sb_keras.get_model(["resnet20"])
    with pytest.raises(ValueError, match="Received: name='mine'"):
        sb_keras.get_model("resnet20", name="mine")
    with pytest.raises(ValueError, match="Received: sharring='double'"):
        sb_keras.get_model("resnet20", sharring="double")
    model = sb_keras.get_model(name="resnet20_s8u1")  # keyword form
    assert model.name == "resnet20_s8u1"


def test_numpy_scalars_and_resolved_config():
    model = sb_keras.ResNet(
        depth=np.int64(14), share=np.bool_(True), orthogonality=np.float32(2)
    )
    config = model.get_config()
    assert config["depth"] == 14 and type(config["depth"]) is int
    assert config["share"] is True and config["orthogonality"] == 2.0
    assert config == sb_keras.ResNet.resolve_config(
        depth=np.int64(14), share=np.bool_(True), orthogonality=np.float32(2)
    )


# ---------------------------------------------------------------------------
# Property: build or a ValueError naming a passed argument
# ---------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-1, 40), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(
        ["auto", "single", "double", "cifar", "imagenet", "network", "stage",
         "layer", "kernel", "atoms", "relu", "softmax", "cifar100",
         "he_normal", "mixed_bfloat16", "float64", "int32"]
    ),
)  # fmt: skip


def arg(*values):
    """Mostly the listed values (valid or not), sometimes anything."""
    listed = st.sampled_from(values)
    return st.sampled_from(range(8)).flatmap(lambda i: JUNK if i == 7 else listed)


COMMON = {
    "num_classes": arg(None, 3, 10),
    "input_shape": arg(None, (32, 32, 3), (16, 24, 1), (None, None, 3), (7, 7, 3)),
    "include_top": arg(True, False),
    "classifier_activation": arg(None, "softmax"),
    "preprocessing": arg("auto", None, "cifar10", "imagenet"),
    "name": arg(None, "m"),
    "dtype": arg(None, "float32", "mixed_bfloat16"),
    "trainable": arg(True, False),
}
TYPOS = st.sampled_from(range(6)).flatmap(
    lambda i: (
        st.dictionaries(
            st.sampled_from(["sharring", "shared_rnak", "deph", "widht"]),
            JUNK,
            min_size=1,
            max_size=1,
        )
        if i == 0
        else st.just({})
    )
)
RESNET = {
    "depth": arg(14, 8, 14, 20, 18, 50, 12002, 21),
    "share": arg(True, False),
    "shared_rank": arg(None, 0, 4, 200),
    "unique_rank": arg(None, 0, 1),
    "sharing": arg(None, "single", "double"),
    "stem": arg(None, "cifar", "imagenet"),
    "orthogonality": arg(10.0, 0, -1.0),
    "orthogonality_include_unique": arg(False, True),
    **COMMON,
}
MOBILENET = {
    "variant": arg("cifar", "cifar", "imagenet"),
    "share": arg(True, True, False),
    "sharing": arg(None, None, "single", "double"),
    "alpha": arg(0.35, 0.25, 0.25, 1.0, 0),
    "dropout": arg("auto", 0.0, 0.5, 1.0),
    "orthogonality": arg(10.0, 0),
    **COMMON,
}
ACDC = {
    "depth": arg(8, 14, 14, 20, 18, 34, 50),
    "sharing": arg(None, "layer", "stage", "network"),
    "num_atoms": arg(1, 6, 9),
    "group_size": arg(None, 4, 8, 16, 5),
    "stem": arg(None, "cifar", "imagenet"),
    "decompose_shortcuts": arg(None, True, False),
    "batchnorm": arg(True, False),
    "route": arg("auto", "atoms", "kernel"),
    "atom_initializer": arg(None, "he_normal"),
    "coefficient_initializer": arg(None, "glorot_uniform"),
    **COMMON,
}


def budget(examples):
    """Hypothesis settings: deterministic, ``examples`` draws (about a minute
    for the four properties together on an idle 2-core machine)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )


def _small(config):
    shape = config["input_shape"]
    if any(d is not None and d > 48 for d in shape[:2]):
        return False
    if "variant" in config:  # MobileNetV2
        return config["variant"] == "cifar" and config["alpha"] <= 0.25
    return config["stem"] == "cifar" and config["depth"] <= 14


def check_call(cls, kwargs):
    """``cls(**kwargs)`` builds, or raises ValueError naming an argument."""
    try:
        config = cls.resolve_config(**kwargs)
    except ValueError as e:
        named = RECEIVED.findall(str(e))
        assert named and set(named) <= set(kwargs), (str(e), kwargs)
        with pytest.raises(ValueError) as built:  # the same check, unbuilt
            cls(**kwargs)
        assert str(built.value) == str(e)
        return "refused"
    if not _small(config):
        return "valid"
    assert cls(**kwargs).get_config() == config
    keras.backend.clear_session()
    return "built"


def _property(cls, space, always, examples):
    outcomes = []
    # The size arguments are always drawn (mostly small), the rest optional.
    required = {k: v for k, v in space.items() if k in always}
    optional = {k: v for k, v in space.items() if k not in always}

    @budget(examples)
    @given(st.fixed_dictionaries(required, optional=optional), TYPOS)
    def run(kwargs, typos):
        outcomes.append(check_call(cls, {**kwargs, **typos}))

    run()
    # Both sides of the property were exercised.
    assert outcomes.count("refused") >= 5 and outcomes.count("built") >= 3, outcomes


def test_property_resnet():
    _property(sb_keras.ResNet, RESNET, ["depth"], 80)


def test_property_mobilenet_v2():
    _property(sb_keras.MobileNetV2, MOBILENET, ["variant", "alpha"], 30)


def test_property_acdc_resnet():
    _property(sb_keras.ACDCResNet, ACDC, ["depth"], 30)


CHEAP_NAMES = [
    *sb_keras.list_models("resnet14*"),
    *sb_keras.list_models("resnet20_s8u1*"),
    "acdc_resnet20_stage",
]


@budget(20)
@given(
    st.one_of(st.sampled_from(CHEAP_NAMES), JUNK),
    st.fixed_dictionaries(
        {},
        optional={
            "num_classes": arg(5, 0),
            "share": arg(True, False),
            "name": arg("renamed"),
            "orthogonality": arg(1.0, float("nan")),
            "bogus": JUNK,
        },
    ),
)
def test_property_get_model(name, overrides):
    try:
        sb_keras.get_model(name, **overrides)
    except ValueError as e:
        named = RECEIVED.findall(str(e))
        entry = sb_keras.model_info(name) if name in CHEAP_NAMES else {}
        assert named and set(named) <= {*overrides, *entry, "name"}, str(e)
    keras.backend.clear_session()


def test_signatures_list_name_and_dtype():
    for cls in (sb_keras.ResNet, sb_keras.MobileNetV2, sb_keras.ACDCResNet):
        params = inspect.signature(cls).parameters
        assert "name" in params and "dtype" in params
