"""Argmax along an axis answered by ``torch.max``: the same indices, many times faster on a CPU.

PyTorch's CPU ``argmax`` along a leading axis, which is what a bundle's
``AsDiscreted(argmax=True)`` does over the channels of its whole output, runs a slow strided
kernel: 0.3 s on a 3-channel 120 x 120 x 100 map, where ``torch.max`` along the same axis takes
0.02 s and returns the same indices (the first maximum; NaN counts as the largest). While a
bundle runs, :class:`ArgmaxThroughMax`, a torch function mode, answers such calls with
``torch.max``'s indices; anything else passes through untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ARGMAX = (torch.argmax, torch.Tensor.argmax)


class ArgmaxThroughMax(TorchFunctionMode):
    """Within ``with ArgmaxThroughMax():``, CPU argmax along one axis is computed by ``torch.max``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ARGMAX:
            tensor = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if dim is not None and tensor.device.type == "cpu" and tensor.numel() > 0:
                return torch.max(tensor, dim=dim, keepdim=keepdim).indices
        return func(*args, **kwargs)
