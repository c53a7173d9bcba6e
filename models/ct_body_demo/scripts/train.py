"""Train the ct_body_demo bundle on synthetic patients on scanner tables, reproducibly, on the CPU.

Run from the bundle directory's parent or anywhere:

    python models/ct_body_demo/scripts/train.py

It regenerates the phantoms from fixed seeds, trains with the bundle's own preprocessing
(read from ``configs/inference.json``, so training and inference cannot drift apart), writes
``models/model.pt`` and prints the quality table of :mod:`scripts.quality`: Dice per family of
phantoms, whole families held out of training, at their native resolution through the bundle's
own postprocessing. It exits non-zero when a family scores under 0.9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import SpaceKeys, set_determinism

BUNDLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE))
from scripts.phantoms import ARMS, REGIONS, TABLES, Family, Phantom, make_phantom
from scripts.quality import MINIMUM_DICE, format_table, quality_table, trained_on

TRAIN_SEEDS = range(1000, 1036)
PATCH = (96, 96, 96)
TRAIN_PIXEL_MM = 2.0  # the grid the network sees (Spacingd), where scanners give finer or coarser ones
THICKNESSES_MM = (2.0, 3.0, 5.0, 7.5, 10.0)


def training_families() -> list[Family]:
    """Every family not held out, each region, table and arm position in turn."""
    return [Family(r, t, a) for r in REGIONS for t in TABLES for a in ARMS if trained_on(Family(r, t, a))]


def training_phantom(seed: int, family: Family) -> Phantom:
    """A scan of a training patient: a field of view from 150 to 500 mm, a slice thickness of 2 to
    10 mm, over 120 to 300 mm of the body."""
    rng = np.random.default_rng(seed)
    fov = float(rng.choice([rng.uniform(150.0, 350.0), 500.0]))
    pixels = round(fov / TRAIN_PIXEL_MM)
    thickness = float(rng.choice(THICKNESSES_MM))
    slices = round(rng.uniform(120.0, 300.0) / thickness)
    return make_phantom((pixels, pixels, slices), (TRAIN_PIXEL_MM, TRAIN_PIXEL_MM, thickness), seed,
                        family=family, fov_mm=fov)


def ras_affine(phantom: Phantom) -> torch.Tensor:
    """Phantom arrays are LPS-indexed; MONAI's metadata speaks RAS, as NIfTI readers do."""
    sx, sy, sz = phantom.spacing
    ox, oy, oz = phantom.origin
    return torch.tensor(
        [[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=torch.float64
    )


def as_loaded(array: np.ndarray, affine: torch.Tensor) -> MetaTensor:
    """What LoadImaged would return for this array: no channel yet, affine in RAS."""
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array)),
        affine=affine,
        meta={"original_channel_dim": "no_channel", "original_affine": affine.clone(), "space": SpaceKeys.RAS},
    )


def bundle_parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    parser["bundle_root"] = str(BUNDLE)
    parser["device"] = torch.device("cpu")
    return parser


def training_transforms(parser: ConfigParser) -> Compose:
    """The inference preprocessing, applied to image and label alike (labels by nearest)."""
    raw = {t["_target_"]: t for t in parser["preprocessing"]["transforms"]}
    scale = raw["ScaleIntensityRanged"]
    keys = ["image", "label"]
    return Compose(
        [
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes=raw["Orientationd"]["axcodes"]),
            Spacingd(keys=keys, pixdim=raw["Spacingd"]["pixdim"], mode=["bilinear", "nearest"]),
            ScaleIntensityRanged(
                keys="image",
                a_min=scale["a_min"],
                a_max=scale["a_max"],
                b_min=scale["b_min"],
                b_max=scale["b_max"],
                clip=True,
            ),
            SpatialPadd(keys=keys, spatial_size=PATCH),
        ]
    )


def load_network(parser: ConfigParser) -> torch.nn.Module:
    return parser.get_parsed_content("network_def")


def bundle_inference(parser: ConfigParser, network: torch.nn.Module, hu: np.ndarray, affine) -> np.ndarray:
    """The bundle's inference path (preprocessing, inferer, postprocessing) on an array."""
    preprocessing = parser.get_parsed_content("preprocessing")
    preprocessing.transforms = tuple(t for t in preprocessing.transforms if not isinstance(t, LoadImaged))
    postprocessing = parser.get_parsed_content("postprocessing")
    postprocessing.transforms = tuple(t for t in postprocessing.transforms if "SaveImage" not in type(t).__name__)
    inferer = parser.get_parsed_content("inferer")
    item = preprocessing({"image": as_loaded(hu, affine)})
    with torch.no_grad():
        item["pred"] = inferer(item["image"][None], network)[0]
    return np.asarray(postprocessing(item)["pred"][0]).astype(np.uint8)


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--iterations", type=int, default=800)
    args.add_argument("--out", type=Path, default=BUNDLE / "models" / "model.pt")
    opts = args.parse_args()

    torch.set_num_threads(2)
    set_determinism(seed=0)
    parser = bundle_parser()
    transforms = training_transforms(parser)
    started = time.time()
    volumes = []
    families = training_families()
    for number, seed in enumerate(TRAIN_SEEDS):
        phantom = training_phantom(seed, families[number % len(families)])
        affine = ras_affine(phantom)
        volumes.append(
            transforms({"image": as_loaded(phantom.hu, affine), "label": as_loaded(phantom.labels, affine)})
        )
    print(f"{len(volumes)} phantoms ready in {time.time() - started:.0f} s", flush=True)

    network = load_network(parser)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts.iterations)
    crop = RandSpatialCropSamplesd(keys=["image", "label"], roi_size=PATCH, num_samples=1, random_size=False)
    crop.set_random_state(seed=0)
    order = np.random.default_rng(0)
    network.train()
    for step in range(opts.iterations):
        batch = [crop(volumes[i])[0] for i in order.choice(len(volumes), size=2, replace=False)]
        image = torch.stack([b["image"].as_tensor() for b in batch])
        label = torch.stack([b["label"].as_tensor() for b in batch])
        optimizer.zero_grad()
        loss = loss_fn(network(image), label)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == opts.iterations - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)

    network.eval()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), opts.out)

    table = quality_table(lambda hu, spacing, origin: bundle_inference(
        parser, network, hu, ras_affine(Phantom(hu, hu, hu, spacing, origin))))
    print(format_table(table), flush=True)
    print(f"done in {time.time() - started:.0f} s")
    return 0 if all(score >= MINIMUM_DICE[label] for scores in table.values() for label, score in scores.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
