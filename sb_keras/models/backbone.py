"""The base class of every sb_keras model family, after keras-hub's Backbone.

A family (`sb_keras.ResNet`, `sb_keras.MobileNetV2`, `sb_keras.ACDCResNet`)
holds only its architecture: three class methods, ``_resolve`` (check the
constructor arguments and fill in the defaults, without building),
``_build_graph`` (the functional graph) and ``_default_name``. Its
``__init__`` lists and documents its arguments and hands them over with
``super().__init__(locals(), **kwargs)``. This class owns the rest:

* the config: the resolved constructor arguments plus ``name``,
  ``trainable``, the dtype policy (``"dtype"``) and the image data format
  (``"data_format"``), so ``.keras`` files and ``from_config`` rebuild the
  same model under the same policy and in the same format
  (``mixed_bfloat16`` stays ``mixed_bfloat16``, ``channels_first`` stays
  ``channels_first``, whatever the global settings of the loading process);
* argument checking before anything is built: unknown keyword arguments,
  the name, the dtype policy and the data format (the family's ``_resolve``
  checks its own);
  `resolve_config` runs the same checks without building;
* `from_preset` / `save_to_preset` (`sb_keras.presets`);
* `export`: ``format="litert"`` goes through `sb_keras.export`, which keeps
  each shared tensor once in the file; every other format is Keras's.
"""

import contextlib
import inspect

import keras

from sb_keras.models import arguments as checks

# Keyword arguments of `keras.Model` a family constructor passes through.
_MODEL_KWARGS = ("trainable",)
# Constructor arguments kept under another attribute name (`keras.Model`
# has an ``input_shape`` property of its own).
_ATTRIBUTE_NAMES = {"input_shape": "image_shape"}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_DATA_FORMATS = ("channels_last", "channels_first")
# LiteRT options of `export`, with their defaults (see `sb_keras.export`).
_LITERT_OPTIONS = {
    "layout": "decomposed",
    "quantize": "none",
    "representative_data": None,
    "int8_io": False,
    "per_channel": True,
    "strip_names": False,
    "activation_range": "minmax",
    "bias_correction": False,
}


def check_dtype(dtype):
    """The `keras.DTypePolicy` of a ``dtype`` argument (None: the global one)."""
    if dtype is None:
        return keras.config.dtype_policy()
    try:
        policy = keras.dtype_policies.get(dtype)
    except (ValueError, TypeError):
        policy = None
    if (
        policy is None
        or getattr(policy, "quantization_mode", None) is not None
        or policy.compute_dtype not in _FLOAT_DTYPES
    ):
        raise ValueError(
            "`dtype` must be None or a floating-point Keras dtype policy such as "
            "'float32', 'mixed_float16' or 'mixed_bfloat16' (quantize with "
            f"`model.quantize`). {checks.received('dtype', dtype)}"
        )
    return policy


def check_data_format(data_format, supported=_DATA_FORMATS, owner="The model"):
    """``"channels_last"``/``"channels_first"`` (None: the global format).

    Args:
        data_format: the argument.
        supported: the formats ``owner`` is written for.
        owner: who says so in the error message.
    """
    value = data_format
    if data_format is None:
        value = keras.config.image_data_format()
    elif isinstance(data_format, str):
        value = data_format.lower()
    if value not in _DATA_FORMATS:
        raise ValueError(
            f"`data_format` must be None or one of {_DATA_FORMATS}. "
            f"{checks.received('data_format', data_format)}"
        )
    if value not in supported:
        raise ValueError(
            f"{owner} supports data_format {' or '.join(map(repr, supported))} "
            "only (None takes keras.config.image_data_format()). "
            f"{checks.received('data_format', value)}"
        )
    return value


@contextlib.contextmanager
def _global_setting(get, set_, value):
    """Sets a Keras global with ``set_(value)`` for the body, then restores it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def data_format_scope(data_format):
    """Makes ``data_format`` the global image data format while building.

    The family builders and the layers they create read
    ``keras.config.image_data_format()`` (Keras's process-wide setting); the
    layers keep the format they were built with.
    """
    return _global_setting(
        keras.config.image_data_format, keras.config.set_image_data_format, data_format
    )


def policy_scope(policy):
    """Makes ``policy`` the global dtype policy while building a model.

    Keras's global policy is thread-local state, so this does not leak into
    other threads.
    """
    return _global_setting(
        keras.config.dtype_policy, keras.config.set_dtype_policy, policy
    )


def image_input(input_shape, preprocessing):
    """The model input and, after the optional pixel normalization, ``x``."""
    from sb_keras.layers import PixelNormalization
    from sb_keras.layers.preprocessing import get_normalization

    inputs = keras.Input(input_shape, name="image")
    if preprocessing is None:
        return inputs, inputs
    mean, std = get_normalization(preprocessing)
    return inputs, PixelNormalization(mean, std, name="preprocessing")(inputs)


class Backbone(keras.Model):
    """Base class of the sb_keras model families (functional models).

    Subclasses define ``_resolve(**arguments) -> dict`` (validated and
    resolved values; keys missing from it keep the value given),
    ``_build_graph(spec) -> (inputs, outputs)`` and ``_default_name(spec)``,
    all class methods, and an ``__init__`` whose explicit parameters are the
    constructor arguments (plus ``name``, ``dtype`` and ``data_format``)
    and which ends in
    ``super().__init__(locals(), **kwargs)``.

    Every resolved argument is also an attribute of the model (``depth``,
    ``share``, ...; ``input_shape`` is ``image_shape``). A family whose
    blocks are written for one layout narrows ``data_formats``.
    """

    # The image data formats the family's graph is written for.
    data_formats = _DATA_FORMATS

    def __init__(self, arguments, **kwargs):
        arguments = {
            k: v
            for k, v in arguments.items()
            if k not in ("self", "kwargs", "__class__")
        }
        prepared = self._prepare(arguments, kwargs)
        data_format = prepared["data_format"]
        with policy_scope(prepared["policy"]), data_format_scope(data_format):
            inputs, outputs = self._build_graph(prepared["spec"])
        super().__init__(
            inputs=inputs,
            outputs=outputs,
            name=prepared["name"],
            **prepared["model_kwargs"],
        )
        # Functional models ignore ``dtype``; the policy the layers were
        # built under is the model's (as keras-hub's Backbone).
        self.dtype_policy = prepared["policy"]
        self.data_format = data_format
        config = prepared["config"]
        object.__setattr__(self, "_sb_arguments", config)
        for key, value in config.items():
            setattr(self, _ATTRIBUTE_NAMES.get(key, key), value)

    @classmethod
    def _prepare(cls, arguments, kwargs):
        unknown = {k: v for k, v in kwargs.items() if k not in _MODEL_KWARGS}
        if unknown:
            listed = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
            raise ValueError(
                f"{cls.__name__} got unexpected keyword argument(s) "
                f"{sorted(unknown)}; its arguments are "
                f"{sorted([*arguments, *_MODEL_KWARGS])}. Received: {listed}"
            )
        model_kwargs = {
            k: checks.check_bool(k, v) for k, v in kwargs.items() if k in _MODEL_KWARGS
        }
        arguments = dict(arguments)
        name = arguments.pop("name", None)
        if name is not None and not (
            isinstance(name, str) and name and "/" not in name
        ):
            raise ValueError(
                "`name` must be None or a non-empty string without '/'. "
                f"{checks.received('name', name)}"
            )
        policy = check_dtype(arguments.pop("dtype", None))
        data_format = check_data_format(
            arguments.pop("data_format", None), cls.data_formats, cls.__name__
        )
        with data_format_scope(data_format):  # ``input_shape`` is in it
            resolved = cls._resolve(**arguments)
        spec = {**arguments, **resolved}
        return {
            "spec": spec,
            "config": {k: spec[k] for k in arguments},
            "name": name or cls._default_name(spec),
            "policy": policy,
            "data_format": data_format,
            "model_kwargs": model_kwargs,
        }

    @classmethod
    def resolve_config(cls, *args, **kwargs):
        """The config the constructor would build, checked, without building.

        Raises the constructor's ``ValueError`` for bad arguments; costs no
        layer or variable.

        Example:

        >>> import sb_keras
        >>> sb_keras.ResNet.resolve_config(56, share=True)["sharing"]
        'double'
        """
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError as e:
            raise ValueError(f"{e}. Received: args={args!r}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        extra = arguments.pop("kwargs", {})
        prepared = cls._prepare(arguments, extra)
        return {
            **prepared["config"],
            "name": prepared["name"],
            "trainable": prepared["model_kwargs"].get("trainable", True),
            "dtype": prepared["policy"].name,
            "data_format": prepared["data_format"],
        }

    # -- hooks of the families -------------------------------------------

    @classmethod
    def _resolve(cls, **arguments):
        raise NotImplementedError

    @classmethod
    def _build_graph(cls, spec):
        raise NotImplementedError

    @classmethod
    def _default_name(cls, spec):
        return None

    # -- config ------------------------------------------------------------

    def get_config(self):
        # Not chained to `keras.Model.get_config`: the functional graph is
        # rebuilt from the constructor arguments (sharing by construction).
        return {
            **self._sb_arguments,
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_policy.name,
            "data_format": self.data_format,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- presets -----------------------------------------------------------

    @classmethod
    def from_preset(cls, preset, load_weights=True, cache_dir=None):
        """A model from a preset name of `sb_keras.list_presets` or a directory.

        See `sb_keras.from_preset`; raises ``ValueError`` if the preset holds
        a model of another class.

        Example:

        >>> model = sb_keras.ResNet.from_preset(
        ...     "resnet56_s16u1_cifar10")  # doctest: +SKIP
        """
        from sb_keras import presets

        return presets.from_preset(
            preset, load_weights=load_weights, cache_dir=cache_dir, expected=cls
        )

    @classmethod
    def list_presets(cls):
        """Names of the built-in presets of this class."""
        from sb_keras import presets

        return presets.list_presets(cls)

    def save_to_preset(self, preset_dir, metadata=None):
        """Writes the model as a preset directory (see `sb_keras.save_to_preset`)."""
        from sb_keras import presets

        return presets.save_to_preset(self, preset_dir, metadata=metadata)

    # -- export ------------------------------------------------------------

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """Exports the model for inference; LiteRT keeps the sharing.

        ``format="litert"`` writes a ``.tflite`` file through
        `sb_keras.export` (builtin ops only, written atomically) in the
        layout that stores each shared basis once (``layout="decomposed"``,
        the default); Keras's own LiteRT export bakes one composed kernel
        per layer and loses the sharing. Every other format is Keras's
        `keras.Model.export`, unchanged.

        Args:
            filepath: the artifact to write (``.tflite`` for LiteRT).
            format: `"tf_saved_model"`, `"litert"`, or another format of
                `keras.Model.export`.
            verbose: print where the artifact was saved.
            input_signature: Keras's option; LiteRT here takes the model's
                own input (batch size resizable), so it must be None.
            **kwargs: for LiteRT, the options of `sb_keras.export.convert`:
                ``layout`` (`"decomposed"`, `"folded"` or `"auto"`, the
                measured choice of `sb_keras.export.choose_layout`),
                ``quantize``, ``representative_data``, ``int8_io``,
                ``per_channel``, ``strip_names``, ``activation_range``,
                ``bias_correction``. Other formats: Keras's options.

        Returns:
            For LiteRT, the flatbuffer bytes.

        Example:

        >>> model = sb_keras.get_model("resnet56_s16u1_double")
        >>> model.export("resnet56.tflite", format="litert")  # doctest: +SKIP
        """
        if format != "litert":
            return super().export(
                filepath,
                format=format,
                verbose=verbose,
                input_signature=input_signature,
                **kwargs,
            )
        unknown = {k: v for k, v in kwargs.items() if k not in _LITERT_OPTIONS}
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(
                "LiteRT export of sb_keras models takes the options "
                f"{sorted(_LITERT_OPTIONS)} (converter options of Keras's own "
                "export are not used). "
                f"{checks.received(key, unknown[key])}"
            )
        if input_signature is not None:
            raise ValueError(
                "LiteRT export uses the model's own input. "
                f"{checks.received('input_signature', input_signature)}"
            )
        options = {**_LITERT_OPTIONS, **kwargs}
        content, layout = _export_litert(self, filepath, options)
        if verbose is not False:
            print(f"Saved artifact at '{filepath}' (layout {layout!r}).")
        return content


def _export_litert(model, filepath, options):
    """Folds ``model`` in the chosen layout and converts it; (bytes, layout)."""
    from sb_keras.export import folding
    from sb_keras.export import pipeline
    from sb_keras.export import tflite

    layout = options.pop("layout")
    choices = (*folding.LAYOUTS, "auto")
    if not (isinstance(layout, str) and layout in choices):
        raise ValueError(
            f"`layout` must be one of {choices}. {checks.received('layout', layout)}"
        )
    tflite.check_output_path(filepath)
    if layout == "auto":
        layout, _ = pipeline.choose_layout(model)
    content = tflite.convert(folding.fold_model(model, layout), filepath, **options)
    return content, layout
