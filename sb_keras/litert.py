"""Evaluation of ``.tflite`` files with the LiteRT interpreter.

Uses ``ai_edge_litert.interpreter.Interpreter`` (``tf.lite.Interpreter`` is
deprecated). For each file: top-1 on real images, the file size and the
median latency at batch 1 with 1 and 2 threads, gathered in one table that
is printed and can be written as JSON and Markdown.

`evaluate_path` is the entry point for a ``.tflite`` path (e.g. from
``sb-keras evaluate``).
"""

import json
import os
import time

import numpy as np


def _interpreter(path, num_threads=1):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise ImportError(
            "Evaluating .tflite files needs ai-edge-litert: "
            "pip install 'ai-edge-litert==2.3.0' (or sb_keras[tflite])."
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such .tflite file. Received: path={path!r}")
    from sb_keras.export.tflite import quiet

    with quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        return Interpreter(model_path=os.fspath(path), num_threads=num_threads)


def _quantize_input(x, detail):
    if detail["dtype"] in (np.int8, np.uint8):
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        q = np.round(x / scale + zero)
        return np.clip(q, info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def _dequantize_output(y, detail):
    if detail["dtype"] in (np.int8, np.uint8):
        scale, zero = detail["quantization"]
        return (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def predict(path, images, batch_size=100, num_threads=2):
    """Float outputs of a ``.tflite`` model on ``images`` (quantized I/O handled).

    Args:
        path: the ``.tflite`` file.
        images: ``(N, H, W, C)`` images as the Keras model takes them.
        batch_size: images per invocation (the input is resized).
        num_threads: interpreter threads.

    Returns:
        A float32 array ``(N, classes)``.
    """
    images = np.asarray(images, np.float32)
    it = _interpreter(path, num_threads)
    inp = it.get_input_details()[0]
    expected = tuple(inp["shape"][1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"`images` must have shape (N, {', '.join(map(str, expected))}). "
            f"Received: images.shape={images.shape}"
        )
    outs, current = [], None
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if current != len(batch):
            it.resize_tensor_input(inp["index"], [len(batch), *expected])
            it.allocate_tensors()
            current = len(batch)
        detail = it.get_input_details()[0]
        it.set_tensor(detail["index"], _quantize_input(batch, detail))
        it.invoke()
        out = it.get_output_details()[0]
        outs.append(_dequantize_output(it.get_tensor(out["index"]), out))
    return np.concatenate(outs, axis=0)


def latency_ms(path, num_threads=1, runs=50, warmup=5):
    """Median wall time (ms) of one batch-1 invocation."""
    it = _interpreter(path, num_threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    x = np.zeros(inp["shape"], inp["dtype"])
    it.set_tensor(inp["index"], x)
    for _ in range(warmup):
        it.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def evaluate_path(
    path,
    images=None,
    labels=None,
    threads=(1, 2),
    runs=50,
    name=None,
    keras_outputs=None,
):
    """One table row for a ``.tflite`` file.

    Args:
        path: the ``.tflite`` file.
        images, labels: real test images and labels (None: no accuracy).
        threads: thread counts at which batch-1 latency is measured.
        runs: timed invocations per latency.
        name: the row's label (defaults to the file name).
        keras_outputs: the float Keras model's outputs on ``images``; adds
            the top-1 agreement with it.

    Returns:
        A dict: ``file, size_bytes, size_mb, latency_ms_{n}t, top1, n,
        agreement``.
    """
    row = {
        "file": name or os.path.basename(path),
        "size_bytes": os.path.getsize(path) if os.path.isfile(path) else None,
    }
    row["size_mb"] = row["size_bytes"] / 1e6 if row["size_bytes"] else None
    for n in threads:
        row[f"latency_ms_{n}t"] = latency_ms(path, n, runs=runs)
    if images is not None:
        out = predict(path, images)
        pred = out.argmax(-1)
        if labels is not None:
            row["top1"] = float(np.mean(pred == np.asarray(labels).reshape(-1)))
        row["n"] = int(len(images))
        if keras_outputs is not None:
            row["agreement"] = float(
                np.mean(pred == np.asarray(keras_outputs).argmax(-1))
            )
    return row


def format_table(rows):
    """Rows of `evaluate_path` as a Markdown table."""
    keys = []
    for row in rows:
        for k in row:
            if k not in keys:
                keys.append(k)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            if isinstance(v, float):
                v = f"{100 * v:.2f} %" if k in ("top1", "agreement") else f"{v:.3f}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows, json_path=None, markdown_path=None):
    """Prints the table and writes it as JSON and/or Markdown."""
    text = format_table(rows)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text + "\n")
    return text


def evaluate_files(
    paths,
    data_dir=None,
    dataset="cifar10",
    limit=None,
    threads=(1, 2),
    runs=50,
    json_path=None,
    markdown_path=None,
):
    """Evaluates ``.tflite`` files on a real test set; prints one table.

    This is the function ``sb-keras evaluate`` dispatches to for ``.tflite``
    paths.

    Example:

    >>> rows = evaluate_files(["m_int8.tflite"], data_dir="cifar10")
    ... # doctest: +SKIP
    """
    from sb_keras import data

    x, y = data.load_arrays(dataset, "test", data_dir=data_dir, limit=limit)
    rows = [
        evaluate_path(p, x.astype(np.float32), y, threads=threads, runs=runs)
        for p in paths
    ]
    write_table(rows, json_path, markdown_path)
    return rows
