"""Importing TensorFlow without its start-up log lines.

TensorFlow logs through absl at import time (oneDNN, CUDA and CPU-feature
notices, "All log messages before absl::InitializeLog() ...") straight to
the process's stderr, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. They tell a
user of ``sb-keras`` nothing, so the first import of TensorFlow runs with
file descriptors 1 and 2 redirected; if the import fails, the captured text
is written back to stderr. ``TF_CPP_MIN_LOG_LEVEL=0`` keeps them.
"""

import os
import sys
import tempfile


def import_tensorflow_quietly():
    """Imports TensorFlow once, its start-up logs discarded (see module)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


import_tensorflow_quietly()
