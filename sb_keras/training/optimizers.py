"""SGD with PyTorch's semantics: L2 weight decay coupled to the gradient."""

import keras
from keras import ops

from sb_keras.api_export import sb_export


@sb_export("sb_keras.training.PyTorchSGD")
class PyTorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum exactly as ``torch.optim.SGD``, weight decay included.

    For every trainable variable ``p`` with gradient ``g``::

        g = g + weight_decay * p        # L2, added before momentum
        buf = momentum * buf + g        # (buf starts at 0, so buf_1 = g)
        p = p - lr * buf                # nesterov: p -= lr * (g + momentum * buf)

    This is the optimizer Kang & Kim trained with (``weight_decay=5e-4`` on
    CIFAR, on *every* parameter: shared bases, coefficients, BN scales and
    offsets). It differs from ``keras.optimizers.SGD(weight_decay=...)``,
    whose decay is decoupled (applied to the weights outside the momentum),
    and from Keras's momentum form ``v = m * v - lr * g``, which bakes the
    learning rate into the velocity and so reacts differently to a step
    decay of the learning rate.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
            Defaults to `0.1`.
        momentum: momentum factor. Defaults to `0.9`.
        weight_decay: the coupled L2 factor. Defaults to `5e-4`.
        nesterov: Nesterov momentum. Defaults to `False`.
        name: the optimizer name.
        **kwargs: other `keras.optimizers.Optimizer` arguments (e.g.
            ``clipnorm``; its own decoupled ``weight_decay`` is not
            available here).

    Example:

    >>> import keras, numpy as np
    >>> from sb_keras.training import PyTorchSGD
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=PyTorchSGD(0.1, weight_decay=5e-4), loss="mse")
    >>> model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0).history["loss"]
    ... # doctest: +SKIP

    Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
    ConvNets* (arXiv 2006.05066), training recipe; PyTorch ``SGD`` docs.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=False,
        name="pytorch_sgd",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for arg, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(
                    f"`{arg}` must be a float >= 0. Received: {arg}={value!r}"
                )
        if nesterov and momentum == 0:
            raise ValueError(
                "Nesterov momentum needs `momentum` > 0. "
                f"Received: momentum={momentum!r}"
            )
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            g = ops.add(g, ops.multiply(self.coupled_weight_decay, variable))
        if self.momentum:
            buf = self.momentums[self._get_variable_index(variable)]
            new_buf = ops.add(ops.multiply(self.momentum, buf), g)
            self.assign(buf, new_buf)
            g = (
                ops.add(g, ops.multiply(self.momentum, new_buf))
                if (self.nesterov)
                else new_buf
            )
        self.assign_sub(variable, ops.multiply(lr, g))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.coupled_weight_decay,
                "nesterov": self.nesterov,
            }
        )
        return config
