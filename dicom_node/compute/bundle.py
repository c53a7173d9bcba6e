"""MONAI bundles: loaded once per worker, run on in-memory volumes.

A bundle from the Model Zoo runs unmodified: its own ``preprocessing``, ``inferer`` and
``postprocessing`` are parsed by MONAI's bundle parser and used as they are, except that the
file-based steps (LoadImage, SaveImage) are taken out, because the volume arrives from the
node already in memory with its geometry, and the result goes back to the node, not to disk.
The volume is handed over exactly as LoadImage would have produced it (RAS affine, no channel
axis), so the bundle's own ``Invertd`` brings the prediction back onto the source grid.
Resampling onto the network's grid and back is where MONAI spends most of a job on a CPU; while
a bundle runs, axis-aligned resampling takes the separable shortcut of
:mod:`dicom_node.compute.resampling`, which also hands the label map back laid out frame by frame;
argmax over the channels goes through :mod:`dicom_node.compute.argmax`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImage, LoadImaged, SaveImage, SaveImaged
from monai.utils import SpaceKeys

from dicom_node.bundle_info import read_bundle_info
from dicom_node.compute.argmax import ArgmaxThroughMax
from dicom_node.compute.resampling import separable_resampling
from dicom_node.compute.tiled_transpose import copy_reversed_axes

if TYPE_CHECKING:  # the volume module needs pydicom, which a bundle's runtime does not hold
    from dicom_node.compute.volume import Volume

log = logging.getLogger(__name__)

FILE_TRANSFORMS = (LoadImage, LoadImaged, SaveImage, SaveImaged)


class BundleError(RuntimeError):
    """A bundle that cannot be loaded or run; the message is shown to the operator."""


class DiagnosedError(BundleError):
    """A failure already told in words where it happened (a bundle's runtime, which knows its
    own versions): passed on as it is, never diagnosed again."""


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _without_file_transforms(transform: Compose) -> Compose:
    # In place: Invertd holds a reference to this very Compose and must see the same list.
    transform.transforms = tuple(t for t in transform.transforms if not isinstance(t, FILE_TRANSFORMS))
    return transform


FILE_TRANSFORM_NAMES = frozenset(transform.__name__ for transform in FILE_TRANSFORMS)


def _drop_file_transforms_from_config(parser: ConfigParser, key: str) -> None:
    """Take the file steps out of the ``key`` Compose before it is instantiated: instantiating
    them may need a package the node never uses (``LoadImaged(reader="ITKReader")`` needs
    ITK), only for the step to be thrown away. Steps written as expressions are still removed
    after instantiation (`_without_file_transforms`)."""
    transforms = parser.get(f"{key}#transforms")
    if not isinstance(transforms, list):
        return
    kept = [t for t in transforms
            if not (isinstance(t, dict) and str(t.get("_target_", "")).rsplit(".", 1)[-1] in FILE_TRANSFORM_NAMES)]
    if len(kept) != len(transforms):
        parser[f"{key}#transforms"] = kept


def _config_file(bundle_dir: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        candidate = bundle_dir / "configs" / name
        if candidate.exists():
            return candidate
    raise BundleError(f"{bundle_dir} has no configs/inference.json or .yaml")


def _load_weights(bundle_dir: Path, parser: ConfigParser, device: torch.device) -> torch.nn.Module:
    torchscript = bundle_dir / "models" / "model.ts"
    checkpoint = bundle_dir / "models" / "model.pt"
    if checkpoint.exists():
        network = parser.get_parsed_content("network_def").to(device)
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        network.load_state_dict(state)
        return network
    if torchscript.exists():
        return torch.jit.load(str(torchscript), map_location=device)
    raise BundleError(f"{bundle_dir} has neither models/model.pt nor models/model.ts")


def as_loaded(array: np.ndarray, affine_ras: np.ndarray, name: str) -> MetaTensor:
    """What MONAI's LoadImage would return for this volume: no channel axis yet, RAS affine."""
    affine = torch.as_tensor(affine_ras, dtype=torch.float64)
    return MetaTensor(
        torch.from_numpy(array),
        affine=affine,
        meta={
            "original_affine": affine.clone(),
            "spatial_shape": np.asarray(array.shape),
            "original_channel_dim": "no_channel",
            "filename_or_obj": str(name),
            "space": SpaceKeys.RAS,  # said explicitly: Orientationd reads it
        },
    )


def _fresh_scripts_package(bundle_dir: Path) -> None:
    """Make ``import scripts`` find this bundle's own package, not one cached from another bundle."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    if str(bundle_dir) in sys.path:
        sys.path.remove(str(bundle_dir))
    sys.path.insert(0, str(bundle_dir))


class Bundle:
    """One loaded bundle: network, transforms and inferer, ready for many volumes."""

    def __init__(self, bundle_dir: Path, device: torch.device) -> None:
        self.bundle_dir = bundle_dir
        self.device = device
        self.info = read_bundle_info(bundle_dir)
        _fresh_scripts_package(bundle_dir)
        parser = ConfigParser()
        parser.read_config(_config_file(bundle_dir))
        parser["bundle_root"] = str(bundle_dir)
        parser["device"] = device
        self.image_key = parser.get("image_key", "image")
        self.network = _load_weights(bundle_dir, parser, device).eval()
        for key in ("preprocessing", "postprocessing"):
            _drop_file_transforms_from_config(parser, key)
        self.preprocessing = _without_file_transforms(parser.get_parsed_content("preprocessing"))
        self.postprocessing = _without_file_transforms(parser.get_parsed_content("postprocessing"))
        self.inferer = parser.get_parsed_content("inferer")
        self.timings: dict[str, float] = {}  # seconds per step of the last predict()
        log.info("loaded bundle %s %s on %s (%.0f MB of weights)", self.info.name, self.info.version, device,
                 self.weight_mb)

    @property
    def weight_mb(self) -> float:
        tensors = [*self.network.parameters(), *self.network.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors) / 1e6

    def predict(self, volume: Volume) -> np.ndarray:
        """Label map on the volume's own grid: ``[i, j, k]`` integers, 0 = background."""
        return self.predict_array(volume.array, volume.affine_ras, volume.name)

    def predict_array(self, array: np.ndarray, affine_ras: np.ndarray, name: str) -> np.ndarray:
        """`predict` on the volume's voxels and RAS affine alone (a runtime's runner has no DICOM).

        The array is a view of memory laid out frame by frame (``[k, j, i]``), the layout the
        SEG is built from: ``volume.frame_masks`` then needs no copy. The volume comes in that
        layout and the resampling keeps it, so the conversion to integers is a straight copy; a
        bundle whose output arrives in another layout costs one tiled transposition here.
        """
        started = time.perf_counter()
        with separable_resampling(array.shape), ArgmaxThroughMax():
            item = self.preprocessing({self.image_key: as_loaded(array, affine_ras, name)})
            preprocessed = time.perf_counter()
            with torch.no_grad():
                batch = item[self.image_key][None].to(self.device)
                item["pred"] = self.inferer(batch, self.network)[0]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            inferred = time.perf_counter()
            prediction = torch.as_tensor(self.postprocessing(item)["pred"]).detach().cpu()
        del item
        if prediction.ndim == 4:
            # One channel: a label map already. Several: per-label scores the bundle left as
            # they are (no argmax in its postprocessing); the strongest label wins per voxel.
            prediction = prediction[0] if prediction.shape[0] == 1 else prediction.argmax(dim=0)
        if tuple(prediction.shape) != array.shape:
            raise BundleError(f"bundle output {tuple(prediction.shape)} is not on the source grid {array.shape}")
        if prediction.is_floating_point():
            prediction = prediction.round_()  # in place: nothing else holds the prediction now
        by_frame = np.empty(prediction.shape[::-1], dtype=np.uint16)
        # int16 view: torch copies into it several times faster than into its uint16
        destination = torch.from_numpy(by_frame.view(np.int16))
        if prediction.permute(2, 1, 0).is_contiguous():
            destination.copy_(prediction.permute(2, 1, 0))
        else:
            copy_reversed_axes(prediction, destination)
        result = by_frame.transpose(2, 1, 0)
        self.timings = {
            "preprocess": preprocessed - started,
            "network": inferred - preprocessed,
            "postprocess": time.perf_counter() - inferred,
        }
        return result
