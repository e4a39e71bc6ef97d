"""`train`: one function (and one command) from a model name to a `.keras`."""

import dataclasses
import json
import os

PRECISIONS = ("float32", "mixed_bfloat16")
DEFAULT_MODEL = "resnet56_s16u1_double"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; the defaults are Kang & Kim's CIFAR recipe.

    Attributes:
        model: a registry name (`sb_keras.list_models()`). None: the
            model saved in ``init_from``, else ``"resnet56_s16u1_double"``.
        dataset: `"cifar10"`, `"cifar100"` or `"imagenet"`.
        epochs: epochs to train. Paper: 300.
        batch_size: the *global* batch (per-replica batch x replicas); it
            must divide by the number of replicas. Paper: 256.
        lr: initial learning rate. Paper: 0.1.
        momentum: SGD momentum. Paper: 0.9.
        schedule: `"step"` (x0.1 at 50 % and 75 % of the epochs, the
            paper's 150/225 of 300), `"step:E1,E2"`, `"cosine"`,
            `"constant"`.
        weight_decay: coupled L2 (PyTorch semantics) on every parameter.
            Paper: 5e-4 (CIFAR), 1e-4 (ImageNet ResNet-34).
        orthogonality: lambda of the models' orthogonality penalty (10).
        precision: `"float32"` or `"mixed_bfloat16"`.
        strategy: `"auto"`, `"mirrored"`, `"multiworker"` or `"none"`.
        devices: logical CPU devices (or GPUs) for `"mirrored"`/`"auto"`.
        seed: seed of weights, shuffling and augmentation.
        data_dir: folder with the data (see `sb_keras.data`).
        output: folder of the run (checkpoints, logs, model, metrics).
        limit: use only the first ``limit`` training images.
        test_limit: use only ``test_limit`` test images (CIFAR: evenly
            spaced; ImageNet: the first of the validation stream).
        image_size: ImageNet only: the side of the training and
            validation crops (default 224; smaller for quick runs).
        deterministic: deterministic TensorFlow ops (bitwise-reproducible
            runs and resumptions; can be slower).
        verbose: Keras progress bar (1), one line per epoch (2) or none (0).
        tensorboard: write TensorBoard logs.
        model_args: constructor arguments overriding the registry's (e.g.
            ``{"depth": 14}`` for a tiny test model).
        init_from: start from this model file (fine-tuning): a ``.keras``
            file of sb_keras or an authors' ``.pth`` checkpoint
            (`sb_keras.training.finetune`); the model comes from the file.
        qat: train the quantization-aware twin of the model (folded, int8
            fake quant; `sb_keras.export.quantize_aware_model`).
    """

    model: str | None = None
    dataset: str = "cifar10"
    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    schedule: str = "step"
    weight_decay: float = 5e-4
    orthogonality: float = 10.0
    precision: str = "float32"
    strategy: str = "auto"
    devices: int | None = None
    seed: int = 0
    data_dir: str | None = None
    output: str = "runs/train"
    limit: int | None = None
    test_limit: int | None = None
    image_size: int | None = None
    deterministic: bool = False
    verbose: int = 1
    tensorboard: bool = True
    model_args: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None
    qat: bool = False

    def validate(self):
        """Checks every field; raises ValueError naming the bad one."""
        from sb_keras import data
        from sb_keras import paths
        from sb_keras import registry
        from sb_keras.training import distribute
        from sb_keras.training import recipe

        if self.init_from is None:
            registry.model_info(self.model or DEFAULT_MODEL)
        else:
            from sb_keras.training import finetune

            finetune.check_init_from(self.init_from)
            if self.precision != "float32":
                raise ValueError(
                    "A model loaded with `init_from` keeps the precision of its "
                    f"file; use float32. Received: precision={self.precision!r}"
                )
        if not isinstance(self.qat, bool):
            raise ValueError(f"`qat` must be a bool. Received: qat={self.qat!r}")
        if self.qat and self.precision != "float32":
            raise ValueError(
                "Quantization-aware training runs in float32. "
                f"Received: precision={self.precision!r} with qat=True"
            )
        data.check_dataset(self.dataset)
        for name in ("epochs", "batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        for name in ("limit", "test_limit", "devices", "image_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("lr", "momentum", "weight_decay", "orthogonality"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"`{name}` must be a number. Received: {name}={value!r}"
                )
            if value < 0 or (name == "lr" and value == 0):
                raise ValueError(
                    f"`{name}` must be {'> 0' if name == 'lr' else '>= 0'}. "
                    f"Received: {name}={value!r}"
                )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"`precision` must be one of {PRECISIONS}. "
                f"Received: precision={self.precision!r}"
            )
        if self.strategy not in distribute.STRATEGIES:
            raise ValueError(
                f"`strategy` must be one of {distribute.STRATEGIES}. "
                f"Received: strategy={self.strategy!r}"
            )
        if self.image_size is not None and self.dataset != "imagenet":
            raise ValueError(
                "`image_size` applies to dataset='imagenet' only. "
                f"Received: image_size={self.image_size!r}, "
                f"dataset={self.dataset!r}"
            )
        recipe.parse_schedule(self.schedule, self.epochs)
        paths.check_output_folder(self.output, "output")
        if not isinstance(self.model_args, dict):
            raise ValueError(
                f"`model_args` must be a dict. Received: model_args={self.model_args!r}"
            )
        owned = sorted(set(self.model_args) & {"num_classes", "input_shape", "name"})
        if owned:
            raise ValueError(
                f"`model_args` cannot set {', '.join(owned)}: the dataset sets "
                "the classes and the input shape (`--image-size`), and the "
                "registry entry the name. "
                f"Received: model_args={self.model_args!r}"
            )
        return self


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )


def build_model(config, num_classes, input_shape):
    """The registry model in ``config.precision``, compiled with the recipe.

    Build it inside the strategy's scope. The model outputs logits; the loss
    is sparse categorical cross-entropy plus the model's own orthogonality
    losses (``add_loss``), which Keras scales per replica like the main loss.
    With ``config.init_from`` the model is the file's; with ``config.qat``
    its quantization-aware twin (`sb_keras.training.finetune`).
    """
    import keras

    from sb_keras import registry
    from sb_keras.training import finetune

    if config.init_from is not None:
        model = finetune.initial_model(config, num_classes, input_shape)
        return finetune.quantize_aware(model) if config.qat else model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        model = registry.get_model(
            config.model or DEFAULT_MODEL,
            num_classes=num_classes,
            input_shape=input_shape,
            **{"orthogonality": float(config.orthogonality), **config.model_args},
        )
    finally:
        keras.config.set_dtype_policy(previous)
    return finetune.quantize_aware(model) if config.qat else model


def compile_model(model, config, steps_per_epoch, jit_compile=None):
    """Compiles ``model`` with `PyTorchSGD` and the learning-rate schedule."""
    import keras
    import tensorflow as tf

    from sb_keras.training.optimizers import PyTorchSGD
    from sb_keras.training.recipe import learning_rate_schedule

    if jit_compile is None:  # XLA trains ~3x slower on CPU (keras-tf-facts Q9)
        jit_compile = bool(tf.config.list_physical_devices("GPU"))
    lr = learning_rate_schedule(
        config.lr, config.schedule, config.epochs, steps_per_epoch
    )
    model.compile(
        optimizer=PyTorchSGD(
            lr, momentum=config.momentum, weight_decay=config.weight_decay
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def train(config=None, callbacks=(), **overrides):
    """Trains a registered model; the run survives a kill and resumes.

    Steps: validate everything (names, data, batch vs replicas) before any
    training; build the model and optimizer in the strategy's scope; train
    with Keras ``fit`` (progress bar, TensorBoard, CSV log, best and last
    checkpoints, an atomic per-epoch state, `NaNGuard`); evaluate on the test
    split; save ``model.keras`` and ``metrics.json`` in ``config.output``.
    Every file is written atomically (`sb_keras.io_utils`). Running the same
    call again after a crash at any instant resumes from the last complete
    state (`sb_keras.training.state`; a damaged one is skipped and named),
    and once the run has finished it returns its metrics and changes no
    file. A resumption sees exactly the data the uninterrupted run would see
    (CIFAR, in memory). ImageNet is streamed from tensorflow-datasets
    (`sb_keras.imagenet.load_streams`): a resumed run starts at the right
    epoch with that epoch's shuffle and crop seeds, but the streamed files
    are not replayed batch for batch.

    Args:
        config: a `TrainConfig` (or None for the defaults).
        callbacks: extra Keras callbacks (run after the NaN guard).
        **overrides: fields of `TrainConfig` to change.

    Returns:
        The metrics dict written to ``metrics.json``.

    Example:

    >>> from sb_keras.training import train
    >>> metrics = train(model="resnet20_s16u1_double", data_dir="cifar10/",
    ...                 epochs=2, limit=2000, output="runs/demo")
    ... # doctest: +SKIP
    >>> metrics = train(model="resnet34_s32u1_double_imagenet",
    ...                 dataset="imagenet", data_dir="tensorflow_datasets/",
    ...                 epochs=90, weight_decay=1e-4, schedule="step:30,60",
    ...                 output="runs/r34")  # doctest: +SKIP

    Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
    ConvNets* (arXiv 2006.05066), §3.5 of the method notes (the recipe).
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    from sb_keras import data
    from sb_keras.training import distribute

    if (
        config.devices
        and config.devices > 1
        and config.strategy in ("auto", "mirrored")
    ):
        distribute.configure_cpu_devices(config.devices)  # before TF starts
    info = data.check_dataset(config.dataset)
    data.find_source(config.dataset, "train", config.data_dir)
    data.find_source(config.dataset, "test", config.data_dir)

    import keras
    import tensorflow as tf

    strategy = distribute.make_strategy(config.strategy, config.devices)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"`batch_size` (the global batch) must be divisible by the "
            f"{replicas} replicas. Received: batch_size={config.batch_size}"
        )
    keras.utils.set_random_seed(config.seed)  # before the input pipelines
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief()
    output = config.output
    if not chief:
        output = os.path.join(output, distribute.task_id())

    from sb_keras import io_utils
    from sb_keras.training import recipe
    from sb_keras.training import state

    backup_dir = os.path.join(output, "backup")
    for folder in (output, os.path.join(output, "checkpoints"), backup_dir):
        io_utils.remove_temporaries(folder)  # left by a killed writer
    resume = state.find_resume_state(backup_dir)
    initial_epoch = resume.epoch if resume else 0
    if resume is not None and resume.epoch == config.epochs:
        finished = state.finished_metrics(output, resume)
        if finished is not None:  # a rerun of a finished run changes nothing
            return finished
    if config.dataset == "imagenet":
        train_ds, test_ds, steps, n_train, n_test, input_shape = _imagenet_input(
            config, initial_epoch
        )
    else:
        train_ds, test_ds, steps, n_train, n_test, input_shape = _array_input(
            config, initial_epoch
        )
    os.makedirs(output, exist_ok=True)
    with strategy.scope():
        model = build_model(config, info["classes"], input_shape)
        compile_model(model, config, steps)
    if config.model is None:  # named by init_from's file, or the default
        config = dataclasses.replace(config, model=model.name)

    cbs = recipe.make_callbacks(
        output,
        strategy=strategy,
        tensorboard=config.tensorboard,
        extra=callbacks,
        resume=resume,
    )
    backup = next(cb for cb in cbs if isinstance(cb, state.StateBackup))
    with distribute.multi_worker_fit_fix(strategy):
        model.fit(
            train_ds,
            epochs=config.epochs,
            steps_per_epoch=steps,
            validation_data=test_ds,
            shuffle=False,  # each epoch is shuffled by the input pipeline
            callbacks=cbs,
            verbose=config.verbose,
        )
        results = model.evaluate(test_ds, verbose=0, return_dict=True)
    seconds = sum(backup.seconds)  # every epoch of the run, resumptions included
    done = len(backup.seconds)
    metrics = {
        "model": config.model,
        "dataset": config.dataset,
        "test_accuracy": float(results["accuracy"]),
        "test_loss": float(results["loss"]),
        "test_images": int(n_test),
        "train_images": int(n_train),
        "epochs": config.epochs,
        "resumed_at_epoch": initial_epoch,
        "replicas": replicas,
        "train_seconds": round(seconds, 2),
        "train_images_per_second": (
            round(done * steps * config.batch_size / seconds, 1) if seconds else None
        ),
        "history": backup.history,
        "config": dataclasses.asdict(config),
    }
    # model.keras first, metrics.json last: metrics.json marks a finished run.
    with io_utils.atomic_path(os.path.join(output, "model.keras")) as tmp:
        model.save(tmp)
    io_utils.write_bytes(
        os.path.join(output, "log.csv"),
        state.history_csv(backup.history),
        if_changed=True,
    )
    io_utils.write_bytes(
        os.path.join(output, "metrics.json"),
        json.dumps(metrics, indent=2),
        if_changed=True,
    )
    return metrics


def _array_input(config, initial_epoch):
    """CIFAR: the splits in memory, each epoch a function of (seed, epoch)."""
    import numpy as np

    from sb_keras import data

    x_train, y_train = data.load_arrays(
        config.dataset, "train", config.data_dir, config.limit
    )
    x_test, y_test = data.load_arrays(config.dataset, "test", config.data_dir)
    if config.test_limit and config.test_limit < len(x_test):
        # Evenly spaced, not the first N: a test split may be sorted by class.
        keep = np.linspace(0, len(x_test) - 1, config.test_limit).astype(int)
        x_test, y_test = x_test[keep], y_test[keep]
    if len(x_train) < config.batch_size:
        raise ValueError(
            f"`batch_size` is larger than the {len(x_train)} training images. "
            f"Received: batch_size={config.batch_size}"
        )
    train_ds = data.make_train_dataset(
        x_train,
        y_train,
        config.batch_size,
        seed=config.seed,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
    )
    test_ds = data.make_dataset(x_test, y_test, config.batch_size, deterministic=True)
    steps = len(x_train) // config.batch_size
    return train_ds, test_ds, steps, len(x_train), len(x_test), x_train.shape[1:]


def _imagenet_input(config, initial_epoch):
    """ImageNet: streamed from tfds (`sb_keras.imagenet.load_streams`).

    A resumed run starts at ``initial_epoch`` with that epoch's shuffle and
    crop seeds; the file order of a streamed source is not replayed batch
    for batch (see `load_streams`).
    """
    from sb_keras import imagenet

    size = config.image_size or imagenet.IMAGE_SIZE
    streams = imagenet.load_streams(
        config.batch_size,
        config.data_dir,
        seed=config.seed,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        limit=config.limit,
        test_limit=config.test_limit,
        image_size=size,
        deterministic=config.deterministic,
    )
    return (*streams, (size, size, 3))
