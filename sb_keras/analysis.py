"""Measurements on models: orthogonality, gradient flow, sizes, plots.

Kang & Kim (*Learning Deeply Shared Filter Bases for Efficient ConvNets*,
arXiv 2006.05066) claim that keeping the shared bases orthonormal keeps
gradients from vanishing or exploding through the many layers that reuse
them. This module measures that on any sb_keras model: per-layer gradient
norms through depth (`gradient_norms`, `GradientNormHistory`), the
orthogonality of every basis during training (`OrthogonalityHistory`), the
similarity of each layer's unique filters to its shared basis, per-layer
parameter/MAC tables, and matplotlib plots saved as PNG (matplotlib is
imported lazily).
"""

import keras
import numpy as np
from keras import ops

from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers.common import check_positive_int


def _walk(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer is not model:
            yield from _walk(layer)
        yield layer


def orthogonality(model):
    """The current deviation from orthonormality of every shared basis.

    Returns:
        A dict ``{basis layer name: mean((M M^T - I) ** 2)}`` over the rows of
        each basis (both kernels jointly for double sharing). 0 means the
        filters are orthonormal.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True)
    >>> {k: round(v, 6) for k, v in sb_keras.orthogonality(model).items()}
    {'stage1_basis': 0.0, 'stage2_basis': 0.0, 'stage3_basis': 0.0}
    """
    return {
        layer.name: float(ops.convert_to_numpy(layer.deviation()))
        for layer in _walk(model)
        if isinstance(layer, FilterBasis)
    }


def orthogonality_loss(model):
    """The orthogonality term the model adds to its loss, from its weights.

    This is ``lambda * R`` with the authors' pooled mean ``R``; it equals the
    sum of ``model.losses`` after a forward pass, computed here without one.
    """
    total = 0.0
    for layer in _walk(model):
        if isinstance(layer, FilterBasis) and layer.orthogonality > 0:
            total += float(ops.convert_to_numpy(layer.penalty()))
        elif (
            isinstance(layer, BasisConv2D)
            and layer.orthogonality > 0
            and layer.unique_kernel is not None
        ):
            bases = _bases_of(layer)
            if bases:
                total += float(ops.convert_to_numpy(layer.penalty(bases)))
    return total


def _bases_of(layer):
    """The basis variables a BasisConv2D is called with (from its node)."""
    node = layer._inbound_nodes[0]
    out = []
    for t in node.input_tensors[1:]:
        owner = t._keras_history.operation
        index = t._keras_history.tensor_index
        if isinstance(owner, FilterBasis):
            out.append(owner.bases[index])
    return out


# ---------------------------------------------------------------------------
# Gradient flow through depth
# ---------------------------------------------------------------------------

WRT = ("weights", "activations")


def tracked_layers(model):
    """The layers whose gradients `gradient_norms` reports, in depth order.

    Plain convolutions (``kind="conv"``), decomposed convolutions
    (``"basis_conv"``: their unique basis and coefficients), shared bases
    (``"basis"``) and dense layers (``"dense"``), in the topological order of
    the model's graph, i.e. from the input to the output.
    """
    out = []
    for layer in _walk(model):
        kind = _kind(layer)
        if kind is not None:
            out.append((layer, kind))
    return out


_KINDS = ("conv", "basis_conv", "basis", "dense")


def block_outputs(model):
    """The residual stream of a ResNet: ``stem_relu`` and every ``*_out``."""
    return [
        lyr
        for lyr in _walk(model)
        if lyr.name == "stem_relu" or lyr.name.endswith("_out")
    ]


def _kind(layer):
    if isinstance(layer, FilterBasis):
        return "basis"
    if isinstance(layer, BasisConv2D):
        return "basis_conv"
    if isinstance(layer, keras.layers.Conv2D):
        return "conv"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    return None


def _select(records, kinds):
    if kinds is None:
        return [r for r in records if r["kind"] not in ("basis", "dense")]
    return [r for r in records if r["kind"] in kinds]


def _own_variables(layer, kind):
    """The variables a layer's weight-gradient norm is taken over."""
    if kind == "basis":
        return list(layer.bases)
    if kind == "basis_conv":
        out = [layer.coefficients]
        if layer.unique_kernel is not None:
            out.insert(0, layer.unique_kernel)
        return out
    return [layer.kernel]


def _check_wrt(wrt):
    if wrt not in WRT:
        raise ValueError(f"`wrt` must be one of {WRT}. Received: wrt={wrt!r}")


class GradientProbe:
    """Computes per-layer gradient norms of a model on a fixed batch.

    The loss is the sparse categorical cross entropy of the model's outputs
    (logits by default), plus the model's added losses (the orthogonality
    penalty) when ``include_regularization`` is True. The forward pass runs
    in training mode (batch statistics in BatchNorm, as during training) and
    the BatchNorm moving statistics are restored afterwards, so probing does
    not change the model.

    With ``wrt="weights"`` the norm of a layer is the L2 norm of the
    gradient over its own kernels (for a decomposed convolution its unique
    basis and coefficients; a shared basis is reported as its own entry and
    accumulates the gradients of all its users). With ``wrt="activations"``
    it is the L2 norm of the gradient with respect to the layer's output
    tensor over the whole batch: the back-propagated signal at that depth,
    comparable between plain and shared models.

    Args:
        model: a functional Keras model (any sb_keras model).
        x: a batch of inputs.
        y: integer labels of the batch.
        wrt: `"weights"` or `"activations"`.
        layers: names of the layers to measure. Defaults to every layer with
            kernels for ``"weights"`` and, for ``"activations"``, to the
            residual stream (the stem output and every block output, the
            layers named ``stem_relu`` and ``*_out``) when the model has
            one, else to every layer with kernels.
        from_logits: whether the model outputs logits. Defaults to `True`.
        include_regularization: add ``sum(model.losses)`` to the loss.
    """

    def __init__(
        self,
        model,
        x,
        y,
        wrt="weights",
        layers=None,
        from_logits=True,
        include_regularization=True,
    ):
        import tensorflow as tf

        _check_wrt(wrt)
        self.model = model
        self.wrt = wrt
        self.x = tf.convert_to_tensor(x, dtype=model.inputs[0].dtype)
        self.y = tf.convert_to_tensor(np.asarray(y).reshape(-1), dtype="int64")
        if int(self.x.shape[0]) != int(self.y.shape[0]):
            raise ValueError(
                "`x` and `y` need the same number of examples. "
                f"Received: x.shape={tuple(self.x.shape)}, "
                f"y.shape={tuple(self.y.shape)}"
            )
        self.include_regularization = bool(include_regularization)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=from_logits
        )
        entries = tracked_layers(model)
        if layers is not None:
            by_name = {lyr.name: lyr for lyr in _walk(model)}
            missing = [n for n in layers if n not in by_name]
            if missing:
                raise ValueError(
                    f"Unknown layer names {missing}. Received: layers={layers!r}"
                )
            entries = [(by_name[n], _kind(by_name[n]) or "layer") for n in layers]
        elif wrt == "activations":
            entries = [(lyr, "block") for lyr in block_outputs(model)] or [
                (lyr, k) for lyr, k in entries if k != "basis"
            ]
        if wrt == "weights" and any(k not in _KINDS for _, k in entries):
            raise ValueError(
                "wrt='weights' needs layers with kernels. "
                f"Received: layers={[lyr.name for lyr, _ in entries]}"
            )
        if wrt == "activations":
            inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            self._probe = keras.Model(
                inputs,
                [lyr.output for lyr, _ in entries] + list(model.outputs),
            )
        self.entries = entries
        self._fn = tf.function(self._norms, reduce_retracing=True)

    def _norms(self, x, y):
        import tensorflow as tf

        if self.wrt == "weights":
            groups = [_own_variables(lyr, k) for lyr, k in self.entries]
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                loss = self.loss_fn(y, logits)
                if self.include_regularization and self.model.losses:
                    loss = loss + tf.add_n(self.model.losses)
            flat = [v for g in groups for v in g]
            grads = tape.gradient(loss, flat)
            norms, i = [], 0
            for g in groups:
                sq = tf.add_n(
                    [tf.reduce_sum(tf.square(gr)) for gr in grads[i : i + len(g)]]
                )
                norms.append(tf.sqrt(sq))
                i += len(g)
            return tf.stack(norms), loss
        with tf.GradientTape() as tape:
            outputs = self._probe(x, training=True)
            acts, logits = outputs[:-1], outputs[-1]
            loss = self.loss_fn(y, logits)
            if self.include_regularization and self._probe.losses:
                loss = loss + tf.add_n(self._probe.losses)
        grads = tape.gradient(loss, acts)
        return tf.stack([tf.norm(g) for g in grads]), loss

    def __call__(self):
        """Returns the records ``[{layer, kind, depth, norm}, ...]``."""
        saved = [np.array(v) for v in self.model.non_trainable_variables]
        try:
            norms, _ = self._fn(self.x, self.y)
        finally:
            for v, value in zip(self.model.non_trainable_variables, saved):
                v.assign(value)
        norms = np.asarray(norms, dtype=np.float64)
        return [
            {"layer": lyr.name, "kind": kind, "depth": i, "norm": float(n)}
            for i, ((lyr, kind), n) in enumerate(zip(self.entries, norms))
        ]


def gradient_norms(model, x, y, wrt="weights", **kwargs):
    """Per-layer gradient norms of ``model`` on one batch, input to output.

    A thin wrapper over `GradientProbe` (see there for the loss and the
    meaning of ``wrt``); build a `GradientProbe` once to measure repeatedly.

    Returns:
        A list of dicts ``{"layer", "kind", "depth", "norm"}`` in depth order.

    Example:

    >>> import numpy as np, sb_keras
    >>> model = sb_keras.ResNet(depth=8, share=True)
    >>> x = np.random.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    >>> records = sb_keras.analysis.gradient_norms(model, x, [0, 1, 2, 3])
    >>> records[0]["layer"], records[-1]["layer"]
    ('stem_conv', 'predictions')

    Reference: Kang & Kim (NeurIPS 2021, arXiv 2006.05066) argue that
    orthonormal shared bases keep these norms from vanishing or exploding.
    """
    return GradientProbe(model, x, y, wrt=wrt, **kwargs)()


def gradient_ratio(records, kinds=None):
    """``norm(first layer) / norm(last layer)`` among layers of ``kinds``.

    ``kinds=None`` takes every record except shared bases and the
    classifier: for weight gradients the stem convolution against the last
    3x3 convolution, for the residual stream the stem output against the
    last block output. Above 1 the gradient grows on its way back to the
    input, below 1 it shrinks (far below: vanishing).
    """
    chosen = _select(records, kinds)
    if len(chosen) < 2:
        raise ValueError(
            f"Need at least two layers of kinds {kinds} to form a ratio. "
            f"Received: {len(chosen)} such records"
        )
    last = chosen[-1]["norm"]
    return chosen[0]["norm"] / last if last > 0 else float("inf")


class GradientNormHistory(keras.callbacks.Callback):
    """Records per-layer gradient norms on a fixed batch during ``fit``.

    Measures before the first step (step 0, the initialization) and then
    every ``every`` training steps. ``history`` is a list of
    ``(step, records)`` with the records of `gradient_norms`.

    Args:
        x: the probe batch (inputs).
        y: its integer labels.
        every: measure every this many steps. Defaults to `10`.
        wrt: `"weights"` or `"activations"`.
        **kwargs: passed to `GradientProbe`.

    Example:

    >>> hist = GradientNormHistory(x_probe, y_probe, every=20)  # doctest: +SKIP
    >>> model.fit(x, y, callbacks=[hist])  # doctest: +SKIP
    >>> hist.ratios()  # doctest: +SKIP
    """

    def __init__(self, x, y, every=10, wrt="weights", **kwargs):
        super().__init__()
        self.every = check_positive_int("every", every)
        _check_wrt(wrt)
        self.x, self.y, self.wrt, self.kwargs = x, y, wrt, kwargs
        self.history = []
        self._probe = None
        self._step = 0

    def _measure(self):
        if self._probe is None or self._probe.model is not self.model:
            self._probe = GradientProbe(
                self.model, self.x, self.y, wrt=self.wrt, **self.kwargs
            )
        self.history.append((self._step, self._probe()))

    def on_train_begin(self, logs=None):
        if not self.history:
            self._measure()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self._measure()

    def ratios(self, kinds=None):
        """``[(step, gradient_ratio), ...]`` over the recorded history."""
        return [(s, gradient_ratio(r, kinds)) for s, r in self.history]


# ---------------------------------------------------------------------------
# Orthogonality over training, shared vs unique similarity
# ---------------------------------------------------------------------------


class OrthogonalityHistory(keras.callbacks.Callback):
    """Records `orthogonality` of every basis during ``fit``.

    ``history`` is a list of ``(step, {basis name: deviation})``, measured
    before the first step and every ``every`` steps.

    Example:

    >>> hist = OrthogonalityHistory(every=50)  # doctest: +SKIP
    >>> model.fit(x, y, callbacks=[hist])  # doctest: +SKIP
    >>> plot_orthogonality_history(hist.history, "ortho.png")  # doctest: +SKIP
    """

    def __init__(self, every=10):
        super().__init__()
        self.every = check_positive_int("every", every)
        self.history = []
        self._step = 0

    def on_train_begin(self, logs=None):
        if not self.history:
            self.history.append((0, orthogonality(self.model)))

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self.history.append((self._step, orthogonality(self.model)))


def _unit_rows(kernel):
    rows = np.asarray(ops.convert_to_numpy(kernel), dtype=np.float64)
    rows = rows.reshape(-1, rows.shape[-1]).T
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def shared_unique_similarity(model):
    """How close each layer's unique filters are to its shared basis.

    For every decomposed convolution with both a unique and a shared basis,
    the absolute cosine similarities between each unique filter and each
    shared filter it convolves with. Values near 0: the unique part adds
    directions the shared basis lacks; near 1: it duplicates a shared
    filter. Also reports the fraction of the 1x1 coefficient energy spent on
    the shared responses.

    Returns:
        ``{layer name: {"max_abs_cos", "mean_abs_cos", "shared_coefficient_energy"}}``.
    """
    out = {}
    for layer in _walk(model):
        if not isinstance(layer, BasisConv2D) or layer.unique_kernel is None:
            continue
        bases = _bases_of(layer)
        if not bases:
            continue
        unique = _unit_rows(layer.unique_kernel)
        shared = _unit_rows(bases[layer.basis_index])
        cos = np.abs(unique @ shared.T)
        coeff = np.asarray(ops.convert_to_numpy(layer.coefficients))[0, 0]
        energy = np.square(coeff).sum(axis=1)
        u = layer.unique_rank
        out[layer.name] = {
            "max_abs_cos": float(cos.max()),
            "mean_abs_cos": float(cos.mean()),
            "shared_coefficient_energy": float(energy[u:].sum() / energy.sum()),
        }
    return out


# ---------------------------------------------------------------------------
# Parameter / MAC tables
# ---------------------------------------------------------------------------


def layer_table(model):
    """Parameters and MACs of every layer with either, in depth order.

    Parameters follow `sb_keras.count_params` (BatchNorm statistics excluded,
    a shared basis counted once, at its owner); MACs follow
    `sb_keras.count_macs` (every use of a basis counted). The rows sum to
    the model totals.

    Returns:
        A list of dicts ``{"layer", "type", "params", "macs"}``.
    """
    from sb_keras.counting import layer_macs

    rows = []
    for layer in _walk(model):
        if isinstance(layer, keras.Model):
            continue
        params = sum(
            int(np.prod(v.shape))
            for v in layer.weights
            if v.path.split("/")[-1] not in ("moving_mean", "moving_variance")
        )
        if isinstance(layer, BasisConv2D):
            params = sum(int(np.prod(v.shape)) for v in layer.trainable_weights)
        macs = 0
        for node in layer._inbound_nodes:
            if node.output_tensors:
                ins = [tuple(t.shape) for t in node.input_tensors]
                macs += layer_macs(layer, ins, tuple(node.output_tensors[0].shape))
        if params or macs:
            rows.append(
                {
                    "layer": layer.name,
                    "type": type(layer).__name__,
                    "params": params,
                    "macs": macs,
                }
            )
    return rows


def stage_table(model):
    """`layer_table` summed by the prefix before the first ``_`` (stem, stageN)."""
    totals = {}
    for row in layer_table(model):
        key = row["layer"].split("_")[0]
        entry = totals.setdefault(key, {"part": key, "params": 0, "macs": 0})
        entry["params"] += row["params"]
        entry["macs"] += row["macs"]
    return list(totals.values())


def markdown_table(rows, columns=None):
    """Formats a list of dicts as a Markdown table (numbers with commas)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]

    def fmt(v):
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, (int, np.integer)):
            return f"{int(v):,}"
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The gradient-flow experiment and plots
# ---------------------------------------------------------------------------


def gradient_flow_experiment(
    builders,
    x_train,
    y_train,
    x_probe,
    y_probe,
    steps=50,
    batch_size=64,
    learning_rate=0.1,
    every=10,
    wrt="activations",
    seed=0,
):
    """Trains each model briefly and records its gradient flow.

    Every model is trained for ``steps`` steps of SGD (momentum 0.9) with a
    `GradientNormHistory` on the fixed probe batch.

    Args:
        builders: ``{label: callable returning a model}``, e.g.
            ``{"shared, lambda=0": lambda: ResNet(56, share=True,
            orthogonality=0)}``.
        x_train, y_train: training arrays (uint8 pixels, integer labels).
        x_probe, y_probe: the probe batch.
        steps: training steps per model.
        batch_size: training batch size.
        learning_rate: SGD learning rate.
        every: measure every this many steps.
        wrt: `"activations"` (default: the residual stream, comparable
            between plain and shared models) or `"weights"`.
        seed: seeds the model initialization and the data order.

    Returns:
        ``{label: {"history": [(step, records)], "orthogonality":
        [(step, {basis: deviation})], "loss": [...]}}``.
    """
    check_positive_int("steps", steps)
    results = {}
    for label, build in builders.items():
        keras.utils.set_random_seed(seed)
        model = build()
        # TODO(lead): use the training recipe of sb_keras.training (optimizer
        # with coupled L2, schedule) once it is merged; plain SGD for now.
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        grads = GradientNormHistory(x_probe, y_probe, every=every, wrt=wrt)
        ortho = OrthogonalityHistory(every=every)
        rng = np.random.RandomState(seed)
        idx = rng.choice(len(x_train), size=steps * batch_size, replace=True)
        hist = model.fit(
            np.asarray(x_train)[idx].astype("float32"),
            np.asarray(y_train)[idx],
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[grads, ortho],
        )
        results[label] = {
            "history": grads.history,
            "orthogonality": ortho.history,
            "loss": hist.history["loss"],
        }
        keras.backend.clear_session()
    return results


def gradient_flow_summary(results, kinds=None):
    """Rows of first/last gradient ratio at init and at the end, per label."""
    rows = []
    for label, res in results.items():
        hist = res["history"]
        first, last = hist[0], hist[-1]
        row = {
            "model": label,
            "ratio_init": gradient_ratio(first[1], kinds),
            "ratio_end": gradient_ratio(last[1], kinds),
            "steps": last[0],
        }
        dev = res.get("orthogonality") or []
        if dev and dev[-1][1]:
            row["orthogonality_end"] = float(np.mean(list(dev[-1][1].values())))
        rows.append(row)
    return rows


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "Plots need matplotlib: pip install matplotlib "
            "(or pip install sb_keras[plot])."
        ) from None
    return plt


def _save(fig, path, dpi):
    import os

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_gradient_norms(curves, path=None, kinds=None, dpi=80):
    """Gradient norm against depth, one line per curve (log scale).

    Args:
        curves: ``{label: records}`` with records from `gradient_norms`.
        path: write a PNG there (folders are created). None: only return.
        kinds: the layer kinds plotted.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, records in curves.items():
        chosen = _select(records, kinds)
        ax.plot(range(len(chosen)), [r["norm"] for r in chosen], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient norm")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    if path:
        _save(fig, path, dpi)
    return fig


def plot_gradient_flow(results, path=None, kinds=None, dpi=80, ylabel=None):
    """Two panels: norms through depth at init and at the end; ratio vs step.

    Args:
        results: the output of `gradient_flow_experiment`.
        path: write a PNG there. None: only return the figure.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, res in results.items():
        hist = res["history"]
        for ax, (step, records) in zip(axes[:2], (hist[0], hist[-1])):
            chosen = _select(records, kinds)
            ax.plot([r["norm"] for r in chosen], label=label)
            ax.set_title(f"step {step}")
        steps = [s for s, _ in hist]
        axes[2].plot(steps, [gradient_ratio(r, kinds) for _, r in hist], label=label)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_xlabel("layer (input -> output)")
        ax.set_ylabel(ylabel or "gradient norm")
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("first / last layer")
    axes[2].set_title("gradient ratio")
    axes[2].grid(True, alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    if path:
        _save(fig, path, dpi)
    return fig


def plot_orthogonality_history(history, path=None, dpi=80):
    """Deviation from orthonormality of every basis against training step.

    Args:
        history: ``[(step, {basis: deviation})]`` (`OrthogonalityHistory`),
            or ``{label: such a history}`` to compare runs.
        path: write a PNG there. None: only return the figure.
    """
    plt = _pyplot()
    runs = history if isinstance(history, dict) else {"": history}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, hist in runs.items():
        if not hist:
            continue
        steps = [s for s, _ in hist]
        for name in hist[0][1]:
            tag = f"{label} {name}".strip()
            ax.plot(steps, [d[name] for _, d in hist], label=tag)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean (M M^T - I)^2")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    if path:
        _save(fig, path, dpi)
    return fig
