"""Peak memory of building a volume from a large CT series, next to dcm2niix on the same files.

    .venv/bin/python benchmarks/volume_memory.py [--slices 1000] [--size 512]

Writes a synthetic CT series (uncompressed, 16-bit), then in fresh processes measures the peak
resident memory of (a) the node's load_volume and (b) dcm2niix converting the same folder. The
node's target: peak at most 2.5 times the float32 volume it returns.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, write_ct

LOAD = """
import resource, sys, time
from pathlib import Path
from dicom_node.compute.frames import read_frames
from dicom_node.compute.volume import load_volume
paths = sorted(Path(sys.argv[1]).iterdir())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
volume = load_volume(read_frames(paths))
elapsed = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, peak * 1024, volume.array.nbytes, elapsed)
"""


# A fresh parent whose only child is dcm2niix, so RUSAGE_CHILDREN is dcm2niix's own peak.
MEASURE_CHILD = """
import resource, subprocess, sys, time
started = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - started)
"""


def dcm2niix_peak(folder: Path, out: Path) -> tuple[float, float]:
    command = ["dcm2niix", "-z", "n", "-o", str(out), str(folder)]
    result = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *command], check=True, capture_output=True, text=True)
    peak, elapsed = (float(v) for v in result.stdout.split())
    return peak, elapsed


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--slices", type=int, default=1000)
    options.add_argument("--size", type=int, default=512)
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder, out = Path(scratch) / "series", Path(scratch) / "nifti"
        out.mkdir()
        write_ct(folder, args.slices, args.size)
        result = subprocess.run([sys.executable, "-c", LOAD, str(folder)], check=True, capture_output=True,
                                text=True, cwd=ROOT)
        before, peak, volume_bytes, elapsed = (float(v) for v in result.stdout.split())
        dcm_peak, dcm_elapsed = dcm2niix_peak(folder, out)
    mb = 1e6
    rows = [
        ("dicom-node load_volume", peak / mb, (peak - before) / mb, peak / volume_bytes, elapsed),
        ("dcm2niix (same files)", dcm_peak / mb, dcm_peak / mb, dcm_peak / volume_bytes, dcm_elapsed),
    ]
    print(f"series: {args.slices} x {args.size}x{args.size}, float32 volume {volume_bytes / mb:.0f} MB")
    print(f"{'':24} {'peak RSS MB':>12} {'growth MB':>10} {'peak/volume':>12} {'seconds':>8}")
    for name, peak_mb, growth, ratio, seconds in rows:
        print(f"{name:24} {peak_mb:12.0f} {growth:10.0f} {ratio:12.2f} {seconds:8.1f}")
    print(f"node peak / dcm2niix peak: {rows[0][1] / rows[1][1]:.2f}")
    target = peak / volume_bytes <= 2.5
    print(f"target peak <= 2.5 x volume: {'met' if target else 'NOT met'}")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
