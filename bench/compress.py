"""Post-training compression of the folded authors' ResNet56 (no fine-tune).

The authors' ResNet56-S16U1 is folded into its plain ResNet-56
(`sb_keras.unshare`: 853,018 parameters, same logits), then compressed to
smaller ranks with `sb_keras.compress` (single/double sharing, whitened or
plain) and, as a baseline with the same parameter count in the compressed
layers, each of those layers is replaced by its own truncated SVD (no
sharing). Prints top-1 on the 1000 exact CIFAR-10 test images before any
fine-tuning, the kernel relative error and the L-BFGS iterations.

Usage (from the repo root, the data beside it in ../shared):

    python bench/compress.py [--ranks 8,1 4,1] [--calibration 512]
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")

import sb_keras  # noqa: E402
from sb_keras.compression import resnet as cr  # noqa: E402


def _top1(model, x, y):
    return float(np.mean(model.predict(x, batch_size=250, verbose=0).argmax(1) == y))


def low_rank_baseline(plain, shared, sharing):
    """Each compressed layer replaced by its own truncated SVD, same params.

    For every group, the rank ``r`` is the one whose per-layer factors
    ``r (F + 9C)`` add up to the parameters of the group's shared basis,
    unique bases and coefficients in ``shared`` (rounded down).

    Returns:
        ``(model, params)``: the plain model with the low-rank kernels and
        its parameter count when each of those kernels is stored factored.
    """
    baseline = sb_keras.ResNet(**plain.get_config())
    baseline.set_weights(plain.get_weights())
    params = sb_keras.count_params(plain)
    for g, _, names in cr._groups(plain, sharing):
        s = shared.shared_rank * 2**g
        u = shared.unique_rank * 2**g
        kernel = plain.get_layer(names[0]).kernel
        d, f = int(np.prod(kernel.shape[:3])), kernel.shape[3]
        budget = s * d + len(names) * (u * d + f * (s + u))
        r = max(1, budget // (len(names) * (f + d)))
        for name in names:
            w = cr._kernel_matrix(plain.get_layer(name).kernel)
            a, sv, vt = np.linalg.svd(w, full_matrices=False)
            approx = (a[:, :r] * sv[:r]) @ vt[:r]
            layer = baseline.get_layer(name)
            layer.kernel.assign(approx.T.reshape(kernel.shape).astype(np.float32))
            params += r * (f + d) - f * d
    return baseline, params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", default=["8,1", "4,1"])
    parser.add_argument("--sharings", nargs="+", default=["single", "double"])
    parser.add_argument("--methods", nargs="+", default=["whitened", "plain"])
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args(argv)
    path = os.path.join(
        SHARED, "pretrained", "net_rl2", "CIFAR10_ResNet56_S16U1_7.46err.pth.pth"
    )
    with np.load(
        os.path.join(SHARED, "datasets", "cifar10", "lossless_subset.npz")
    ) as f:
        x, y = f["x_test"][: args.limit].astype("float32"), f["y_test"][: args.limit]
        calib = f["x_train"][: args.calibration].astype("float32")
    plain = sb_keras.unshare(sb_keras.load_authors_checkpoint(path))
    print(
        f"plain ResNet-56 (folded authors' S16U1): {sb_keras.count_params(plain):,} "
        f"params, top-1 {100 * _top1(plain, x, y):.1f}% on {len(x)} exact images"
    )
    print("| ranks | sharing | method | params | top-1 | max rel. error | iters | s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for ranks in args.ranks:
        s, u = (int(v) for v in ranks.split(","))
        for sharing in args.sharings:
            shared = None
            for method in args.methods:
                t = time.time()
                shared, report = sb_keras.compress(
                    plain,
                    s,
                    u,
                    sharing=sharing,
                    calibration_data=calib if method == "whitened" else None,
                    method=method,
                )
                seconds = time.time() - t
                err = max(g["relative_error"] for g in report["groups"])
                iters = max(g["iterations"] for g in report["groups"])
                print(
                    f"| S{s}U{u} | {sharing} | {method} | "
                    f"{report['params_after']:,} | {100 * _top1(shared, x, y):.1f}% | "
                    f"{err:.3f} | {iters} | {seconds:.0f} |",
                    flush=True,
                )
            baseline, lr_params = low_rank_baseline(plain, shared, sharing)
            print(
                f"| S{s}U{u} | {sharing} | per-layer SVD (no sharing) | "
                f"{lr_params:,} | {100 * _top1(baseline, x, y):.1f}% | - | - | - |",
                flush=True,
            )


if __name__ == "__main__":
    main()
