"""The listener as a PACS or modality meets it: DCMTK tools against the node process."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, UID_dictionary

from dicom_node.ingest.receiver import DIGEST_ASIDE_BYTES, storage_sop_classes
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series
from tests.support.peers import dcmtk_env, start_node, storescu, write_node_config

STORESCU_PROFILE = Path(__file__).parents[1] / "support" / "storescu-all-syntaxes.cfg"
# DCMTK command that makes each compressed copy; JPEG 2000 is encoded by pydicom (openjpeg).
ENCODERS = {
    "deflated": ["dcmconv", "+td"],
    "rle": ["dcmcrle"],
    "jpeg-baseline": ["dcmcjpeg", "+eb"],
    "jpeg-extended": ["dcmcjpeg", "+ee"],
    "jpeg-lossless-14": ["dcmcjpeg", "+el"],
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
    "jpeg-ls": ["dcmcjpls"],
}


@pytest.fixture
def node(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=60)
    started = start_node(config, node_port)
    yield started
    started.stop()


def stored_rows(node) -> dict[str, tuple[str, str]]:
    database = node.config_path.parent / "data" / "dicom-node.sqlite"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT sop_instance_uid, transfer_syntax_uid, path FROM instances").fetchall()
    return {uid: (syntax, path) for uid, syntax, path in rows}


def test_every_storage_sop_class_pydicom_knows_is_accepted():
    known = {
        uid for uid, (name, kind, *_) in UID_dictionary.items()
        if kind == "SOP Class" and name.endswith("Storage")
    }
    assert known <= set(storage_sop_classes())


def test_every_transfer_syntax_is_stored_as_received(tmp_path, node):
    phantom = make_phantom((64, 64, 1), (2.0, 2.0, 2.0), seed=2)
    original = write_series(ct_series(phantom, StudyInfo(), 1, "source"), tmp_path / "source")[0]
    copies = {"explicit-little": original}
    for name, command in ENCODERS.items():
        target = tmp_path / f"{name}.dcm"
        subprocess.run([*command, str(original), str(target)], check=True, capture_output=True)
        copies[name] = target
    j2k = pydicom.dcmread(original)
    j2k.compress(JPEG2000Lossless)
    copies["jpeg-2000"] = tmp_path / "jpeg-2000.dcm"
    j2k.save_as(copies["jpeg-2000"])
    for copy in copies.values():  # distinct instances, so each is stored in its own file
        ds = pydicom.dcmread(copy)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(copy)

    # One presentation context per syntax, so storescu sends each file as it is, as a modality
    # sending compressed data does.
    result = subprocess.run(
        ["storescu", "-xf", str(STORESCU_PROFILE), "AsIs", "-aec", node.ae_title, "127.0.0.1", str(node.port),
         *map(str, copies.values())],
        capture_output=True, text=True, env=dcmtk_env(),
    )
    assert result.returncode == 0, result.stderr

    rows = stored_rows(node)
    for name, copy in copies.items():
        sent = pydicom.dcmread(copy)
        syntax, path = rows[sent.SOPInstanceUID]
        assert syntax == sent.file_meta.TransferSyntaxUID, name
        stored = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, name
        assert stored.PixelData == sent.PixelData, f"{name}: pixel data was re-encoded"


def test_the_recorded_digest_is_the_stored_files_small_or_large(tmp_path, node):
    """Large instances are digested beside the write of their file (DIGEST_ASIDE_BYTES), small
    ones on the way: both must record what was stored, or a repeat is taken for a change."""
    paths = []
    for size in (64, 512):
        phantom = make_phantom((size, size, 1), (1.0, 1.0, 1.0), seed=size)
        paths += write_series(ct_series(phantom, StudyInfo(), 1, f"{size}"), tmp_path / f"{size}")
    assert storescu(node.ae_title, node.port, paths).returncode == 0
    rows = node.query("SELECT path, size, sha256 FROM instances ORDER BY size")
    assert len(rows) == 2 and rows[0][1] < DIGEST_ASIDE_BYTES <= rows[1][1]
    for path, size, digest in rows:
        content = Path(path).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest), path


def test_echo_answers_and_a_wrong_called_ae_title_is_rejected(node):
    assert node.echo()
    wrong = subprocess.run(
        ["echoscu", "-aec", "NOTTHENODE", "127.0.0.1", str(node.port)], capture_output=True, env=dcmtk_env()
    )
    assert wrong.returncode != 0


def test_several_receiver_processes_share_the_port_and_store_everything(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=60,
                               receivers=3)
    node = start_node(config, node_port)
    try:
        images = ct_series(make_phantom((32, 32, 24), (6.0, 6.0, 6.0), seed=2), StudyInfo(), 2, "split")
        paths = write_series(images, tmp_path / "series")
        senders = [
            subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node_port), *map(str, paths[i::4])],
                             env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(4)
        ]
        assert [sender.wait(timeout=120) for sender in senders] == [0, 0, 0, 0]
        assert set(stored_rows(node)) == {image.SOPInstanceUID for image in images}
    finally:
        node.stop()
    # Read once the node has stopped: the first receiver may answer while the others still start.
    serving = set(re.findall(r"receiver process (\d+) serving", node.log()))
    assert len(serving) == 3, node.log()
