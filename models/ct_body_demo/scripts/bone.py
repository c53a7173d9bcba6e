"""Bone decided at the source's resolution, after the expected label came back to the source grid.

The network works at 2 mm, which cannot draw a 1 mm cortex or a fatty marrow cavity; the source
image can. So the network says where the patient is and roughly where bone is, and the source's
Hounsfield units decide each voxel, with the label's own definition (bone material at 200 HU and
above). Dense cortex (400 HU and above) that the 2 mm grid blurred below the bone level is bone
too. The two levels were chosen on new patients of the training families, not on the families
the quality table holds out.
"""

from __future__ import annotations

from typing import Any

import torch

BODY = 1.0
BONE_LEVEL = 1.5  # expected label at which the network's bone wins over body
BONE_HU = 200.0
DENSE_HU = 400.0
PLANES_AT_A_TIME = 8  # a few megabytes of temporaries at 512 x 512


def decide_bone_at_source(data: dict[str, Any]) -> dict[str, Any]:
    """Turn ``pred`` (expected label, 0 to 2, on the source grid) into labels 0, 1, 2, in place.

    ``source_hu`` is the source image kept before any resampling. ``pred`` is the fresh output
    of ``Invertd``, so it is overwritten rather than copied. The work goes a few planes at a
    time along the axis outermost in memory: on a 300 x 512 x 512 CT a whole-volume temporary
    costs a third of a gigabyte, and the ten of them took several times longer than the
    arithmetic. It runs on plain tensor views, as a MetaTensor's bookkeeping on every
    operation doubled its time; ``pred`` keeps its metadata for ``SaveImaged``.
    """
    expected = data["pred"].as_subclass(torch.Tensor)
    source = data["source_hu"].as_subclass(torch.Tensor)
    axis = max((dim for dim in range(expected.dim()) if expected.shape[dim] > 1), key=expected.stride)
    for start in range(0, expected.shape[axis], PLANES_AT_A_TIME):
        count = min(PLANES_AT_A_TIME, expected.shape[axis] - start)
        labels, image = expected.narrow(axis, start, count), source.narrow(axis, start, count)
        bone = (image >= DENSE_HU).logical_or_((labels >= BONE_LEVEL).logical_and_(image >= BONE_HU))
        bone.logical_and_(labels >= BODY)
        labels.round_().clamp_(max=BODY).add_(bone)
    return data
