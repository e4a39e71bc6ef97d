"""A registry of named model variants: one line per variant.

Names read like the paper: ``resnet56`` (plain), ``resnet56_s16u1``
(S16U1, single sharing), ``resnet56_s16u1_double`` (the paper's "*" models),
``resnet34_s48u1_double_imagenet``, ``resnet50_shared_imagenet``.
"""

import fnmatch

_REGISTRY = {}


def register(name, builder, description, **kwargs):
    """Registers ``builder(**kwargs)`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"Model name already registered. Received: name={name!r}")
    _REGISTRY[name] = {"builder": builder, "kwargs": kwargs, "description": description}


def list_models(pattern=None):
    """Sorted registered names, optionally filtered by a glob ``pattern``.

    Example:

    >>> import sb_keras
    >>> "resnet56_s16u1_double" in sb_keras.list_models("resnet56*")
    True
    """
    _ensure_registered()
    names = sorted(_REGISTRY, key=_natural_key)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_info(name):
    """The description and constructor arguments of a registered name."""
    _ensure_registered()
    _check_name(name)
    entry = _REGISTRY[name]
    return {
        "name": name,
        "description": entry["description"],
        "class": entry["builder"].__name__,
        **entry["kwargs"],
    }


def get_model(name=None, /, **overrides):
    """Builds the registered variant ``name``; ``overrides`` change its args.

    The model is named after the variant; ``name`` cannot be overridden
    (rename a model with ``keras.Model(model.inputs, model.outputs,
    name=...)`` or build the class directly).

    Example:

    >>> import sb_keras
    >>> model = sb_keras.get_model("resnet20_s16u1_double", num_classes=5)
    >>> model.output.shape[-1]
    5
    """
    if name is None and "name" in overrides:  # get_model(name="resnet20")
        name = overrides.pop("name")
    elif "name" in overrides:
        raise ValueError(
            "`get_model` names the model after its registry entry; build the "
            f"class directly to choose another name. Received: "
            f"name={overrides['name']!r}"
        )
    _ensure_registered()
    _check_name(name)
    entry = _REGISTRY[name]
    kwargs = {**entry["kwargs"], **overrides}
    kwargs.setdefault("name", name)
    return entry["builder"](**kwargs)


def _check_name(name):
    if not isinstance(name, str) or name not in _REGISTRY:
        close = []
        if isinstance(name, str):
            close = [n for n in _REGISTRY if n.startswith(name.split("_")[0])]
        hint = f" Similar names: {', '.join(sorted(close)[:8])}." if close else ""
        raise ValueError(
            f"Unknown model name. See sb_keras.list_models().{hint} "
            f"Received: name={name!r}"
        )


def _natural_key(name):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


_REGISTERED = False


def _ensure_registered():
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from sb_keras.models.resnet import ResNet

    for depth in (20, 32, 44, 56, 110):
        register(
            f"resnet{depth}",
            ResNet,
            f"CIFAR-10 ResNet-{depth} (option-A shortcuts)",
            depth=depth,
        )
        ranks = [(8, 1), (16, 1)] + ([(32, 1)] if depth == 56 else [])
        for s, u in ranks:
            for sharing in ("single", "double"):
                suffix = "_double" if sharing == "double" else ""
                register(
                    f"resnet{depth}_s{s}u{u}{suffix}",
                    ResNet,
                    f"CIFAR-10 ResNet-{depth}-S{s}U{u}"
                    f"{'*' if suffix else ''} ({sharing} sharing)",
                    depth=depth,
                    share=True,
                    shared_rank=s,
                    unique_rank=u,
                    sharing=sharing,
                )
    register(
        "resnet56_s16u0_double",
        ResNet,
        "CIFAR-10 ResNet-56 SharedOnly S16 (two bases, ablation)",
        depth=56,
        share=True,
        shared_rank=16,
        unique_rank=0,
        sharing="double",
    )
    register(
        "resnet56_s0u16",
        ResNet,
        "CIFAR-10 ResNet-56 NonShared U16 (ablation)",
        depth=56,
        share=True,
        shared_rank=0,
        unique_rank=16,
        sharing="single",
    )
    for depth in (18, 34):
        register(
            f"resnet{depth}_cifar",
            ResNet,
            f"CIFAR-100 ResNet-{depth} (3x3 stem, projection shortcuts)",
            depth=depth,
            stem="cifar",
        )
    for s, u in [(8, 1), (16, 1), (32, 1), (16, 0), (32, 0), (0, 16), (0, 32)]:
        register(
            f"resnet34_s{s}u{u}_cifar",
            ResNet,
            f"CIFAR-100 ResNet-34-S{s}U{u} (single sharing)",
            depth=34,
            stem="cifar",
            share=True,
            shared_rank=s,
            unique_rank=u,
            sharing="single",
        )
    for depth in (18, 34, 50, 101, 152):
        register(
            f"resnet{depth}_imagenet",
            ResNet,
            f"ImageNet ResNet-{depth}",
            depth=depth,
            stem="imagenet",
        )
    for s in (32, 48):
        for sharing in ("single", "double"):
            suffix = "_double" if sharing == "double" else ""
            register(
                f"resnet34_s{s}u1{suffix}_imagenet",
                ResNet,
                f"ImageNet ResNet-34-S{s}U1{'*' if suffix else ''}",
                depth=34,
                stem="imagenet",
                share=True,
                shared_rank=s,
                unique_rank=1,
                sharing=sharing,
            )
    for depth in (50, 101):
        register(
            f"resnet{depth}_shared_imagenet",
            ResNet,
            f"ImageNet ResNet-{depth}-Shared (3x3 kernels shared; "
            "authors' SharedSingle)",
            depth=depth,
            stem="imagenet",
            share=True,
            sharing="single",
        )
        register(
            f"resnet{depth}_shared_double_imagenet",
            ResNet,
            f"ImageNet ResNet-{depth}-Shared++ (3x3 and last 1x1 shared)",
            depth=depth,
            stem="imagenet",
            share=True,
            sharing="double",
        )
    from sb_keras.models.mobilenet_v2 import MobileNetV2

    for variant, data in (("imagenet", "ImageNet"), ("cifar", "CIFAR-100")):
        register(
            f"mobilenet_v2_{variant}",
            MobileNetV2,
            f"{data} MobileNetV2 (authors' layout)",
            variant=variant,
        )
        register(
            f"mobilenet_v2_shared_{variant}",
            MobileNetV2,
            f"{data} MobileNetV2-Shared (expansion 1x1 shared per stage)",
            variant=variant,
            share=True,
            sharing="single",
        )
        register(
            f"mobilenet_v2_shared_double_{variant}",
            MobileNetV2,
            f"{data} MobileNetV2-SharedDouble (expansion and projection shared)",
            variant=variant,
            share=True,
            sharing="double",
        )

    _register_acdc()


def _register_acdc():
    """ACDC ResNets (Wang et al.): atoms per layer, coefficients per scope."""
    from sb_keras.models.acdc_resnet import ACDCResNet

    scopes = ("network", "stage", "layer")
    for depth in (20, 32, 44, 56, 110):
        for sharing in scopes:
            register(
                f"acdc_resnet{depth}_{sharing}",
                ACDCResNet,
                f"CIFAR-10 ResNet-{depth}-ACDC, coefficients shared per {sharing}",
                depth=depth,
                sharing=sharing,
            )
    for stem, data in (("cifar", "CIFAR-100"), ("imagenet", "ImageNet")):
        for depth in (18, 34):
            for sharing in scopes:
                register(
                    f"acdc_resnet{depth}_{sharing}_{stem}",
                    ACDCResNet,
                    f"{data} ResNet-{depth}-ACDC, coefficients shared per {sharing}",
                    depth=depth,
                    stem=stem,
                    sharing=sharing,
                )
