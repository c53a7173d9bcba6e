"""Hostile and broken input at the door, sent as bytes to `dicom-node serve` as a subprocess.

Each test sends what an attacker or a broken modality sends, and checks the status the node
answers, that nothing lies outside data_dir, that nothing corrupt is indexed, and that the
receiver's memory stays within the bounds `docs/security.md` gives. After each, the node still
answers C-ECHO and stores a good instance.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from tests.support.ct_study import StudyInfo, ct_series, make_phantom
from tests.support.peers import free_port, start_node, write_node_config
from tests.support.raw_dul import (
    RawAssociation,
    associate_rq,
    c_store_rq,
    dataset_bytes,
    p_data,
    with_raw_value,
)

VERIFICATION = "1.2.840.10008.1.1"
ACSE_TIMEOUT, NETWORK_TIMEOUT = 2, 3
MAX_INSTANCE_MB = 48
MAX_ASSOCIATIONS = 4
NEGOTIATING_CONNECTIONS = 16  # negotiation.NEGOTIATING_CONNECTIONS
# What `docs/security.md` promises a receiver needs beyond its memory at rest while these tests
# run: a few associations' instance buffers (4 MiB each), PDUs (1 MiB each) and one inflated
# deflated data set (64 MiB).
MEMORY_BOUND_MB = 128


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    port = free_port()
    config = write_node_config(workdir / "node", port, destinations=[], pipelines=[], stable_after=600,
                               receivers=1, workers=1, max_associations=MAX_ASSOCIATIONS, min_free_disk_mb=0,
                               acse_timeout=ACSE_TIMEOUT, network_timeout=NETWORK_TIMEOUT,
                               max_instance_mb=MAX_INSTANCE_MB)
    started = start_node(config, port)
    yield started
    started.stop()


@pytest.fixture
def receiver_memory(node):
    """The receiver process's peak memory over the test, in MB above its memory at the start:
    its high-water mark is reset first (as root, through /proc/PID/clear_refs)."""
    pid = int(re.search(r"receiver process (\d+) serving", node.log()).group(1))
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    at_start = _status_kb(pid, "VmRSS")
    yield lambda: (_status_kb(pid, "VmHWM") - at_start) / 1024


def _status_kb(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE).group(1))


@pytest.fixture(autouse=True)
def still_serves(node):
    """After each test: C-ECHO is answered and a good instance stored."""
    yield
    assert node.echo(), "the node no longer answers C-ECHO"
    dataset, uid = ct_instance()
    assert send(node, dataset, uid) == 0x0000
    assert indexed(node, uid)


def ct_instance(size: int = 16, study_uid: str | None = None, **attributes) -> tuple[bytes, str]:
    info = StudyInfo(study_uid=study_uid) if study_uid else StudyInfo()
    [ds] = ct_series(make_phantom((size, size, 1), (1.0, 1.0, 1.0), seed=5), info, 1, "hostile")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return dataset_bytes(ds), ds.SOPInstanceUID


def associated(node, sop_class: str = CTImageStorage, transfer_syntax: str = ExplicitVRLittleEndian,
               timeout: float = 30) -> tuple[RawAssociation, bytes]:
    association = RawAssociation(node.port, timeout=timeout)
    association.send(associate_rq(node.ae_title, "HOSTILE", sop_class, transfer_syntax))
    answer = association.read_pdu()
    assert answer is not None and answer[0] == 0x02, answer
    return association, answer[1]


def send(node, dataset: bytes, uid: str, sop_class: str = CTImageStorage, context_class: str | None = None,
         transfer_syntax: str = ExplicitVRLittleEndian) -> int | None:
    """The status of one C-STORE of ``dataset`` (None: the node aborted or closed)."""
    association, _ = associated(node, context_class or sop_class, transfer_syntax)
    try:
        association.send(p_data(c_store_rq(sop_class, uid), command=True))
        for start in range(0, max(len(dataset), 1), 512 * 1024):  # within the 1 MiB the node announces
            last = start + 512 * 1024 >= len(dataset)
            association.send(data_pdu(dataset[start:start + 512 * 1024], last=last))
        return association.store_status()
    finally:
        association.close()


def data_pdu(data: bytes, last: bool) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, 1, 0b10 if last else 0) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def indexed(node, uid: str) -> bool:
    return bool(node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", uid))


def files_outside_data_dir(node) -> set[Path]:
    root = node.data_dir.parent.parent
    return {path for path in root.rglob("*") if path.is_file() and node.data_dir not in path.parents}


def closed_within(association: RawAssociation, seconds: float) -> float:
    """Seconds until the node closed or aborted the connection; fails past ``seconds``."""
    started = time.monotonic()
    association.sock.settimeout(seconds)
    while True:
        try:
            data = association.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except TimeoutError:
            pytest.fail(f"still connected after {seconds} s")
        if not data or data[0] == 0x07:  # closed, or an A-ABORT
            return time.monotonic() - started


# 1. Path traversal


@pytest.mark.parametrize("study_uid, series_uid", [
    ("..", ".."), (".", "1.2.3"), ("1.2.3\n", "1.2.3.4"), ("1.02.3", "1.2.3.4"), ("1..2", "1.2.3.4"),
    ("1.2.3.", "1.2.3.4"), ("1" * 65, "1.2.3.4"), ("1.2.3", "../../x"),
])
def test_uids_that_are_no_uids_are_refused_and_nothing_is_written_outside_data_dir(node, study_uid, series_uid):
    decoy = node.data_dir.parent / "decoy.dcm"
    decoy.write_bytes(b"the operator's file")
    before = files_outside_data_dir(node)
    dataset, uid = ct_instance()
    dataset = with_raw_value(dataset, 0x0020000D, study_uid.encode())
    dataset = with_raw_value(dataset, 0x0020000E, series_uid.encode())
    assert send(node, dataset, uid) == 0xC000
    assert decoy.read_bytes() == b"the operator's file"
    assert files_outside_data_dir(node) == before
    assert not indexed(node, uid)
    assert f"refused {uid}" in node.log() and "not a valid UID" in node.log()


# 2. Timeouts per period, not per receive


def trickled_until_cut_off(association: RawAssociation, data: bytes, deadline: float) -> float:
    """Send ``data`` a byte every 0.2 s; the seconds until the node hung up. Fails where it
    still reads well past ``deadline`` seconds."""
    started = time.monotonic()
    try:
        for byte in data:
            association.send(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > deadline + 5:
                pytest.fail(f"the node still reads bytes trickled for longer than {deadline} s")
    except OSError:
        pass  # the node hung up while the bytes trickled in
    association.sock.close()
    return time.monotonic() - started


def test_an_association_request_trickled_byte_by_byte_is_cut_off_at_artim(node):
    association = RawAssociation(node.port, timeout=30)
    request = associate_rq(node.ae_title, "TRICKLE", CTImageStorage, ExplicitVRLittleEndian)
    assert trickled_until_cut_off(association, request, ACSE_TIMEOUT) < ACSE_TIMEOUT + 2
    assert "no whole association request within 2 s (ARTIM)" in node.log()


def test_a_pdu_trickled_byte_by_byte_is_cut_off_at_its_deadline(node):
    association, _ = associated(node)
    pdu = p_data(c_store_rq(CTImageStorage, generate_uid()), command=True)
    assert trickled_until_cut_off(association, pdu, NETWORK_TIMEOUT) < NETWORK_TIMEOUT + 2
    assert "a PDU was not complete by its deadline" in node.log()


def test_an_association_silent_between_messages_is_aborted(node):
    association, _ = associated(node)
    assert closed_within(association, NETWORK_TIMEOUT + 3) > NETWORK_TIMEOUT - 1
    association.sock.close()


# 3. Memory before association; connections are counted


def test_association_requests_announcing_64_mib_allocate_nothing(node, receiver_memory):
    peers = []
    for _ in range(10):
        peer = socket.create_connection(("127.0.0.1", node.port))
        peer.sendall(struct.pack(">BBI", 0x01, 0, 64 * 1024 * 1024) + bytes(1000))
        peers.append(peer)
    for peer in peers:
        peer.settimeout(5)
        kind = peer.recv(1)
        assert kind in (b"", b"\x07"), "an oversized A-ASSOCIATE-RQ is aborted at once"
        peer.close()
    assert receiver_memory() < 16
    assert "more than the 262144 the node reads here" in node.log()


def test_connections_are_counted_before_they_associate(node):
    limit = MAX_ASSOCIATIONS + NEGOTIATING_CONNECTIONS
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(limit)]
    try:
        time.sleep(0.5)
        one_more = RawAssociation(node.port, timeout=5)
        assert closed_within(one_more, 2) < 1, "a connection beyond the limit is closed at once"
        one_more.sock.close()
        assert f"already {limit} connections" in node.log()
    finally:
        for connection in silent:
            connection.close()
    time.sleep(0.5)  # the node sees them go


# 4. Maximum PDU length


def test_the_maximum_pdu_length_announced_is_the_one_read(node):
    association, accept = associated(node)
    association.close()
    user_information = accept[accept.index(b"\x50\x00") :]
    [maximum] = re.findall(rb"\x51\x00\x00\x04(.{4})", user_information, re.DOTALL)
    assert struct.unpack(">I", maximum)[0] == 1024 * 1024

    association, _ = associated(node)
    association.send(p_data(c_store_rq(CTImageStorage, generate_uid()), command=True))
    try:
        association.send(data_pdu(bytes(1024 * 1024 + 1), last=True))  # one byte over the announced length
    except OSError:
        pass  # the node may abort before the whole PDU is sent
    answer = association.read_pdu()
    assert answer is None or answer[0] == 0x07, "aborted"
    association.sock.close()
    assert "more than the 1048576 the node reads here" in node.log()


def test_a_pynetdicom_sender_stores_an_instance_larger_than_a_pdu(node):
    from pynetdicom import AE

    [ds] = ct_series(make_phantom((1024, 1024, 1), (0.5, 0.5, 1.0), seed=2), StudyInfo(), 1, "large")  # 2 MB
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert association.is_established
    try:
        assert association.send_c_store(ds).Status == 0x0000
    finally:
        association.release()
    assert indexed(node, ds.SOPInstanceUID)


# 5. Memory per instance


def test_a_large_instance_streams_to_disk_in_bounded_memory(node, receiver_memory):
    [ds] = ct_series(make_phantom((4096, 4096, 1), (0.1, 0.1, 1.0), seed=6), StudyInfo(), 1, "streamed")  # 32 MB
    assert send(node, dataset_bytes(ds), ds.SOPInstanceUID) == 0x0000
    [(path,)] = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", ds.SOPInstanceUID)
    assert pydicom.dcmread(path).PixelData == ds.PixelData
    assert receiver_memory() < 16, "an instance of 32 MB is not held in memory"


def test_an_instance_over_max_instance_mb_is_read_to_its_end_and_refused(node, receiver_memory):
    association, _ = associated(node)
    uid = generate_uid()
    association.send(p_data(c_store_rq(CTImageStorage, uid), command=True))
    dataset, _ = ct_instance()
    association.send(data_pdu(dataset, last=False))
    fragment = bytes(1000 * 1000)
    for _ in range(MAX_INSTANCE_MB * 2):  # twice the maximum, the last fragment bit never set
        association.send(data_pdu(fragment, last=False))
    association.send(data_pdu(b"\0\0", last=True))
    assert association.store_status() == 0xA700
    association.close()
    assert not indexed(node, uid)
    assert receiver_memory() < 16
    assert f"more than max_instance_mb = {MAX_INSTANCE_MB}" in node.log()
    assert [p for p in (node.data_dir / "incoming").rglob("*") if p.is_file() and not p.name.endswith(".slot")] == []


def test_a_deflate_bomb_is_refused_within_the_inflation_bound(node, receiver_memory):
    [ds] = ct_series(make_phantom((16, 16, 1), (1.0, 1.0, 1.0), seed=7), StudyInfo(), 1, "bomb")
    ds.PixelData = bytes(512 * 1024 * 1024)  # inflates to half a gigabyte
    ds.Rows = ds.Columns = 16384
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(buffer.getvalue()) + compressor.flush()
    assert len(bomb) < 1024 * 1024
    assert send(node, bomb, ds.SOPInstanceUID, transfer_syntax=DeflatedExplicitVRLittleEndian) == 0xA700
    assert not indexed(node, ds.SOPInstanceUID)
    assert receiver_memory() < MEMORY_BOUND_MB
    assert "inflates to more than 67108864 bytes" in node.log()


def test_a_small_deflated_instance_is_stored(node):
    dataset, uid = ct_instance()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(dataset) + compressor.flush()
    assert send(node, deflated, uid, transfer_syntax=DeflatedExplicitVRLittleEndian) == 0x0000
    assert indexed(node, uid)


# 6. Corrupt data sets


def implicit_vr_bytes(dataset: bytes) -> bytes:
    ds = pydicom.dcmread(DicomBytesIO(dataset), force=True)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("corruption", ["cut inside pixel data", "trailing garbage", "implicit VR on explicit"])
def test_corrupt_data_sets_are_refused_and_nothing_is_indexed(node, corruption):
    dataset, uid = ct_instance(size=64)
    broken = {
        "cut inside pixel data": dataset[:-100],
        "trailing garbage": dataset + b"\x01\x02garbage bytes",
        "implicit VR on explicit": implicit_vr_bytes(dataset),
    }[corruption]
    assert send(node, broken, uid) == 0xC000
    assert not indexed(node, uid)
    assert not list((node.data_dir / "studies").rglob(f"{uid}.dcm"))
    assert f"refused {uid}" in node.log() and "not well formed" in node.log()


# 7. Context and command against the data set


def test_a_data_set_must_match_its_context_and_its_command(node):
    dataset, uid = ct_instance()
    assert send(node, dataset, uid, sop_class=MRImageStorage) == 0xA900  # CT data on an MR context
    assert send(node, dataset, uid, sop_class=CTImageStorage, context_class=VERIFICATION) == 0x0122
    assert send(node, dataset, generate_uid()) == 0xA900  # the command names another instance
    assert not indexed(node, uid)
    assert "is not the command's" in node.log() and "is not the presentation context's" in node.log()


def refusals(node) -> dict[str, float]:
    """dicom_node_instances_refused_total by reason, as a Prometheus scrape reads it."""
    metrics = httpx.get(f"{node.http_url}/metrics", timeout=30).text
    return {reason: float(value) for reason, value in
            re.findall(r'^dicom_node_instances_refused_total\{reason="(\w+)"\} (\S+)$', metrics, re.MULTILINE)}


def test_refusals_are_counted_by_reason_across_the_receivers(node):
    node.wait_for_http()
    before = refusals(node)
    dataset, uid = ct_instance()
    assert send(node, dataset[:-100], uid) == 0xC000
    assert send(node, dataset, generate_uid()) == 0xA900
    after = refusals(node)
    assert after["malformed"] == before.get("malformed", 0) + 1
    assert after["uid_mismatch"] == before.get("uid_mismatch", 0) + 1


# 9. The same SOP Instance UID again


def test_an_instance_sent_again_in_another_study_replaces_the_old_one(node):
    first_study, second_study = generate_uid(), generate_uid()
    dataset, uid = ct_instance(study_uid=first_study)
    assert send(node, dataset, uid) == 0x0000
    [(old_path,)] = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", uid)
    ds = pydicom.dcmread(DicomBytesIO(dataset), force=True)
    ds.StudyInstanceUID = second_study
    assert send(node, dataset_bytes(ds), uid) == 0x0000
    [(study, new_path)] = node.query("SELECT study_uid, path FROM instances WHERE sop_instance_uid = ?", uid)
    assert study == second_study and new_path != old_path
    assert not Path(old_path).exists() and Path(new_path).exists()
    events = dict(node.query("SELECT study_uid, message FROM events WHERE message LIKE ?", f"instance {uid}%"))
    assert first_study in events[second_study] and "removed from this study" in events[first_study]
    assert f"stored in study {first_study}, came again in study {second_study}" in node.log()

    ds.PatientName = "Changed^Content"
    assert send(node, dataset_bytes(ds), uid) == 0x0000
    assert pydicom.dcmread(new_path).PatientName == "Changed^Content"
    assert f"instance {uid} from HOSTILE@127.0.0.1 came again with other content" in node.log()


# 10. Log and terminal injection


def test_control_characters_from_peers_are_escaped_in_the_log_and_in_status(node):
    dataset, uid = ct_instance(PatientID="\x1b[2J\x1b]0;owned\x07PAT")
    assert send(node, dataset, uid) == 0x0000
    status = node.cli("status")
    assert "\x1b" not in status and "\\x1b[2J" in status
    forged = f"{uid}\n2026-12-01 00:00:00,000 INFO MainProcess forged: line"
    assert send(node, dataset, forged) in (0xA900, 0xC000)
    log = node.log()
    assert "\n2026-12-01 00:00:00,000 INFO MainProcess forged" not in log
    assert "\\x0a2026-12-01 00:00:00,000 INFO MainProcess forged" in log


# 8. Graceful shutdown


def test_sigterm_lets_a_c_store_in_flight_finish_and_aborts_idle_associations(tmp_path):
    port = free_port()
    config = write_node_config(tmp_path / "node", port, destinations=[], pipelines=[], stable_after=600,
                               receivers=1, min_free_disk_mb=0)
    node = start_node(config, port)
    try:
        [ds] = ct_series(make_phantom((2048, 2048, 1), (0.2, 0.2, 1.0), seed=9), StudyInfo(), 1, "in flight")
        dataset = dataset_bytes(ds)  # 8 MB: streamed to disk
        storing, _ = associated(node)
        idle, _ = associated(node)
        storing.send(p_data(c_store_rq(CTImageStorage, ds.SOPInstanceUID), command=True))
        chunk = 512 * 1024
        *first, final = range(0, len(dataset), chunk)
        for start in first:
            storing.send(data_pdu(dataset[start:start + chunk], last=False))
        time.sleep(0.5)
        node.process.terminate()  # SIGTERM, as an init system stops the node
        assert closed_within(idle, 5) < 3, "an association between messages is aborted at once"
        time.sleep(1.5)  # the receivers have had SIGTERM
        storing.send(data_pdu(dataset[final:], last=True))
        assert storing.store_status() == 0x0000, "a C-STORE whose data was arriving is answered"
        assert closed_within(storing, 5) < 5, "and its association is then closed"
        node.process.wait(timeout=30)
        assert indexed(node, ds.SOPInstanceUID)
        [(path,)] = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", ds.SOPInstanceUID)
        assert pydicom.dcmread(path).PixelData == ds.PixelData
        assert [p for p in (node.data_dir / "incoming").rglob("*") if p.is_file() and not p.name.endswith(".slot")] == []
    finally:
        node.stop()


# 11. The command line


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
                          check=False)


def test_the_command_line_says_what_is_wrong_and_exits_non_zero(node, tmp_path):
    mistyped = tmp_path / "mistyped.toml"
    mistyped.write_text('[node]\ndata_dir = "no-such-folder"\n')
    result = cli(mistyped, "status")
    assert result.returncode == 2 and "no node database at" in result.stderr
    assert not (tmp_path / "no-such-folder").exists(), "nothing is created by a look"

    unknown = generate_uid()
    for args in (("explain", unknown), ("retry", unknown), ("rerun", unknown)):
        result = cli(node.config_path, *args)
        assert result.returncode == 1, args
        assert f"no study received with the Study Instance UID {unknown}" in result.stderr


def test_serve_on_a_port_in_use_says_so_once_and_creates_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_node_config(tmp_path / "node", port, destinations=[], pipelines=[])
        result = cli(config, "serve")
    assert result.returncode == 1
    assert result.stderr.count("is in use") == 1
    assert f"cannot listen on 0.0.0.0:{port}" in result.stderr
    assert not list((tmp_path / "node").rglob("*.sqlite")), "no database before the port is had"
