"""DICOM over TLS, against DCMTK's storescu (its BCP 195 profile, the default) as the modality:
a study sent over TLS with a client certificate gets its results; a peer without a valid client
certificate, or speaking plain DICOM to the TLS port, is refused and the log names it; with
`plain = false` only the TLS port serves."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support.certificates import CertificateAuthority
from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import (
    dcmtk_env,
    free_port,
    start_node,
    start_orthanc,
    storescu,
    wait_for,
    write_node_config,
)


@pytest.fixture
def pki(tmp_path):
    hospital = CertificateAuthority(tmp_path / "pki", "hospital")
    stranger = CertificateAuthority(tmp_path / "pki-elsewhere", "elsewhere")
    return hospital, stranger


def tls_store(port: int, paths, *options: str):
    """storescu over TLS; ``-pw`` (the keys have no password) goes only with a key of its own."""
    return storescu("DICOMNODE", port, paths, *(["-pw"] if "+tls" in options else []), *options)


def successes(result) -> int:
    return result.stderr.count("Received Store Response (Success)")


def test_a_study_sent_over_tls_gets_its_results_and_peers_without_a_valid_certificate_are_refused(
        tmp_path, orthanc, node_port, pki):
    hospital, stranger = pki
    node_identity, modality, impostor = hospital.issue("node"), hospital.issue("ct-scanner"), stranger.issue("ct")
    tls_port = free_port()
    config = write_node_config(
        tmp_path / "node", node_port, stable_after=2, min_free_disk_mb=0,
        tls={"port": tls_port, "certificate": str(node_identity.certificate),
             "private_key": str(node_identity.private_key), "ca": str(hospital.path),
             "require_client_certificate": True},
        destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                    "select": {"Modality": "CT"}}],
    )
    info, paths = small_study(tmp_path / "study", slices=12)
    node = start_node(config, node_port)
    try:
        assert f"127.0.0.1:{tls_port} (TLS)" in node.log() or f"0.0.0.0:{tls_port} (TLS)" in node.log()
        sent = tls_store(tls_port, paths, "+tls", str(modality.private_key), str(modality.certificate),
                         "+cf", str(hospital.path))
        assert successes(sent) == len(paths), sent.stderr[-2000:]
        wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(info.study_uid).keys(), 240, "SEG and SR")

        anonymous = tls_store(tls_port, paths[:1], "+tla", "+cf", str(hospital.path))
        assert successes(anonymous) == 0
        foreign = tls_store(tls_port, paths[:1], "+tls", str(impostor.private_key), str(impostor.certificate),
                            "+cf", str(hospital.path))
        assert successes(foreign) == 0
        plain = storescu("DICOMNODE", tls_port, paths[:1])
        assert successes(plain) == 0
        wait_for(lambda: node.log().count("refused a TLS connection from 127.0.0.1") >= 3, 30, "three refusals")
        assert node.echo(), "the plain listener serves beside the TLS one"
    finally:
        node.stop()


def test_with_plain_off_only_tls_is_served(tmp_path, node_port, pki):
    hospital, _ = pki
    node_identity, modality = hospital.issue("node"), hospital.issue("ct-scanner")
    tls_port = free_port()
    config = write_node_config(
        tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=30, min_free_disk_mb=0,
        plain=False, tls={"port": tls_port, "certificate": str(node_identity.certificate),
                          "private_key": str(node_identity.private_key)},
    )
    node = start_node(config, node_port, echo=False)
    try:
        _, paths = small_study(tmp_path / "study", slices=2)
        sent = tls_store(tls_port, paths, "+tls", str(modality.private_key), str(modality.certificate),
                         "+cf", str(hospital.path))
        assert successes(sent) == 2, sent.stderr[-2000:]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node_port), timeout=5).close()
        echo = subprocess.run(["echoscu", "+tla", "-ic", "-aec", "DICOMNODE", "127.0.0.1", str(tls_port)],
                              capture_output=True, env=dcmtk_env(), timeout=30, check=False)
        assert echo.returncode == 0, "a client that does not verify the node may still connect: none is required"
    finally:
        node.stop()


def test_results_are_delivered_over_tls_to_an_orthanc_that_requires_it(tmp_path, node_port, pki):
    hospital, stranger = pki
    pacs_identity, node_identity = hospital.issue("pacs"), hospital.issue("node")
    orthanc = start_orthanc(tmp_path / "orthanc", {}, settings={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pacs_identity.certificate),
        "DicomTlsPrivateKey": str(pacs_identity.private_key), "DicomTlsTrustedCertificates": str(hospital.path),
        "DicomTlsRemoteCertificateRequired": True, "DicomCheckCalledAet": False})
    try:
        def destination(name: str, ca, identity) -> dict:
            return {"name": name, "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port,
                    "tls": True, "ca": str(ca), "certificate": str(identity.certificate),
                    "private_key": str(identity.private_key), "retry_first_seconds": 1, "retry_max_seconds": 2}

        config = write_node_config(
            tmp_path / "node", node_port, stable_after=2, min_free_disk_mb=0,
            destinations=[destination("pacs", hospital.path, node_identity),
                          # trusts another CA than the PACS's: the PACS's certificate must fail here
                          destination("unverified", stranger.path, node_identity)],
            pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs", "unverified"],
                        "select": {"Modality": "CT"}}],
        )
        info, paths = small_study(tmp_path / "study", slices=12)
        node = start_node(config, node_port)
        try:
            assert successes(storescu("DICOMNODE", node_port, paths)) == len(paths)
            wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(info.study_uid).keys(), 240, "SEG and SR")
            wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE destination = 'unverified' AND "
                                        "attempts >= 2") == [(2,)], 60, "attempts to the unverified PACS")
            assert node.query("SELECT count(*) FROM deliveries WHERE destination = 'unverified' AND "
                              "state = 'sent'") == [(0,)]
            assert node.query("SELECT count(*) FROM deliveries WHERE destination = 'pacs' AND state = 'sent'") == [(2,)]
        finally:
            node.stop()
    finally:
        orthanc.stop()
