"""The ACDC convolution: per-layer 2-D atoms x (shared) coefficients."""

import math

import keras
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.layers.acdc_coefficients import ACDCCoefficients
from sb_keras.layers.common import channel_axis
from sb_keras.layers.common import check_int_tuple
from sb_keras.layers.common import check_padding
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import image_input_spec
from sb_keras.layers.common import split_kernel_inputs
from sb_keras.layers.common import standardize_data_format
from sb_keras.layers.common import to_channels_last

ROUTES = ("auto", "atoms", "kernel")
# The atom route runs two convolutions and two transposes of activations.
# On the 2-core CPU (TF 2.21, oneDNN; bench/acdc_routes.py, one training
# step) it wins when it needs at least 3x fewer MACs *and* the output is at
# most 16x16 positions (e.g. 3.2-4.1x faster for 512 channels at 4x4, m=8,
# groups of 64); on larger maps the activation transposes dominate (0.7x
# at 32x32 with a 3.9x MAC saving). Otherwise the kernel route is used.
ATOM_ROUTE_MIN_SAVING = 3.0
ATOM_ROUTE_MAX_POSITIONS = 256


def route_macs(in_channels, filters, num_atoms, in_group, out_group, kernel_size):
    """MACs per output position of both routes: ``(atoms, kernel)``.

    Atom route: ``C * (F / g_out) * m * k^2`` for the atom convolution plus
    ``F * g_in * m`` for the mixing. Kernel route: ``k^2 * C * F``.
    ``kernel_size`` is an int or a ``(kh, kw)`` tuple (``k^2 = kh * kw``).
    """
    kh, kw = check_int_tuple("kernel_size", kernel_size)
    k2 = kh * kw
    atoms = in_channels * (filters // out_group) * num_atoms * k2
    atoms += filters * in_group * num_atoms
    return atoms, k2 * in_channels * filters


@sb_export("sb_keras.layers.ACDCConv2D")
class ACDCConv2D(keras.layers.Layer):
    """A convolution whose kernel is 2-D atoms mixed by ACDC coefficients.

    Every kernel slice is ``W[:, :, i, o] = sum_j alpha[i, o, j] * D_j``: a
    few ``k x k`` atoms ``D`` and coefficients ``alpha``. Call the layer on
    ``[x, alpha]`` with ``alpha`` the output of an `ACDCCoefficients` layer
    (shared by a stage or by the whole network, the layer keeping only its
    atoms), or on ``x`` alone: the layer then owns its coefficients (ACDC's
    unshared layer, ``m k^2 + C F m`` parameters by default).

    **Channel groups.** With ``alpha`` of shape ``(g_in, g_out, m)``, a
    layer with ``C`` inputs and ``F`` outputs (multiples of ``g_in`` and
    ``g_out``) is a grid of ``(C / g_in) x (F / g_out)`` sub-convolutions,
    input block ``a`` to output block ``b``, each mixing with the same
    ``alpha`` and each with its own ``m`` atoms ``D[a, b]``::

        W[:, :, a*g_in + i, b*g_out + o] = sum_j alpha[i, o, j] D[a, b, j]

    The atoms variable has shape ``(k, k, m, C / g_in, F / g_out)``. Atoms
    per block (not one set per layer) are needed: with one set, output
    channels ``o`` and ``o + g_out`` would be identical and inputs ``i`` and
    ``i + g_in`` indistinguishable. The paper states the grouping, not this
    detail; it is our choice.

    **Two routes, one result.** ``"kernel"`` composes ``W`` (an einsum over
    a few thousand numbers) and runs one convolution; ``"atoms"`` convolves
    the input blocks with the atoms and mixes the responses with ``alpha``
    (a 1x1 convolution), which costs ``C (F/g_out) m k^2 + F g_in m`` MACs
    per position instead of ``k^2 C F``. ``"auto"`` takes the atom route
    when it saves at least ``ATOM_ROUTE_MIN_SAVING`` (3) times the MACs and
    the output has at most ``ATOM_ROUTE_MAX_POSITIONS`` (16x16) positions,
    the break-even measured on a 2-core CPU (`bench/acdc_routes.py`): in
    an ACDC ResNet-18 the last stage runs the atom route. The choice is
    made at build from the static shapes (unknown sizes: kernel route).
    The routes share their variables, so a model can be rebuilt with
    another ``route`` and take the same weights. For a small TFLite file
    export with ``route="atoms"``: the converter folds the kernel route
    into full composed kernels (int8 CIFAR ResNet-20, network scope: 297
    KiB with the kernel route, 76 KiB with the atom route, 294 KiB plain).

    **Conv2D's arguments.** ``kernel_size``/``strides`` take an int or a
    tuple, ``padding`` is case-insensitive, ``data_format`` follows
    ``keras.config.image_data_format()``, and ``use_bias`` defaults to
    `True` as in ``keras.layers.Conv2D``: on its own the layer is a
    drop-in convolution; the ACDC ResNets pass ``use_bias=False`` where a
    BatchNorm follows (its ``beta`` is the bias). ``dilation_rate`` is
    deliberately not supported (the atom route would need a dilated
    grouped reshuffle; nothing in ACDC uses it): only `1` is accepted.

    Args:
        filters: output channels ``F``.
        kernel_size: atom size ``k``, an int or a tuple of two. Defaults to
            `3`.
        strides: strides, an int or a tuple of two. Defaults to `1`.
        padding: `"same"` or `"valid"` (case-insensitive). Defaults to
            `"same"`.
        num_atoms: atoms per block ``m``. Read from ``alpha`` when shared
            (if given, it must match); required when the layer owns alpha.
        group_size: only when the layer owns alpha: None (default) for one
            ``(C, F, m)`` alpha (no groups), or an int ``g`` for a ``(g, g,
            m)`` alpha applied block-wise.
        route: `"auto"`, `"atoms"` or `"kernel"`.
        use_bias: add a bias. Defaults to `True`, as ``Conv2D`` (see
            above).
        kernel_initializer: initializer of the atoms (the layer's own
            kernel variables). Defaults to ``N(0, g_out / (k^2 F))``, which
            with the default alpha gives the composed kernel Kaiming
            fan-out variance (paper silent).
        coefficient_initializer: initializer of an owned alpha.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            ``keras.config.image_data_format()``.
        bias_initializer: initializer of the bias. Defaults to `"zeros"`.
        kernel_regularizer: regularizer of the atoms. Defaults to None.
        kernel_constraint: constraint of the atoms. Defaults to None.
        bias_regularizer: regularizer of the bias. Defaults to None.
        bias_constraint: constraint of the bias. Defaults to None.
        dilation_rate: only `1` (see above).
        atom_initializer: the former name of ``kernel_initializer``, kept
            as an alias (give one of the two).

    Example:

    >>> import keras, numpy as np, sb_keras
    >>> conv = sb_keras.layers.ACDCConv2D(16, num_atoms=6, use_bias=False)
    >>> y = conv(np.zeros((2, 8, 8, 8), "float32"))
    >>> tuple(y.shape), conv.count_params()  # 6 * 9 atoms + 8 * 16 * 6 alpha
    ((2, 8, 8, 16), 822)

    Reference: Ze Wang, Xiuyuan Cheng, Guillermo Sapiro and Qiang Qiu,
    *ACDC: Weight Sharing in Atom-Coefficient Decomposed Convolution*
    (arXiv 2009.02386).
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        padding="same",
        num_atoms=None,
        group_size=None,
        route="auto",
        use_bias=True,
        kernel_initializer=None,
        coefficient_initializer=None,
        data_format=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        kernel_constraint=None,
        bias_regularizer=None,
        bias_constraint=None,
        dilation_rate=1,
        atom_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.kernel_size = check_int_tuple("kernel_size", kernel_size)
        self.strides = check_int_tuple("strides", strides)
        self.padding = check_padding(padding)
        self.data_format = standardize_data_format(data_format)
        if check_int_tuple("dilation_rate", dilation_rate) != (1, 1):
            raise ValueError(
                "ACDCConv2D does not support dilation (only dilation_rate=1). "
                f"Received: dilation_rate={dilation_rate!r}"
            )
        if kernel_initializer is not None and atom_initializer is not None:
            raise ValueError(
                "`atom_initializer` is an alias of `kernel_initializer`: give "
                f"one of them. Received: kernel_initializer={kernel_initializer!r}"
                f", atom_initializer={atom_initializer!r}"
            )
        if kernel_initializer is None:
            kernel_initializer = atom_initializer
        if num_atoms is not None:
            check_positive_int("num_atoms", num_atoms)
        self.num_atoms = num_atoms
        if group_size is not None:
            check_positive_int("group_size", group_size)
        self.group_size = group_size
        if route not in ROUTES:
            raise ValueError(
                f"`route` must be one of {ROUTES}. Received: route={route!r}"
            )
        self.route = route
        self.use_bias = bool(use_bias)
        self.kernel_initializer = (
            None
            if kernel_initializer is None
            else keras.initializers.get(kernel_initializer)
        )
        self.coefficient_initializer = coefficient_initializer
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.coefficient_layer = None

    @property
    def atom_initializer(self):
        """Alias of ``kernel_initializer`` (the atoms are the kernel)."""
        return self.kernel_initializer

    def build(self, input_shape):
        x_shape, extra = split_kernel_inputs(input_shape)
        if len(x_shape) != 4:
            raise ValueError(
                "ACDCConv2D takes a rank-4 image (and an optional alpha). "
                f"Received: input_shape={input_shape}"
            )
        c = x_shape[channel_axis(self.data_format)]
        if c is None:
            raise ValueError(
                "ACDCConv2D needs a known number of input channels. "
                f"Received: input_shape={input_shape}"
            )
        if extra:
            if len(extra) != 1 or len(extra[0]) != 3:
                raise ValueError(
                    "ACDCConv2D takes x or [x, alpha] with alpha of shape "
                    f"(in_group, out_group, num_atoms). Received: input_shape="
                    f"{input_shape}"
                )
            if self.group_size is not None:
                raise ValueError(
                    "`group_size` only applies when the layer owns alpha; a shared "
                    f"alpha sets the groups. Received: group_size={self.group_size}"
                )
            g_in, g_out, m = (int(d) for d in extra[0])
            if self.num_atoms is not None and self.num_atoms != m:
                raise ValueError(
                    f"The shared alpha has {m} atoms. Received: "
                    f"num_atoms={self.num_atoms}"
                )
        else:
            if self.num_atoms is None:
                raise ValueError(
                    "An ACDCConv2D that owns its coefficients needs `num_atoms`. "
                    "Received: num_atoms=None"
                )
            m = self.num_atoms
            g_in, g_out = (
                (c, self.filters)
                if self.group_size is None
                else (
                    self.group_size,
                    self.group_size,
                )
            )
        for name, size, group in (
            ("input channels", c, g_in),
            ("filters", self.filters, g_out),
        ):
            if size % group:
                raise ValueError(
                    f"The {name} ({size}) must be a multiple of the channel group "
                    f"({group}) of alpha. Received: input_shape={input_shape}, "
                    f"filters={self.filters}"
                )
        self.in_channels, self.in_group, self.out_group = int(c), g_in, g_out
        self.resolved_num_atoms = m
        kh, kw = self.kernel_size
        self.atoms_shape = (kh, kw, m, c // g_in, self.filters // g_out)
        if not extra:
            self.coefficient_layer = ACDCCoefficients(
                m,
                g_in,
                g_out,
                coefficient_initializer=self.coefficient_initializer,
                name="coefficients",
                dtype=self.dtype_policy,
            )
            self.coefficient_layer.build()
        init = self.kernel_initializer or keras.initializers.RandomNormal(
            stddev=math.sqrt(g_out / (kh * kw * self.filters))
        )
        self.atoms = self.add_weight(
            name="atoms",
            shape=self.atoms_shape,
            initializer=init,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        specs = [image_input_spec(self.data_format, c)]
        specs += [keras.layers.InputSpec(shape=tuple(extra[0]))] if extra else []
        self.input_spec = specs if extra else specs[0]
        self.resolved_route = self.route
        if self.route == "auto":
            atoms, kernel = route_macs(
                c, self.filters, m, g_in, g_out, self.kernel_size
            )
            out = to_channels_last(
                self.compute_output_shape(x_shape), self.data_format
            )[1:3]
            small = None not in out and out[0] * out[1] <= ATOM_ROUTE_MAX_POSITIONS
            use_atoms = small and atoms * ATOM_ROUTE_MIN_SAVING <= kernel
            self.resolved_route = "atoms" if use_atoms else "kernel"

    def _alpha(self, extra):
        alpha = extra[0] if extra else self.coefficient_layer.alpha
        return ops.cast(alpha, self.compute_dtype)

    def compose_kernel(self, alpha=None):
        """The composed kernel ``W = alpha x D``, shape ``(k, k, C, F)``.

        Args:
            alpha: the shared coefficients; omit it when the layer owns them.
        """
        alpha = self._alpha([] if alpha is None else [alpha])
        atoms = ops.cast(self.atoms, self.compute_dtype)
        kh, kw, m, n_in, n_out = self.atoms_shape
        g_in, g_out = self.in_group, self.out_group
        # One (k k n_in n_out, m) x (m, g_in g_out) matmul, then reorder the
        # blocks (twice as fast as the equivalent einsum on CPU).
        d = ops.reshape(ops.transpose(atoms, (0, 1, 3, 4, 2)), (-1, m))
        a = ops.reshape(ops.transpose(alpha, (2, 0, 1)), (m, g_in * g_out))
        w = ops.reshape(ops.matmul(d, a), (kh, kw, n_in, n_out, g_in, g_out))
        w = ops.transpose(w, (0, 1, 2, 4, 3, 5))
        return ops.reshape(w, (kh, kw, self.in_channels, self.filters))

    def call(self, inputs):
        x, extra = split_kernel_inputs(inputs)
        if self.resolved_route == "kernel":
            kernel = self.compose_kernel(extra[0] if extra else None)
            y = self._conv(x, kernel, self.strides)
        elif self.data_format == "channels_first":
            y = self._atom_route_channels_first(x, self._alpha(extra))
        else:
            y = self._atom_route(x, self._alpha(extra))
        if self.bias is not None:
            bias = ops.cast(self.bias, self.compute_dtype)
            if self.data_format == "channels_first":
                bias = ops.reshape(bias, (-1, 1, 1))
            y = y + bias
        return y

    def _conv(self, x, kernel, strides=1, padding=None):
        return ops.conv(
            x,
            kernel,
            strides=strides,
            padding=padding or self.padding,
            data_format=self.data_format,
        )

    def _atom_kernel(self):
        """The atoms as one ``(kh, kw, n_in, n_out * m)`` kernel."""
        kh, kw, m, n_in, n_out = self.atoms_shape
        atoms = ops.cast(self.atoms, self.compute_dtype)
        return ops.reshape(
            ops.transpose(atoms, (0, 1, 3, 4, 2)), (kh, kw, n_in, n_out * m)
        )

    def _atom_route_channels_first(self, x, alpha):
        """`_atom_route` on ``(N, C, H, W)`` tensors, axes reordered."""
        m, n_in, n_out = self.atoms_shape[2:]
        g_in, g_out = self.in_group, self.out_group
        h, w = _spatial(x, (2, 3))
        # Input blocks become batch entries: (N * g_in, n_in, H, W).
        x = ops.reshape(x, (-1, n_in, g_in, h, w))
        x = ops.reshape(ops.transpose(x, (0, 2, 1, 3, 4)), (-1, n_in, h, w))
        z = self._conv(x, self._atom_kernel(), self.strides)
        h2, w2 = _spatial(z, (2, 3))
        # (N, g_in * m, n_out * H', W'), then a 1x1 mix with alpha.
        z = ops.reshape(z, (-1, g_in, n_out, m, h2, w2))
        z = ops.transpose(z, (0, 1, 3, 2, 4, 5))
        z = ops.reshape(z, (-1, g_in * m, n_out * h2, w2))
        mix = ops.reshape(ops.transpose(alpha, (0, 2, 1)), (1, 1, g_in * m, g_out))
        y = self._conv(z, mix, padding="valid")
        y = ops.reshape(y, (-1, g_out, n_out, h2, w2))
        y = ops.transpose(y, (0, 2, 1, 3, 4))
        return ops.reshape(y, (-1, n_out * g_out, h2, w2))

    def _atom_route(self, x, alpha):
        m, n_in, n_out = self.atoms_shape[2:]
        g_in, g_out = self.in_group, self.out_group
        h, w = _spatial(x)
        # Input blocks become batch entries: (N * g_in, H, W, n_in).
        x = ops.reshape(x, (-1, h, w, n_in, g_in))
        x = ops.reshape(ops.transpose(x, (0, 4, 1, 2, 3)), (-1, h, w, n_in))
        z = self._conv(x, self._atom_kernel(), self.strides)
        h2, w2 = _spatial(z)
        # (N, H', W' * n_out, g_in * m), then a 1x1 mix with alpha.
        z = ops.reshape(z, (-1, g_in, h2, w2, n_out, m))
        z = ops.transpose(z, (0, 2, 3, 4, 1, 5))
        z = ops.reshape(z, (-1, h2, w2 * n_out, g_in * m))
        mix = ops.reshape(ops.transpose(alpha, (0, 2, 1)), (1, 1, g_in * m, g_out))
        y = self._conv(z, mix, padding="valid")
        return ops.reshape(y, (-1, h2, w2, n_out * g_out))

    def macs_per_position(self):
        """MACs per output position of the route this layer runs."""
        atoms, kernel = route_macs(
            self.in_channels,
            self.filters,
            self.resolved_num_atoms,
            self.in_group,
            self.out_group,
            self.kernel_size,
        )
        return atoms if self.resolved_route == "atoms" else kernel

    def compute_output_shape(self, input_shape):
        x_shape, _ = split_kernel_inputs(input_shape)
        return conv_output_shape(
            x_shape,
            self.kernel_size,
            self.strides,
            self.padding,
            self.filters,
            self.data_format,
        )

    def get_config(self):
        config = super().get_config()
        init = self.coefficient_initializer
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "num_atoms": self.num_atoms,
                "group_size": self.group_size,
                "route": self.route,
                "use_bias": self.use_bias,
                "kernel_initializer": None
                if self.kernel_initializer is None
                else keras.initializers.serialize(self.kernel_initializer),
                "coefficient_initializer": None
                if init is None
                else keras.initializers.serialize(keras.initializers.get(init)),
                "data_format": self.data_format,
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(
                    self.kernel_constraint
                ),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config


def _spatial(x, axes=(1, 2)):
    """Static spatial sizes where known, dynamic ones otherwise."""
    static = [x.shape[a] for a in axes]
    if all(d is not None for d in static):
        return tuple(int(d) for d in static)
    dynamic = ops.shape(x)
    return tuple(s if s is not None else dynamic[a] for a, s in zip(axes, static))
