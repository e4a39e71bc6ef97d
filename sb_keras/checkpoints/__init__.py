"""The authors' PyTorch checkpoints in sb_keras, read without torch.

Kang & Kim released CIFAR-10 checkpoints of their shared-basis ResNets
(``ssregibility/Net_RL2``). This package reads such files with Python's
`pickle` and NumPy only and places every tensor in the matching
`sb_keras.ResNet`. It has three parts:

* `sb_keras.checkpoints.reader` -- `read_checkpoint` / `read_state_dict`:
  a *restricted* reader of both serializations of ``torch.save`` (the
  legacy one, a sequence of pickles followed by the raw storages, and the
  zip archive of torch >= 1.6). The unpickler accepts only the globals a
  state dict needs (tensor rebuild functions, storage types,
  ``OrderedDict``) and refuses anything else before it can run, so loading
  a file never executes code from it. Memory and time are bounded by the
  file's size (see the module's limits): a hostile file is refused with a
  `CheckpointError`, it cannot make the reader allocate gigabytes or
  recurse without bound.
* `sb_keras.checkpoints.writer` -- `write_checkpoint`: nested dicts of
  arrays as a torch-format file (legacy or zip) that ``torch.load`` and
  the reader both accept.
* `sb_keras.checkpoints.authors` -- the authors' key layout:
  `infer_architecture`, `convert_state_dict`, `load_authors_checkpoint`
  (depth, ranks and sharing mode are inferred from the tensor names and
  shapes; every kernel is transposed from PyTorch's ``(out, in, kh, kw)``
  to Keras' ``(kh, kw, in, out)``, coefficient rows keep the authors' order
  [unique, shared], BN statistics and ``num_batches_tracked`` are copied)
  and the inverse, `authors_state_dict` / `save_authors_state_dict`.

A converted model keeps the authors' preprocessing (it takes RGB pixels in
``[0, 255]`` and normalizes them inside the model with the ImageNet
statistics their CIFAR-10 code used; method §3.5) and their training step:
its BatchNorms update the running variance with the unbiased batch
variance and count ``num_batches_tracked``, as PyTorch
(``batchnorm="pytorch"`` of `sb_keras.ResNet`).

Example:

>>> import sb_keras
>>> model = sb_keras.load_authors_checkpoint(
...     "CIFAR10_ResNet32_Double_S16U1_6.93err.pth")  # doctest: +SKIP
>>> model.name  # doctest: +SKIP
'resnet32_s16u1_double'

Reference: Woochul Kang and Daeyeon Kim, *Learning Deeply Shared Filter
Bases for Efficient ConvNets* (arXiv 2006.05066); official code and
checkpoints ``ssregibility/Net_RL2``.
"""

from sb_keras.checkpoints.authors import authors_state_dict
from sb_keras.checkpoints.authors import convert_state_dict
from sb_keras.checkpoints.authors import infer_architecture
from sb_keras.checkpoints.authors import load_authors_checkpoint
from sb_keras.checkpoints.authors import save_authors_state_dict
from sb_keras.checkpoints.reader import read_checkpoint
from sb_keras.checkpoints.reader import read_state_dict
from sb_keras.checkpoints.unpickler import CheckpointError
from sb_keras.checkpoints.unpickler import UnsafeCheckpointError
from sb_keras.checkpoints.writer import write_checkpoint

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "authors_state_dict",
    "convert_state_dict",
    "infer_architecture",
    "load_authors_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "save_authors_state_dict",
    "write_checkpoint",
]
