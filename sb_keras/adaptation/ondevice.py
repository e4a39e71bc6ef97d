"""Export of an ACDC model for on-device atom training with LiteRT.

Follows LiteRT's on-device training design: a `tf.Module` whose
`tf.function` signatures ``train``, ``infer``, ``save`` and ``restore`` are
converted together by ``tf.lite.TFLiteConverter.from_saved_model(...,
signature_keys=[...])`` with resource variables enabled, so the trainable
tensors live in the interpreter as variables and ``train`` updates them.

Only builtin ops are emitted (no Flex delegate needed): the gradients TF
would write with Flex ops are replaced while tracing (see
`sb_keras.adaptation.gradients`), and the checkpoint is kept by the app, not
by the model: ``save`` returns the trainable tensors by name and
``restore`` takes them as inputs. LiteRT's example instead writes a
checkpoint file with ``tf.raw_ops.Save`` / ``Restore``, which are Flex ops
(``FlexSave``, ``FlexRestore``) and would need the Flex delegate, absent
from the ``ai-edge-litert`` wheel; returning the tensors keeps the model
builtin-only and lets the app store them wherever it likes.
"""

import os
import re
import tempfile

import keras
import tensorflow as tf

from sb_keras.adaptation.gradients import builtin_gradients
from sb_keras.export.tflite import check_builtin_ops
from sb_keras.export.tflite import check_output_path
from sb_keras.export.tflite import write_atomic
from sb_keras.layers import ACDCConv2D

SIGNATURES = ("train", "infer", "save", "restore")


def trainable_variables(model, batchnorm=False, classifier=False):
    """The variables the on-device ``train`` updates, in a fixed order.

    Args:
        model: a Keras model with `ACDCConv2D` layers.
        batchnorm: add BatchNorm scale and offset (gamma, beta).
        classifier: add the kernel and bias of the last `Dense` layer.

    Returns:
        A list of Keras variables: the atoms of every ACDC convolution (in
        layer order), then BN gamma/beta, then the classifier.
    """
    layers = list(model._flatten_layers(include_self=False))
    found = [layer.atoms for layer in layers if isinstance(layer, ACDCConv2D)]
    if not found:
        raise ValueError(
            "`model` has no ACDCConv2D layer, so it has no atoms to train on "
            f"the device. Received: model={model.name!r}"
        )
    if batchnorm:
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                found += [v for v in (layer.gamma, layer.beta) if v is not None]
    if classifier:
        head = model.layers[-1]
        if not isinstance(head, keras.layers.Dense):
            raise ValueError(
                "`classifier=True` needs a model ending in a Dense layer. "
                f"Received: model={model.name!r} ending in {type(head).__name__}"
            )
        found += [v for v in (head.kernel, head.bias) if v is not None]
    return _unique(found)


def _unique(variables):
    unique = {}
    for v in variables:
        unique.setdefault(id(v), v)
    return list(unique.values())


def tensor_names(variables):
    """Signature names of the variables: their paths with ``/`` as ``_``."""
    names = [re.sub(r"[^0-9A-Za-z_]", "_", v.path) for v in variables]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def softmax_cross_entropy(logits, labels, num_classes):
    """Mean cross-entropy from logits with builtin ops (ONE_HOT, LOG_SOFTMAX)."""
    onehot = tf.one_hot(labels, num_classes, dtype=logits.dtype)
    return -tf.reduce_mean(tf.reduce_sum(onehot * tf.nn.log_softmax(logits), -1))


class AtomTrainer(tf.Module):
    """The on-device training module: ``train``, ``infer``, ``save``, ``restore``.

    ``train(x, y)`` runs the model in inference mode (BatchNorm uses its
    moving statistics), takes the mean cross-entropy of the logits and does
    one SGD step ``v -= learning_rate * grad`` on the trainable variables;
    it returns ``{"loss": loss}`` (the loss before the step).

    Args:
        model: a Keras model with `ACDCConv2D` layers, outputting logits.
        batch_size: images per ``train`` call (static, for TFLite).
        learning_rate: the SGD step size.
        batchnorm: also train BN scale and offset.
        classifier: also train the last `Dense` layer (a new head).
    """

    def __init__(
        self, model, batch_size, learning_rate, batchnorm=False, classifier=False
    ):
        super().__init__(name="atom_trainer")
        self.model = model
        self.keras_variables = trainable_variables(model, batchnorm, classifier)
        self.names = tensor_names(self.keras_variables)
        # Own tf.Variables, copies of the trained Keras ones, and constants
        # for every other model variable: the converter (TF 2.21) gives
        # initial values only to plain tf.Variables, leaving the Keras-wrapped
        # ones uninitialized, so the model reads all its variables through a
        # `keras.StatelessScope`.
        self.weights = [
            tf.Variable(v.numpy(), name=n)
            for v, n in zip(self.keras_variables, self.names)
        ]
        trained = {id(v) for v in self.keras_variables}
        self._frozen = [
            (v, tf.constant(v.numpy()))
            for v in _unique(model.variables)
            if id(v) not in trained
        ]
        self.learning_rate = float(learning_rate)
        self.num_classes = int(model.output_shape[-1])
        shape = tuple(model.inputs[0].shape[1:])
        dtype = model.inputs[0].dtype
        images = tf.TensorSpec((batch_size, *shape), dtype, name="x")
        labels = tf.TensorSpec((batch_size,), tf.int32, name="y")
        with builtin_gradients():
            self.train = tf.function(self._train, input_signature=[images, labels])
            self.train.get_concrete_function()
        self.infer = tf.function(
            self._infer, input_signature=[tf.TensorSpec((None, *shape), dtype, "x")]
        )
        self.save = tf.function(self._save, input_signature=[])
        specs = [
            tf.TensorSpec(v.shape, v.dtype, name=n)
            for v, n in zip(self.weights, self.names)
        ]
        self.restore = tf.function(self._restore, input_signature=specs)

    def _call_model(self, x):
        mapping = [
            (k, w.read_value()) for k, w in zip(self.keras_variables, self.weights)
        ] + self._frozen
        with keras.StatelessScope(state_mapping=mapping):
            return self.model(x, training=False)

    def _train(self, x, y):
        with tf.GradientTape() as tape:
            logits = self._call_model(x)
            loss = softmax_cross_entropy(logits, y, self.num_classes)
        grads = tape.gradient(loss, self.weights)
        for w, g in zip(self.weights, grads):
            w.assign_sub(self.learning_rate * g)
        return {"loss": loss}

    def _infer(self, x):
        return {"logits": self._call_model(x)}

    def _save(self):
        return {n: w.read_value() for n, w in zip(self.names, self.weights)}

    def _restore(self, *tensors):
        out = {}
        for n, w, t in zip(self.names, self.weights, tensors):
            w.assign(t)
            out[n] = w.read_value()
        return out

    def signatures(self):
        """The concrete functions by signature key."""
        return {key: getattr(self, key).get_concrete_function() for key in SIGNATURES}


def export_ondevice_training(
    model,
    output_path,
    batch_size=8,
    learning_rate=0.01,
    batchnorm=False,
    classifier=False,
):
    """Writes a `.tflite` that trains the model's atoms on the device.

    The file has LiteRT's four on-device training signatures:

    * ``train(x, y) -> {"loss"}``: one SGD step on a batch of
      ``batch_size`` images (the model's input dtype, e.g. float 0-255
      pixels) and int32 labels;
    * ``infer(x) -> {"logits"}``;
    * ``save() -> {name: tensor}``: the trained tensors, for the app to
      store;
    * ``restore(**{name: tensor}) -> {name: tensor}``: loads them back.

    Only TFLite builtin ops are used (checked after conversion), so the
    stock ``ai_edge_litert`` interpreter runs it.

    Args:
        model: a Keras model with `ACDCConv2D` layers, outputting logits.
        output_path: the `.tflite` file (written atomically).
        batch_size: images per ``train`` call. Defaults to `8`.
        learning_rate: SGD step size of ``train``. Defaults to `0.01`.
        batchnorm: also train BatchNorm scale/offset. Defaults to `False`.
        classifier: also train the last Dense layer. Defaults to `False`.

    Returns:
        The names of the saved/restored tensors, in ``save`` order.
    """
    path = check_output_path(output_path)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "`batch_size` must be a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, (int, float)) and learning_rate > 0
    ):
        raise ValueError(
            "`learning_rate` must be a positive number. Received: "
            f"learning_rate={learning_rate!r}"
        )
    trainer = AtomTrainer(model, batch_size, learning_rate, batchnorm, classifier)
    content = convert_trainer(trainer)
    write_atomic(path, content)
    return list(trainer.names)


def convert_trainer(trainer):
    """Converts an `AtomTrainer` to flatbuffer bytes (builtin ops only)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "saved_model")
        tf.saved_model.save(trainer, folder, signatures=trainer.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(
            folder, signature_keys=list(SIGNATURES)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        content = converter.convert()
    check_builtin_ops(content)
    return content
