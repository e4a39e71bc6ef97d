"""Where a shared ResNet's training time goes: one stage-1 conv, timed by part.

Times forward + backward (``tf.function``, batch 128, 32x32x16 input) of:

* ``plain``: 3x3 conv 16->16 + Keras BatchNormalization (the plain ResNet);
* ``plain_fused``: the same with ``tf.nn.fused_batch_norm``;
* ``decomposed``: 3x3 conv 16->17 (1 unique + 16 shared filters) + BN +
  1x1 conv 17->16 + BN, with Keras BNs (BasisConv2D before the fix);
* ``decomposed_fused``: the same with fused BNs (BasisConv2D now);
* ``decomposed_matmul``: fused BNs and the 1x1 conv as a matmul.

Interleaved rounds, median. The lesson on a 2-core CPU: Keras's
BatchNormalization (moments and normalization as separate element-wise ops,
forward and backward) costs as much as the convolution, and the decomposed
convolution has two of them; one fused kernel per BN halves that.

Usage::

    PYTHONPATH=. python bench/profile_block.py --rounds 8
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)

    b, c, r = args.batch_size, 16, 17
    x = tf.random.normal((b, 32, 32, c))
    k3 = tf.Variable(tf.random.normal((3, 3, c, c)) * 0.1)
    kb = tf.Variable(tf.random.normal((3, 3, c, r)) * 0.1)
    k1 = tf.Variable(tf.random.normal((1, 1, r, c)) * 0.1)
    bn_c, bn_r = (
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5) for _ in "cr"
    )
    bn_c.build((None, 32, 32, c))
    bn_r.build((None, 32, 32, r))

    def fused(bn, z):
        return tf.compat.v1.nn.fused_batch_norm(
            z, bn.gamma, bn.beta, epsilon=1e-5, is_training=True
        )[0]

    def keras_bn(bn, z):
        return bn(z, training=True)

    def conv(z, k):
        return tf.nn.conv2d(z, k, 1, "SAME")

    def matmul_1x1(z, k):
        flat = tf.reshape(z, (-1, k.shape[2])) @ tf.reshape(k, k.shape[2:])
        return tf.reshape(flat, (*z.shape[:3], k.shape[3]))

    variants = {
        "plain": lambda z: keras_bn(bn_c, conv(z, k3)),
        "plain_fused": lambda z: fused(bn_c, conv(z, k3)),
        "decomposed": lambda z: keras_bn(bn_c, conv(keras_bn(bn_r, conv(z, kb)), k1)),
        "decomposed_fused": lambda z: fused(bn_c, conv(fused(bn_r, conv(z, kb)), k1)),
        "decomposed_matmul": lambda z: fused(
            bn_c, matmul_1x1(fused(bn_r, conv(z, kb)), k1)
        ),
    }

    def step(f):
        @tf.function
        def run(z):
            with tf.GradientTape() as tape:
                tape.watch(z)
                y = f(z)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [z, k3, kb, k1], unconnected_gradients="zero")

        return run

    fns = {k: step(f) for k, f in variants.items()}
    for f in fns.values():
        f(x)
        f(x)
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            [g.numpy() for g in f(x)]
            times[k].append(time.perf_counter() - t0)
    base = np.median(times["plain"])
    print("| variant | forward+backward (ms) | vs plain |")
    print("|---|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {1000 * np.median(v):.1f} | {np.median(v) / base:.2f}x |")


if __name__ == "__main__":
    main()
