"""TLS for DICOM (PS3.15 Annex B, "Secure Transport Connection Profiles", with the BCP 195
profile of B.9): contexts for the node's TLS listener and for destinations that take TLS.

BCP 195 asks for TLS 1.2 or later and its recommended cipher suites, no compression, no
renegotiation; OpenSSL's defaults as Python's `ssl` sets them (forward-secret AEAD suites)
meet it once versions below 1.2 are refused.
"""

from __future__ import annotations

import ssl

from dicom_node.config import Destination, TlsListener


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(settings: TlsListener) -> ssl.SSLContext:
    """The listener's context: its certificate, and peers' verified against ``ca`` (required
    with ``require_client_certificate``, else checked when one is presented)."""
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(settings.certificate, settings.private_key)
    if settings.ca is not None:
        context.load_verify_locations(settings.ca)
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(destination: Destination) -> ssl.SSLContext:
    """A destination's context: its certificate verified against ``ca`` (or the system's CAs),
    its host name checked, and the node's own certificate presented where one is configured."""
    context = _hardened(ssl.create_default_context(cafile=destination.ca))
    if destination.certificate is not None:
        context.load_cert_chain(destination.certificate, destination.private_key)
    return context
