"""The orthogonality penalty on filter bases, as pure tensor functions.

Kang & Kim (*Learning Deeply Shared Filter Bases for Efficient ConvNets*,
official code ``ssregibility/Net_RL2``) add to the cross entropy a penalty

    R = sum_g sum_{(i, j) in Omega_g} D_g[i, j] / sum_g |Omega_g|,
    D_g = (M_g M_g^T - I) ** 2   (element-wise),

where the rows of ``M_g`` are the flattened 3-D filters of the bases of stage
``g``. ``R`` is a *pooled* mean over all stages, not a per-stage mean, and the
loss is ``CE + lambda * R`` with ``lambda = 10``. The entries ``Omega_g`` are
either all entries among the shared rows (the default, used for CIFAR-100 and
ImageNet) or, in the CIFAR-10 variant, additionally the shared-to-unique
entries of each layer's unique rows (once per pair) and each layer's own
unique-to-unique block.

Because the normalizer ``sum_g |Omega_g|`` is a constant of the architecture,
``lambda * R`` splits exactly into one term per owner of entries: the shared
basis owns its shared-to-shared block and every decomposed layer owns the
entries of its unique rows. Each term is ``lambda * sum(entries) / N`` with the
same global ``N``. This module computes those sums; the layers add them with
``add_loss`` once per forward pass.
"""

from keras import ops


def kernel_rows(kernel):
    """Flattens a Keras conv kernel ``(kh, kw, c_in, c_out)`` to filter rows.

    Returns a ``(c_out, kh * kw * c_in)`` matrix whose rows are the filters.
    The column order differs from PyTorch's ``(c_in, kh, kw)`` order, which
    leaves every inner product between filters unchanged.
    """
    kernel = ops.convert_to_tensor(kernel)
    c_out = kernel.shape[-1]
    return ops.transpose(ops.reshape(kernel, (-1, c_out)))


def gram_deviation_sum(rows):
    """``sum((M M^T - I) ** 2)`` for the rows ``M`` of shape ``(n, d)``."""
    gram = ops.matmul(rows, ops.transpose(rows))
    eye = ops.eye(ops.shape(rows)[0], dtype=rows.dtype)
    return ops.sum(ops.square(gram - eye))


def cross_gram_sum(rows_a, rows_b):
    """``sum((A B^T) ** 2)``: the off-diagonal entries between two row sets."""
    return ops.sum(ops.square(ops.matmul(rows_a, ops.transpose(rows_b))))


def shared_penalty_sum(kernels):
    """Sum of ``D`` over all entries among the rows of the shared kernels.

    Args:
        kernels: a list of conv kernels ``(kh, kw, c_in, s_i)`` that are
            penalized jointly (their rows are stacked in order).

    Returns:
        A float32 scalar tensor.
    """
    rows = ops.concatenate(
        [kernel_rows(ops.cast(k, "float32")) for k in kernels], axis=0
    )
    return gram_deviation_sum(rows)


def unique_penalty_sum(shared_kernels, unique_kernel):
    """Entries owned by one layer's unique rows in the CIFAR-10 variant.

    The shared-to-unique entries ``D[s, u]`` (counted once per pair) plus the
    layer's own ``u x u`` block ``D[u, u]``.
    """
    shared = ops.concatenate(
        [kernel_rows(ops.cast(k, "float32")) for k in shared_kernels], axis=0
    )
    unique = kernel_rows(ops.cast(unique_kernel, "float32"))
    return cross_gram_sum(shared, unique) + gram_deviation_sum(unique)


def shared_entry_count(shared_ranks):
    """``|Omega|`` owned by a shared basis: ``(sum of ranks) ** 2``."""
    total = sum(shared_ranks)
    return total * total


def unique_entry_count(shared_ranks, unique_rank):
    """``|Omega|`` owned by one layer's ``unique_rank`` rows."""
    return sum(shared_ranks) * unique_rank + unique_rank * unique_rank


def orthogonality_penalty(shared_kernels, unique_kernels=()):
    """The authors' penalty ``R`` for one group of bases (one stage).

    This is the plain pooled mean of one stage, without the cross-stage
    pooling: ``sum(entries) / |Omega|``. With ``unique_kernels`` it is the
    CIFAR-10 variant.

    Example:

    >>> import numpy as np
    >>> from sb_keras.regularizers import orthogonality_penalty
    >>> q, _ = np.linalg.qr(np.random.randn(36, 4))  # 4 orthonormal columns
    >>> basis = q.reshape(3, 3, 4, 4).astype("float32")
    >>> round(float(orthogonality_penalty([basis])), 6)
    0.0
    """
    ranks = [int(k.shape[-1]) for k in shared_kernels]
    total = shared_penalty_sum(shared_kernels)
    count = shared_entry_count(ranks)
    for unique in unique_kernels:
        total = total + unique_penalty_sum(shared_kernels, unique)
        count += unique_entry_count(ranks, int(unique.shape[-1]))
    return total / float(count)


def validate_lambda(value, name="orthogonality"):
    """Checks a penalty weight; returns it as a float."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a non-negative number. Received: {name}={value!r}"
        ) from None
    if value < 0 or value != value:
        raise ValueError(
            f"`{name}` must be a non-negative number. Received: {name}={value}"
        )
    return value


__all__ = [
    "kernel_rows",
    "gram_deviation_sum",
    "cross_gram_sum",
    "shared_penalty_sum",
    "unique_penalty_sum",
    "shared_entry_count",
    "unique_entry_count",
    "orthogonality_penalty",
]
