"""Names the ``train`` command lists in its help, kept here so that help needs no torch.

The registries (``medmeta.methods``, ``medmeta.backbones``) import torch; ``medmeta --help``
must answer without it. ``tests/test_train_config.py`` checks these lists against the
registries, so a new method or backbone fails a test until it is added here.
"""

from __future__ import annotations

METHOD_NAMES = ("anil", "fomaml", "maml", "mann", "matching", "protonet")
BACKBONE_NAMES = ("conv4", "resnet12")
AUGMENT_NAMES = ("none", "light", "strong")
CONFORMAL_SCORES = ("lac", "aps")
DEVICE_NAMES = ("auto", "cpu", "cuda")
