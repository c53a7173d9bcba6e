"""What a bundle's runtime holds, read from its metadata; and the pipe between worker and runner.

Pure functions: no runtime is made here (`test_runtime` makes one).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.compute.runtime.spec import SpecError, node_torch, spec_of
from dicom_node.compute.runtime.wire import MAX_HEADER_BYTES, WireError, receive, send
from tests.compute.test_bundle import ZOO
from tests.support.old_monai import write_bundle


def metadata_bundle(folder: Path, **metadata) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_the_metadata_names_monai_exactly_and_the_other_pins_exactly_then_by_their_line(tmp_path):
    spec = spec_of(metadata_bundle(tmp_path, monai_version="1.3.0", numpy_version="1.22.2",
                                   optional_packages_version={"Pytorch_Ignite": "0.4.11"},
                                   required_packages_version={"einops": "0.7.0"}))
    assert spec.name == f"monai-1.3.0-{spec.key}"
    assert spec.requirements("exact") == [
        "monai==1.3.0", f"torch=={node_torch()}", "pyyaml>=6", "scikit-image", "nibabel",
        "einops==0.7.0", "numpy==1.22.2", "pytorch-ignite==0.4.11"]
    assert spec.requirements("compatible")[-3:] == ["einops~=0.7", "numpy~=1.22", "pytorch-ignite~=0.4"]
    required = spec.requirements("required")
    assert "pytorch-ignite>=0.4" in required and not any(r.startswith("pytorch-ignite~=") for r in required)


def test_bundles_that_name_the_same_versions_share_a_runtime_and_others_do_not(tmp_path):
    pediatric = spec_of(ZOO / "pediatric_abdominal_ct_segmentation")
    assert spec_of(write_bundle(tmp_path / "a")) == pediatric  # its metadata names the same
    spleen = spec_of(ZOO / "spleen_ct_segmentation")
    assert spleen.monai == "1.4.0" and spleen.key != pediatric.key


@pytest.mark.parametrize("metadata, message", [
    ({}, "names no monai_version"),
    ({"monai_version": "1.3.0 --index-url=http://elsewhere"}, "is not a package name and release"),
    ({"monai_version": "1.3.0", "optional_packages_version": {"--extra-index-url": "1"}},
     "is not a package name and release"),
    ({"monai_version": "1.3.0", "optional_packages_version": ["fire"]}, "is not a table"),
])
def test_metadata_that_cannot_say_what_to_install_is_refused_in_words(tmp_path, metadata, message):
    with pytest.raises(SpecError, match=message):
        spec_of(metadata_bundle(tmp_path, **metadata))


@pytest.mark.parametrize("order", ["C", "F"])
def test_arrays_cross_the_pipe_with_their_shape_order_and_values(order):
    array = np.asarray(np.random.default_rng(1).normal(size=(7, 5, 3)), dtype=np.float32, order=order)
    pipe = io.BytesIO()
    send(pipe, {"op": "predict", "name": "x"}, array)
    pipe.seek(0)
    header, received = receive(pipe)
    assert header == {"op": "predict", "name": "x"}
    assert received.flags.f_contiguous == (order == "F") and np.array_equal(received, array)


def test_the_pipe_refuses_what_the_protocol_does_not_allow():
    with pytest.raises(WireError, match="closed the pipe"):
        receive(io.BytesIO(b""))
    with pytest.raises(WireError, match="longer than"):
        receive(io.BytesIO(b"x" * (MAX_HEADER_BYTES + 10)))
    too_big = {"array": {"shape": [1 << 20, 1 << 20, 1 << 10], "dtype": "float32", "order": "C"}}
    with pytest.raises(WireError, match="more than"):
        receive(io.BytesIO(json.dumps(too_big).encode() + b"\n"))
    objects = {"array": {"shape": [2], "dtype": "object", "order": "C"}}
    with pytest.raises(WireError, match="'object'"):
        receive(io.BytesIO(json.dumps(objects).encode() + b"\n"))
    short = {"array": {"shape": [4], "dtype": "uint8", "order": "C"}}
    with pytest.raises(WireError, match="before the end"):
        receive(io.BytesIO(json.dumps(short).encode() + b"\n" + b"ab"))
