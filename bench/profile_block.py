"""Where a shared ResNet's training time goes, and what the layer does about it.

Three tables, each timed forward + backward in interleaved rounds (median):

1. **BatchNorm kernels** at the channel counts of a CIFAR ResNet56-S16U1
   (16/32/64 filters, 17/33/65 basis channels): Keras's BatchNormalization
   (moments and normalization as separate element-wise ops) against
   ``tf.nn.fused_batch_norm``. The fused kernel is 2-3x faster on aligned
   channel counts and several times *slower* on odd ones (17, 33, 65).
2. **One decomposed convolution** (batch 128, the shapes of stage 1 and
   stage 3) against the plain conv it replaces:

   * ``plain``: Conv2D + Keras BatchNormalization (the plain ResNet);
   * ``two_step``: the paper's definition, basis conv -> Keras BN -> 1x1
     coefficients -> Keras BN;
   * ``two_step_fused``: the same with fused BNs (the layer of the first
     release);
   * ``BasisConv2D``: the layer as it is now (one normalization pass in
     training: the basis BN's scale folded into the coefficients, a
     hand-written variance gradient, a fused BN on the aligned output).
3. With ``--trace``, the TensorFlow profiler's self time per op type over a
   full ``train_on_batch`` of ResNet-56 plain and S16U1 (summed over
   threads, so larger than the wall time).
4. With ``--precision`` (alone), the same profile of one model in float32
   and in mixed_bfloat16 side by side: which op types bfloat16 speeds up
   and which it does not.

Usage::

    PYTHONPATH=. python bench/profile_block.py --rounds 7 [--trace]
    PYTHONPATH=. python bench/profile_block.py --precision [--model resnet56]

Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
ConvNets* (arXiv 2006.05066).
"""

import argparse
import glob
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sb_keras  # noqa: E402


def _timed(fns, rounds):
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _grad_fn(forward, x, variables):
    @tf.function
    def run(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = forward(z)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [z, *variables], unconnected_gradients="zero")

    return lambda: [g.numpy() for g in run(x)]


def _bn(channels):
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    bn.build((None, None, None, channels))
    return bn


def bn_table(batch, rounds):
    fns = {}
    for hw, c in ((32, 16), (32, 17), (16, 32), (16, 33), (8, 64), (8, 65)):
        x = tf.random.normal((batch, hw, hw, c))
        bn = _bn(c)
        fns[(hw, c, "keras")] = _grad_fn(
            lambda z, bn=bn: bn(z, training=True), x, [bn.gamma.value]
        )
        fns[(hw, c, "fused")] = _grad_fn(
            lambda z, bn=bn: tf.compat.v1.nn.fused_batch_norm(
                z, bn.gamma, bn.beta, epsilon=1e-5, is_training=True
            )[0],
            x,
            [bn.gamma.value],
        )
    t = _timed(fns, rounds)
    print("\n1. BatchNorm forward+backward, batch", batch)
    print("| activations | Keras BN (ms) | fused (ms) | fused speed-up |")
    print("|---|---:|---:|---:|")
    for hw, c, kind in fns:
        if kind == "keras":
            k, f = t[(hw, c, "keras")], t[(hw, c, "fused")]
            print(f"| {hw}x{hw}x{c} | {k:.1f} | {f:.1f} | {k / f:.2f}x |")


def _conv_variants(batch, hw, c):
    r = c + 1  # S16U1-style: c shared + 1 unique basis filters
    x = tf.random.normal((batch, hw, hw, c))
    inp = keras.Input((hw, hw, c))
    basis = sb_keras.layers.FilterBasis(rank=c, in_channels=c)(inp)
    layer = sb_keras.layers.BasisConv2D(c, unique_rank=1)
    model = keras.Model(inp, layer([inp, basis]))
    kb = tf.Variable(tf.random.normal((3, 3, c, r)) * 0.1)
    k3 = tf.Variable(tf.random.normal((3, 3, c, c)) * 0.1)
    a = tf.Variable(tf.random.normal((1, 1, r, c)) * 0.1)
    bn_c, bn_r = _bn(c), _bn(r)

    def conv(z, k):
        return tf.nn.conv2d(z, k, 1, "SAME")

    def fused(bn, z):
        return tf.compat.v1.nn.fused_batch_norm(
            z, bn.gamma, bn.beta, epsilon=1e-5, is_training=True
        )[0]

    variants = {
        "plain": (lambda z: bn_c(conv(z, k3), training=True), [k3]),
        "two_step": (
            lambda z: bn_c(conv(bn_r(conv(z, kb), training=True), a), training=True),
            [kb, a],
        ),
        "two_step_fused": (
            lambda z: fused(bn_c, conv(fused(bn_r, conv(z, kb)), a)),
            [kb, a],
        ),
        "BasisConv2D": (
            lambda z: model(z, training=True),
            [w.value for w in model.trainable_weights],
        ),
    }
    return {name: _grad_fn(f, x, v) for name, (f, v) in variants.items()}


def conv_table(batch, rounds):
    rows = {}
    for hw, c in ((32, 16), (8, 64)):
        for name, fn in _conv_variants(batch, hw, c).items():
            rows[(hw, c, name)] = fn
    t = _timed(rows, rounds)
    print("\n2. One 3x3 convolution, forward+backward, batch", batch)
    print("| shape | variant | ms | speed vs plain |")
    print("|---|---|---:|---:|")
    for hw, c, name in rows:
        base = t[(hw, c, "plain")]
        ms = t[(hw, c, name)]
        print(f"| {hw}x{hw}x{c} | {name} | {ms:.1f} | {base / ms:.2f}x |")


def _op_profile(model, x, y, steps):
    """Profiler self time per op type (microseconds per step), IDLE dropped."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as pp

    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        wall = (time.perf_counter() - t0) / steps
        tf.profiler.experimental.stop()
        paths = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data, _ = pp.xspace_to_tools_data(paths, "framework_op_stats", {})
    table = json.loads(data)
    table = table[0] if isinstance(table, list) else table
    cols = {c["id"]: i for i, c in enumerate(table["cols"])}
    per_type = {}
    for row in table["rows"]:
        cells = [c.get("v") for c in row["c"]]
        op = cells[cols["type"]]
        per_type[op] = per_type.get(op, 0.0) + cells[cols["total_self_time"]] / steps
    per_type.pop("IDLE", None)
    return per_type, wall


def _batch(batch):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 10, batch)


def trace_table(batch, steps=3, top=12):
    x, y = _batch(batch)
    print(f"\n3. Profiler self time per op type, train_on_batch, batch {batch}")
    for name in ("resnet56", "resnet56_s16u1"):
        per_type, _ = _op_profile(sb_keras.get_model(name), x, y, steps)
        total = sum(per_type.values())
        print(f"\n{name}: {total / 1000:.0f} ms of op time per step")
        print("| op type | ms/step | share |")
        print("|---|---:|---:|")
        for op, us in sorted(per_type.items(), key=lambda kv: -kv[1])[:top]:
            print(f"| {op} | {us / 1000:.0f} | {100 * us / total:.0f} % |")


def precision_table(batch, model_name="resnet56", steps=3, top=14):
    """Per op type, float32 against mixed_bfloat16: where bf16 gains, where not.

    The profiler's self time is summed over threads (so above the wall
    time); the wall time per step is printed beside it (with the profiler
    on, a little slower than without).
    """
    x, y = _batch(batch)
    profiles = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            profiles[policy] = _op_profile(sb_keras.get_model(model_name), x, y, steps)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    (f32, wall32), (b16, wall16) = profiles["float32"], profiles["mixed_bfloat16"]
    t32, t16 = sum(f32.values()), sum(b16.values())
    print(
        f"\n4. {model_name}, train_on_batch, batch {batch}: float32 against "
        f"mixed_bfloat16, profiler self time per op type (ms/step)"
    )
    print(
        f"wall: {1000 * wall32:.0f} / {1000 * wall16:.0f} ms per step "
        f"({wall32 / wall16:.2f}x); op time {t32 / 1000:.0f} / {t16 / 1000:.0f} ms "
        f"({t32 / t16:.2f}x)"
    )
    print("| op type | float32 | bf16 | speed-up | share of bf16 step |")
    print("|---|---:|---:|---:|---:|")
    ops = sorted(set(f32) | set(b16), key=lambda k: -max(f32.get(k, 0), b16.get(k, 0)))
    for op in ops[:top]:
        a, b = f32.get(op, 0.0), b16.get(op, 0.0)
        ratio = f"{a / b:.2f}x" if a and b else "-"
        print(
            f"| {op} | {a / 1000:.1f} | {b / 1000:.1f} | {ratio} | "
            f"{100 * b / t16:.0f} % |"
        )
    rest32 = sum(f32.get(k, 0.0) for k in ops[top:])
    rest16 = sum(b16.get(k, 0.0) for k in ops[top:])
    print(f"| (other) | {rest32 / 1000:.1f} | {rest16 / 1000:.1f} | | |")
    return profiles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--trace", action="store_true", help="profile full train steps")
    p.add_argument(
        "--precision",
        action="store_true",
        help="only table 4: float32 against mixed_bfloat16 per op type",
    )
    p.add_argument("--model", default="resnet56", help="for --precision")
    args = p.parse_args(argv)
    if args.precision:
        precision_table(args.batch_size, args.model)
        return
    bn_table(args.batch_size, args.rounds)
    conv_table(args.batch_size, args.rounds)
    if args.trace:
        trace_table(args.batch_size)


if __name__ == "__main__":
    main()
