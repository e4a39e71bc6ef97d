"""Hyperparameter search over shared-basis ResNets with keras-tuner.

The search space is the trade-off Kang & Kim study (*Learning Deeply Shared
Filter Bases for Efficient ConvNets*, arXiv 2006.05066): the sharing mode
(plain, single or double sharing), the shared rank ``s`` and unique rank
``u`` of "S{s}U{u}", the orthogonality weight ``lambda`` and the learning
rate. The objective is the validation accuracy; an optional budget on the
parameters or MACs (counted with `sb_keras.count_params` /
`sb_keras.count_macs`, the paper's conventions) keeps the search inside a
size class. `results_table` and `plot_pareto` turn a finished search into a
table and a plot of accuracy against parameters with its Pareto front.

keras-tuner is optional: ``pip install keras-tuner tensorboard`` (with the
TensorFlow backend keras-tuner imports tensorboard for every trial, and TF
2.21 no longer depends on it).

Example:

>>> from sb_keras import tuning  # doctest: +SKIP
>>> tuner = tuning.tune(x, y, validation_data=(xv, yv), depth=20,
...                     max_trials=10, epochs=5, max_params=200_000)
... # doctest: +SKIP
>>> print(tuning.markdown_results(tuning.results_table(tuner)))
... # doctest: +SKIP
>>> best = tuner.get_best_models(1)[0]  # doctest: +SKIP
"""

import keras
import numpy as np

from sb_keras import regularizers
from sb_keras.counting import count_macs
from sb_keras.counting import count_params
from sb_keras.models import ResNet

try:  # optional dependency; the error is raised when the tuner is used
    import keras_tuner
except ImportError:  # pragma: no cover - depends on the environment
    keras_tuner = None

_INSTALL_HINT = (
    "Tuning needs keras-tuner and tensorboard: "
    "pip install keras-tuner tensorboard (or pip install sb_keras[tune])."
)
SHARINGS = ("plain", "single", "double")
TUNERS = ("bayesian", "hyperband", "random")
BUDGET_MODES = ("penalize", "skip")
OBJECTIVE = "val_accuracy"


def _require_keras_tuner():
    if keras_tuner is None:
        raise ImportError(_INSTALL_HINT)
    return keras_tuner


def _check_choices(name, values, allowed=None, low=None):
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    ok = bool(values)
    for v in values:
        if allowed is not None and v not in allowed:
            ok = False
        if low is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < low
        ):
            ok = False
    if not ok:
        what = f"from {allowed}" if allowed else f"numbers >= {low}"
        raise ValueError(
            f"`{name}` must be a non-empty list of {what}. Received: {name}={values!r}"
        )
    return values


def _check_budget(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return value


_Base = keras_tuner.HyperModel if keras_tuner is not None else object


class SharedBasisHyperModel(_Base):
    """A keras-tuner `HyperModel` over shared-basis CIFAR ResNets.

    Hyperparameters (names as in the trial summaries):

    * ``sharing``: `"plain"` (the unshared baseline), `"single"` or
      `"double"` sharing;
    * ``shared_rank``, ``unique_rank``, ``orthogonality``: active only for
      shared models;
    * ``learning_rate``: log-uniform between the bounds of
      ``learning_rate``.

    Each trial model is a `sb_keras.ResNet` compiled with SGD (momentum 0.9),
    sparse categorical cross entropy on logits and the ``accuracy`` metric,
    so the objective is ``val_accuracy``.

    A budget (``max_params`` and/or ``max_macs``) is checked when the model
    is built. ``budget_mode="penalize"`` (default) does not train an
    over-budget model and reports ``val_accuracy = 0`` for it, so the
    search goes on and the oracle learns to avoid that region;
    ``"skip"`` fails the trial (keras-tuner stops after
    ``max_consecutive_failed_trials`` failures in a row).

    Args:
        depth: CIFAR ResNet depth (6n + 2; at least 14 so that stages have
            blocks that share). Defaults to `20`.
        num_classes: classes of the classifier. Defaults to `10`.
        input_shape: image shape. Defaults to ``(32, 32, 3)``.
        sharings: the sharing modes searched.
        shared_ranks: the shared ranks searched.
        unique_ranks: the unique ranks searched.
        orthogonality: the lambdas searched.
        learning_rate: ``(low, high)`` of the log-uniform learning rate.
        max_params: optional budget on `sb_keras.count_params`.
        max_macs: optional budget on `sb_keras.count_macs` (one image).
        budget_mode: `"penalize"` or `"skip"`.

    Example:

    >>> import keras_tuner, sb_keras.tuning as tuning  # doctest: +SKIP
    >>> hypermodel = tuning.SharedBasisHyperModel(depth=20, max_params=150_000)
    >>> tuner = keras_tuner.BayesianOptimization(
    ...     hypermodel, objective="val_accuracy", max_trials=20)  # doctest: +SKIP

    Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for
    Efficient ConvNets* (arXiv 2006.05066).
    """

    def __init__(
        self,
        depth=20,
        num_classes=10,
        input_shape=(32, 32, 3),
        sharings=SHARINGS,
        shared_ranks=(8, 16, 32),
        unique_ranks=(0, 1, 2),
        orthogonality=(0.0, 1.0, 10.0),
        learning_rate=(0.01, 0.2),
        max_params=None,
        max_macs=None,
        budget_mode="penalize",
        name=None,
        tunable=True,
    ):
        _require_keras_tuner()
        super().__init__(name=name, tunable=tunable)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 14:
            raise ValueError(
                "`depth` must be a CIFAR ResNet depth 6n+2 >= 14 (smaller "
                f"ones have no block that shares). Received: depth={depth!r}"
            )
        self.depth = depth
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.sharings = _check_choices("sharings", sharings, allowed=SHARINGS)
        self.shared_ranks = _check_choices("shared_ranks", shared_ranks, low=1)
        self.unique_ranks = _check_choices("unique_ranks", unique_ranks, low=0)
        self.orthogonality = tuple(
            regularizers.validate_lambda(v)
            for v in _check_choices("orthogonality", orthogonality, low=0)
        )
        lr = _check_choices("learning_rate", learning_rate, low=0)
        if len(lr) != 2 or not 0 < lr[0] <= lr[1]:
            raise ValueError(
                "`learning_rate` must be (low, high) with 0 < low <= high. "
                f"Received: learning_rate={learning_rate!r}"
            )
        self.learning_rate = (float(lr[0]), float(lr[1]))
        self.max_params = _check_budget("max_params", max_params)
        self.max_macs = _check_budget("max_macs", max_macs)
        if budget_mode not in BUDGET_MODES:
            raise ValueError(
                f"`budget_mode` must be one of {BUDGET_MODES}. "
                f"Received: budget_mode={budget_mode!r}"
            )
        self.budget_mode = budget_mode
        self.sizes = {}
        # Raises now on a bad depth/shape rather than in every trial.
        ResNet(depth, num_classes=num_classes, input_shape=self.input_shape)

    def model_kwargs(self, hp):
        """The `sb_keras.ResNet` arguments of the trial ``hp``."""
        sharing = hp.Choice("sharing", list(self.sharings))
        shared = [s for s in self.sharings if s != "plain"]
        kwargs = {
            "depth": self.depth,
            "num_classes": self.num_classes,
            "input_shape": self.input_shape,
        }
        if shared:
            with hp.conditional_scope("sharing", shared):
                s = hp.Choice("shared_rank", list(self.shared_ranks))
                u = hp.Choice("unique_rank", list(self.unique_ranks))
                lam = hp.Choice("orthogonality", list(self.orthogonality))
            if sharing != "plain":
                kwargs.update(
                    share=True,
                    sharing=sharing,
                    shared_rank=int(s),
                    unique_rank=int(u),
                    orthogonality=float(lam),
                )
        return kwargs

    def _learning_rate(self, hp):
        low, high = self.learning_rate
        if low == high:
            return hp.Fixed("learning_rate", low)
        return hp.Float("learning_rate", low, high, sampling="log")

    def build(self, hp):
        kwargs = self.model_kwargs(hp)
        lr = self._learning_rate(hp)
        model = ResNet(**kwargs)
        size = self._record_size(kwargs, model)
        if self.budget_mode == "skip" and not self.within_budget(size):
            raise keras_tuner.errors.FailedTrialError(
                f"Over budget: {size['params']:,} params, {size['macs']:,} MACs "
                f"(max_params={self.max_params}, max_macs={self.max_macs})."
            )
        # TODO(lead): take the optimizer from the training recipe
        # (sb_keras.training: coupled L2 weight decay, schedule) once merged.
        model.compile(
            optimizer=keras.optimizers.SGD(lr, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def fit(self, hp, model, *args, **kwargs):
        size = self.size_of(hp)
        if not self.within_budget(size):
            # Penalized: not trained, worst possible objective.
            return {OBJECTIVE: 0.0}
        return model.fit(*args, **kwargs)

    @staticmethod
    def _key(kwargs):
        return tuple(sorted(kwargs.items()))

    def _record_size(self, kwargs, model):
        size = {"params": count_params(model), "macs": count_macs(model)}
        self.sizes[self._key(kwargs)] = size
        return size

    def size_of(self, hp):
        """``{"params", "macs"}`` of the trial ``hp`` (built once, cached)."""
        hp = hp.copy()
        kwargs = self.model_kwargs(hp)
        key = self._key(kwargs)
        if key not in self.sizes:
            self._record_size(kwargs, ResNet(**kwargs))
        return self.sizes[key]

    def within_budget(self, size):
        """Whether a ``{"params", "macs"}`` size meets the budget."""
        if self.max_params is not None and size["params"] > self.max_params:
            return False
        if self.max_macs is not None and size["macs"] > self.max_macs:
            return False
        return True


def tune(
    x,
    y,
    validation_data,
    hypermodel=None,
    tuner="bayesian",
    max_trials=10,
    epochs=5,
    batch_size=128,
    augment=True,
    directory="sb_keras_tuning",
    project_name="search",
    overwrite=False,
    strategy=None,
    seed=0,
    callbacks=None,
    verbose=1,
    **hypermodel_kwargs,
):
    """Runs a search and returns the keras-tuner tuner.

    Args:
        x: training images (uint8 or float pixels in [0, 255]).
        y: integer labels.
        validation_data: ``(x_val, y_val)``; the objective is the accuracy on
            it. Hold it out of the training set (not the test set).
        hypermodel: a `SharedBasisHyperModel`; by default one is built from
            ``hypermodel_kwargs`` (``depth``, ``max_params``, ...) and the
            number of classes and image shape of the data.
        tuner: `"bayesian"` (Gaussian-process Bayesian optimization),
            `"hyperband"` (``epochs`` is its ``max_epochs``) or `"random"`.
        max_trials: trials for the Bayesian and random tuners.
        epochs: training epochs per trial.
        batch_size: global batch size.
        augment: pad-crop-flip augmentation of the training images
            (`sb_keras.data.make_dataset`).
        directory: where keras-tuner keeps the trials.
        project_name: sub-folder of ``directory``.
        overwrite: start over instead of resuming a search in ``directory``.
        strategy: a `tf.distribute` strategy (e.g. ``MirroredStrategy``) for
            every trial.
        seed: seed of the oracle, the model initialization and the data
            order.
        callbacks: extra Keras callbacks for every trial.
        verbose: keras-tuner verbosity.

    Returns:
        The tuner, after the search (``get_best_models``,
        ``get_best_hyperparameters``, `results_table`).
    """
    kt = _require_keras_tuner()
    from sb_keras import data

    if tuner not in TUNERS:
        raise ValueError(f"`tuner` must be one of {TUNERS}. Received: tuner={tuner!r}")
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    x_val, y_val = validation_data
    x_val, y_val = np.asarray(x_val), np.asarray(y_val).reshape(-1)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            "`x` and `y` need the same, non-zero number of examples. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    if hypermodel is None:
        num_classes = int(max(y.max(), y_val.max())) + 1
        hypermodel_kwargs.setdefault("num_classes", max(num_classes, 2))
        hypermodel_kwargs.setdefault("input_shape", x.shape[1:])
        hypermodel = SharedBasisHyperModel(**hypermodel_kwargs)
    elif hypermodel_kwargs:
        raise ValueError(
            "Pass either `hypermodel` or its arguments, not both. "
            f"Received: {sorted(hypermodel_kwargs)}"
        )
    keras.utils.set_random_seed(seed)
    common = dict(
        objective=kt.Objective(OBJECTIVE, direction="max"),
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        seed=seed,
        distribution_strategy=strategy,
    )
    if tuner == "hyperband":
        search = kt.Hyperband(hypermodel, max_epochs=epochs, **common)
    elif tuner == "bayesian":
        search = kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    else:
        search = kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    train = data.make_dataset(
        x, y, batch_size, training=augment, seed=seed, drop_remainder=False
    )
    val = data.make_dataset(x_val, y_val, batch_size)
    fit_kwargs = {"validation_data": val, "callbacks": list(callbacks or [])}
    if tuner != "hyperband":
        fit_kwargs["epochs"] = epochs
    search.search(train, verbose=verbose, **fit_kwargs)
    return search


def results_table(tuner):
    """One row per trial: hyperparameters, size, accuracy and budget.

    Returns:
        A list of dicts with ``trial``, ``status``, ``sharing``,
        ``shared_rank``, ``unique_rank``, ``orthogonality``,
        ``learning_rate``, ``params``, ``macs``, ``val_accuracy`` (the
        trial's best; None if it has none) and ``within_budget``, sorted by
        decreasing accuracy.
    """
    hypermodel = tuner.hypermodel
    rows = []
    for trial in tuner.oracle.trials.values():
        hp = trial.hyperparameters
        values = hp.values
        row = {
            "trial": trial.trial_id,
            "status": str(getattr(trial.status, "value", trial.status)),
            "sharing": values.get("sharing"),
        }
        for name in ("shared_rank", "unique_rank", "orthogonality"):
            row[name] = values.get(name) if hp.is_active(name) else None
        row["learning_rate"] = values.get("learning_rate")
        if isinstance(hypermodel, SharedBasisHyperModel):
            size = hypermodel.size_of(hp)
            row.update(size)
            row["within_budget"] = hypermodel.within_budget(size)
        score = trial.score
        row[OBJECTIVE] = None if score is None else float(score)
        rows.append(row)
    rows.sort(
        key=lambda r: -1.0 if r[OBJECTIVE] is None else r[OBJECTIVE], reverse=True
    )
    return rows


def pareto_front(rows, x="params", y=OBJECTIVE):
    """The rows no other row beats on both fewer ``x`` and higher ``y``.

    Rows without a ``y`` and over-budget rows are left out. Sorted by ``x``.
    """
    points = [
        r
        for r in rows
        if r.get(y) is not None
        and r.get(x) is not None
        and r.get("within_budget", True)
    ]
    points.sort(key=lambda r: (r[x], -r[y]))
    front, best = [], -np.inf
    for r in points:
        if r[y] > best:
            front.append(r)
            best = r[y]
    return front


def markdown_results(rows):
    """`results_table` rows as a Markdown table."""
    from sb_keras.analysis import markdown_table

    return markdown_table(rows)


def _label(row):
    if row.get("sharing") in (None, "plain"):
        return "plain"
    tag = f"S{row['shared_rank']}U{row['unique_rank']}"
    if row["sharing"] == "double":
        tag += "*"
    return f"{tag} l={row['orthogonality']:g}"


def plot_pareto(rows, path=None, x="params", dpi=80):
    """Validation accuracy against parameters (or MACs), with the front.

    Args:
        rows: `results_table` rows.
        path: write a PNG there (folders are created). None: only return.
        x: `"params"` or `"macs"`.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib figure.
    """
    from sb_keras.analysis import _pyplot
    from sb_keras.analysis import _save

    if x not in ("params", "macs"):
        raise ValueError(f"`x` must be 'params' or 'macs'. Received: x={x!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r.get(OBJECTIVE) is not None and r.get(x) is not None]
    colors = {"plain": "tab:gray", "single": "tab:blue", "double": "tab:orange"}
    for sharing, color in colors.items():
        pts = [r for r in done if (r.get("sharing") or "plain") == sharing]
        if pts:
            ax.scatter(
                [r[x] for r in pts],
                [r[OBJECTIVE] for r in pts],
                c=color,
                label=sharing,
                alpha=[1.0 if r.get("within_budget", True) else 0.3 for r in pts],
            )
    front = pareto_front(done, x=x)
    if front:
        ax.step(
            [r[x] for r in front],
            [r[OBJECTIVE] for r in front],
            where="post",
            color="black",
            lw=1,
            label="Pareto front",
        )
        for r in front:
            ax.annotate(_label(r), (r[x], r[OBJECTIVE]), fontsize=7)
    ax.set_xlabel("parameters" if x == "params" else "MACs per image")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if path:
        _save(fig, path, dpi)
    return fig
