"""Training that scales: the paper's recipe, tf.distribute, crash-safe runs.

`train` (and ``sb-keras train``) trains a registered model with Kang & Kim's
recipe: `PyTorchSGD` (momentum 0.9, coupled weight decay 5e-4), lr 0.1 with
step decay at 50 %/75 % of the epochs, batch 256, orthogonality lambda 10.
Every value is a `TrainConfig` field. It runs under `MirroredStrategy` on
several GPUs or logical CPUs and under `MultiWorkerMirroredStrategy` from
``TF_CONFIG``, and resumes after a kill from the last finished epoch.
"""

from sb_keras.training.distribute import make_strategy
from sb_keras.training.distribute import multi_worker_fit_fix
from sb_keras.training.optimizers import PyTorchSGD
from sb_keras.training.recipe import NaNGuard
from sb_keras.training.recipe import NonFiniteLossError
from sb_keras.training.recipe import learning_rate_schedule
from sb_keras.training.trainer import TrainConfig
from sb_keras.training.trainer import build_model
from sb_keras.training.trainer import compile_model
from sb_keras.training.trainer import train

__all__ = [
    "NaNGuard",
    "NonFiniteLossError",
    "PyTorchSGD",
    "TrainConfig",
    "build_model",
    "compile_model",
    "learning_rate_schedule",
    "make_strategy",
    "multi_worker_fit_fix",
    "train",
]
