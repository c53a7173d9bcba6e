"""STOW-RS in: Orthanc's DICOMweb client sends a study to the node's `POST /dicom-web/studies`,
and the node sends its results back by STOW-RS: the whole loop without DIMSE. A part that is
not a DICOM file is refused in the Failed SOP Sequence with the status a C-STORE would get, and
so is, at the study level, an instance of another study."""

from __future__ import annotations

import httpx
import pydicom

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import free_port, start_node, start_orthanc, write_node_config
from tests.test_faults import exactly_one_result_each


def multipart(*files: bytes, boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return body + f"--{boundary}--\r\n".encode(), headers


def test_a_study_goes_from_orthanc_to_the_node_and_back_by_dicomweb_alone(tmp_path, node_port):
    http_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", {}, dicomweb=True, settings={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/", "Servers": {"node": [f"http://127.0.0.1:{http_port}/dicom-web/"]}}})
    try:
        config = write_node_config(
            tmp_path / "node", node_port, stable_after=2, min_free_disk_mb=0, http={"port": http_port},
            destinations=[{"name": "web", "type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}],
            pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["web"],
                        "select": {"Modality": "CT"}}],
        )
        info, paths = small_study(tmp_path / "study", slices=12)
        node = start_node(config, node_port)
        try:
            node.wait_for_http()
            study_id = orthanc.upload(paths)
            orthanc.request("POST", "/dicom-web/servers/node/stow", {"Resources": [study_id]})
            exactly_one_result_each(orthanc, info.study_uid, settle=1.0)
            assert node.query("SELECT count(*) FROM instances WHERE calling_ae = 'STOW-RS'") == [(len(paths),)]
            assert node.query("SELECT count(*) FROM deliveries WHERE state = 'sent'") == [(2,)]

            body, headers = multipart(paths[0].read_bytes(), b"not a DICOM file")
            mixed = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, headers=headers, timeout=60)
            assert mixed.status_code == 202, mixed.text
            answer = mixed.json()
            assert len(answer["00081199"]["Value"]) == 1
            assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
            body, headers = multipart(b"DICM" * 40)
            assert httpx.post(f"{node.http_url}/dicom-web/studies", content=body, headers=headers,
                              timeout=60).status_code == 409

            # study-level: an instance of another study is refused, by name, and not stored
            _, others = small_study(tmp_path / "other", slices=2)
            body, headers = multipart(paths[1].read_bytes(), others[0].read_bytes())
            addressed = httpx.post(f"{node.http_url}/dicom-web/studies/{info.study_uid}", content=body,
                                   headers=headers, timeout=60)
            assert addressed.status_code == 202, addressed.text
            answer = addressed.json()
            assert len(answer["00081199"]["Value"]) == 1
            [refused] = answer["00081198"]["Value"]
            other_uid = pydicom.dcmread(others[0], stop_before_pixels=True).SOPInstanceUID
            assert (refused["00081155"]["Value"], refused["00081197"]["Value"]) == ([other_uid], [0xA900])
            assert node.query(f"SELECT count(*) FROM instances WHERE sop_instance_uid = '{other_uid}'") == [(0,)]
            assert f"refused {other_uid} from STOW-RS@127.0.0.1: dataset Study Instance UID" in node.log()
            assert httpx.post(f"{node.http_url}/dicom-web/studies/1.2.x", content=body, headers=headers,
                              timeout=60).status_code == 400

            wrong = httpx.post(f"{node.http_url}/dicom-web/studies", content=b"x",
                               headers={"Content-Type": "application/json"}, timeout=60)
            assert wrong.status_code == 415
        finally:
            node.stop()
    finally:
        orthanc.stop()
