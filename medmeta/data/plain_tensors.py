"""MONAI transforms on plain tensors: a context in which they do not wrap each image in a
``MetaTensor`` with its metadata, which nothing in medmeta keeps for a scan or an augmented
image. The values are bit-identical; the bookkeeping was half the time of a batch's light
augmentation and two thirds of scaling and resizing a 64 px scan.

MONAI's setting is global to the process: the one before is restored on leaving. Two threads
that use MONAI transforms at once must not both enter it (medmeta reads and augments in one
thread per process; its loader workers are processes).
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def plain_tensors():
    from monai.data import get_track_meta, set_track_meta

    tracking = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracking)
