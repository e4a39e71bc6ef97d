"""The shared ACDC coefficients: one owner of alpha used by many layers."""

import math

import keras
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import float32_value


def default_coefficient_initializer(num_atoms, out_group):
    """The default initializer of alpha: ``N(0, 2 / (num_atoms * out_group))``.

    Together with the default atom initializer of `ACDCConv2D` (variance
    ``out_group / (k * k * filters)``) every composed kernel entry
    ``W = sum_j alpha_j D_j`` gets the variance ``2 / (k * k * filters)`` of
    Kaiming-normal fan-out, the initialization of every convolution in the
    ResNets of sb_keras, whatever the width of the layer using alpha.
    """
    return keras.initializers.RandomNormal(
        stddev=math.sqrt(2.0 / (num_atoms * out_group))
    )


@sb_export("sb_keras.layers.ACDCCoefficients")
class ACDCCoefficients(keras.layers.Layer):
    """ACDC coefficients ``alpha``, owned once and used by many layers.

    ACDC writes every kernel slice as ``W[:, :, i, o] = sum_j alpha[i, o, j]
    * D_j`` with a few 2-D spatial atoms ``D`` per layer and coefficients
    ``alpha`` shared by a whole sub-structure (a stage, or the network).
    This layer owns ``alpha``, a variable of shape ``(in_group, out_group,
    num_atoms)``, and *returns it as a tensor*: every `ACDCConv2D` of the
    sharing scope takes that tensor as an input, so sharing is an edge of
    the functional graph and survives ``.keras`` save/load, ``clone_model``,
    ``tf.distribute`` and TFLite export, like `FilterBasis`.

    Layers wider than the group reuse ``alpha`` block-wise: a layer with
    ``C`` inputs and ``F`` outputs is a grid of ``(C / in_group) x
    (F / out_group)`` sub-convolutions of ``in_group -> out_group`` channels,
    all mixing with this one ``alpha`` and each with its own atoms (see
    `ACDCConv2D`). The layer is called on any tensor of the graph (an
    anchor; its value is ignored). ACDC has no orthogonality penalty, so
    nothing is added to the losses.

    The variable is always float32. The layer's default dtype is float32
    (users cast alpha to their compute dtype); under a mixed policy
    (``dtype="mixed_float16"``) it returns alpha autocast to the compute
    dtype, as ``compute_output_spec`` says.

    Args:
        num_atoms: ``m``, atoms per sub-convolution (the last axis of alpha).
        in_group: input channels of one channel group.
        out_group: output channels of one channel group. Defaults to
            ``in_group``.
        coefficient_initializer: initializer of alpha. Defaults to
            `default_coefficient_initializer` (see there).

    Example:

    >>> import keras, sb_keras
    >>> x = keras.Input((8, 8, 32))
    >>> alpha = sb_keras.layers.ACDCCoefficients(num_atoms=6, in_group=16)(x)
    >>> y = sb_keras.layers.ACDCConv2D(32, use_bias=False)([x, alpha])
    >>> y = sb_keras.layers.ACDCConv2D(64, use_bias=False)([y, alpha])
    >>> model = keras.Model(x, y)
    >>> sb_keras.count_params(model)  # alpha + 4 and 8 blocks of 6 3x3 atoms
    2184

    Reference: Ze Wang, Xiuyuan Cheng, Guillermo Sapiro and Qiang Qiu,
    *ACDC: Weight Sharing in Atom-Coefficient Decomposed Convolution*
    (arXiv 2009.02386).
    """

    def __init__(
        self,
        num_atoms,
        in_group,
        out_group=None,
        coefficient_initializer=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_atoms = check_positive_int("num_atoms", num_atoms)
        self.in_group = check_positive_int("in_group", in_group)
        out_group = in_group if out_group is None else out_group
        self.out_group = check_positive_int("out_group", out_group)
        if coefficient_initializer is None:
            coefficient_initializer = default_coefficient_initializer(
                self.num_atoms, self.out_group
            )
        self.coefficient_initializer = keras.initializers.get(coefficient_initializer)

    @property
    def alpha_shape(self):
        return (self.in_group, self.out_group, self.num_atoms)

    def build(self, input_shape=None):
        self.alpha = self.add_weight(
            name="alpha",
            shape=self.alpha_shape,
            initializer=self.coefficient_initializer,
            trainable=True,
            dtype=self.variable_dtype,
        )

    def call(self, inputs=None):
        del inputs  # the anchor only places alpha in the graph
        return ops.cast(float32_value(self.alpha), self.compute_dtype)

    def compute_output_shape(self, input_shape=None):
        return self.alpha_shape

    def compute_output_spec(self, inputs=None):
        return keras.KerasTensor(self.alpha_shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_atoms": self.num_atoms,
                "in_group": self.in_group,
                "out_group": self.out_group,
                "coefficient_initializer": keras.initializers.serialize(
                    self.coefficient_initializer
                ),
            }
        )
        return config
