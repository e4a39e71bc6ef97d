"""Parameter counts equal the authors' code exactly (method.md §3.3) and MACs
are within 1 % of the reference table. The reference numbers were computed
from the authors' PyTorch layer definitions, independently of sb_keras."""

import pytest

import sb_keras

# name, params, MACs in millions
TABLE = [
    # CIFAR-10 ResNets
    ("resnet20", 269_722, 40.6),
    ("resnet32", 464_154, 68.9),
    ("resnet56", 853_018, 125.5),
    ("resnet110", 1_727_962, 252.9),
    ("resnet32_s8u1", 150_666, 47.6),
    ("resnet32_s8u1_double", 174_858, 47.6),
    ("resnet32_s16u1", 197_258, 79.1),
    ("resnet32_s16u1_double", 245_642, 79.1),
    ("resnet56_s8u1", 201_850, 83.0),
    ("resnet56_s8u1_double", 226_042, 83.0),
    ("resnet56_s16u1", 270_842, 145.9),
    ("resnet56_s16u1_double", 319_226, 145.9),
    ("resnet56_s32u1", 408_826, 271.8),
    ("resnet56_s32u1_double", 505_594, 271.8),
    ("resnet56_s16u0_double", 265_242, 138.1),  # SharedOnly, two bases
    ("resnet56_s0u16", 942_618, 138.1),  # NonShared
    # CIFAR-100 ResNet-18/34
    ("resnet18_cifar", 11_220_132, 556.0),
    ("resnet34_cifar", 21_328_292, 1159.0),
    ("resnet34_s8u1_cifar", 5_865_428, 395.0),
    ("resnet34_s16u1_cifar", 6_485_844, 521.0),
    ("resnet34_s32u1_cifar", 7_726_676, 773.0),
    ("resnet34_s16u0_cifar", 6_201_508, 505.0),
    ("resnet34_s32u0_cifar", 7_442_340, 757.0),
    ("resnet34_s0u16_cifar", 9_510_052, 505.0),
    ("resnet34_s0u32_cifar", 14_059_428, 757.0),
    # ILSVRC
    ("resnet18_imagenet", 11_689_512, 1814.0),
    ("resnet34_imagenet", 21_797_672, 3664.0),
    ("resnet34_s32u1_imagenet", 8_196_056, 2479.0),
    ("resnet34_s32u1_double_imagenet", 9_762_776, 2479.0),
    ("resnet34_s48u1_imagenet", 9_436_888, 3250.0),
    ("resnet34_s48u1_double_imagenet", 11_786_968, 3250.0),
    ("resnet50_imagenet", 25_557_032, 4089.0),
    ("resnet50_shared_imagenet", 20_506_664, 4089.0),
    ("resnet50_shared_double_imagenet", 18_262_056, 4089.0),
    ("resnet101_imagenet", 44_549_160, 7801.0),
    ("resnet101_shared_imagenet", 29_471_784, 7801.0),
    ("resnet101_shared_double_imagenet", 22_770_728, 7801.0),
]


def _param(row):
    # The big ImageNet models take ~10 s each to build: slow step.
    big = row[0].startswith(("resnet50", "resnet101"))
    return pytest.param(*row, id=row[0], marks=[pytest.mark.slow] if big else [])


@pytest.mark.parametrize("name,params,macs", [_param(r) for r in TABLE])
def test_counts_match_reference(name, params, macs):
    model = sb_keras.get_model(name)
    assert model.name == name
    assert sb_keras.count_params(model) == params
    assert abs(sb_keras.count_macs(model) / 1e6 / macs - 1) < 0.01


@pytest.mark.slow
def test_ranks_scale_per_stage():
    """ResNet34-S16U{2,4,8,16} counts of the authors' ablation graph."""
    for u, expected_m in [(2, 6.770), (4, 7.339), (8, 8.476), (16, 10.751)]:
        model = sb_keras.ResNet(
            depth=34, stem="cifar", share=True, shared_rank=16, unique_rank=u
        )
        assert round(sb_keras.count_params(model) / 1e6, 3) == expected_m


def test_count_table_against_baseline():
    table = sb_keras.count_table(["resnet20_s16u1_double"])
    row = table.splitlines()[2]
    assert "resnet20_s16u1_double" in row and "resnet20 " in row
    params = sb_keras.count_params(sb_keras.get_model("resnet20_s16u1_double"))
    ratio = params / 269_722
    assert f"{ratio:.3f}" in row
