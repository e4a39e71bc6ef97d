"""Times the two compute routes of `ACDCConv2D` (atoms vs composed kernel).

For each layer shape, one training step (forward + backward, batch of
``--batch`` images) of a single ACDC convolution sharing one alpha is timed
with each route; the table shows the MAC saving of the atom route and the
measured speed-up, from which ``ATOM_ROUTE_MIN_SAVING`` (the rule of
``route="auto"``) was set.

    PYTHONPATH=. python bench/acdc_routes.py --batch 64 --repeats 10
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from sb_keras.layers import ACDCCoefficients  # noqa: E402
from sb_keras.layers import ACDCConv2D  # noqa: E402
from sb_keras.layers.acdc_conv import route_macs  # noqa: E402

# (channels in, filters, spatial size, group, atoms)
SHAPES = [
    (64, 64, 32, 64, 8),
    (64, 64, 32, 16, 8),
    (128, 128, 16, 64, 8),
    (256, 256, 8, 64, 8),
    (512, 512, 4, 64, 8),
    (512, 512, 4, 64, 4),
    (512, 512, 4, 16, 4),
    (256, 256, 8, 16, 2),
    (64, 64, 32, 64, 2),
    (64, 64, 32, 16, 2),
    (128, 128, 16, 16, 4),
    (128, 128, 16, 64, 2),
    (16, 16, 32, 16, 4),
    (64, 64, 8, 16, 4),
]


def time_step(c, f, size, group, m, route, batch, repeats):
    x = tf.random.normal((batch, size, size, c))
    owner = ACDCCoefficients(m, group)
    conv = ACDCConv2D(f, route=route)
    owner.build()
    conv.build([(None, size, size, c), owner.alpha_shape])
    variables = [owner.alpha, conv.atoms]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = conv([x, owner(x)])
            loss = tf.reduce_mean(y * y)
        return tape.gradient(loss, [v.value for v in variables])

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print("| C | F | HxW | group | m | MAC saving | kernel ms | atoms ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, f, size, group, m in SHAPES:
        atoms, kernel = route_macs(c, f, m, group, group, 3)
        tk = time_step(c, f, size, group, m, "kernel", args.batch, args.repeats)
        ta = time_step(c, f, size, group, m, "atoms", args.batch, args.repeats)
        print(
            f"| {c} | {f} | {size} | {group} | {m} | {kernel / atoms:.1f}x "
            f"| {tk * 1e3:.1f} | {ta * 1e3:.1f} | {tk / ta:.2f}x |"
        )


if __name__ == "__main__":
    main()
