"""PEM files as Twisted TLS objects: the one loader the server and the client share."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import ssl
from twisted.python.filepath import FilePath


def load_certificates(path: str) -> list[ssl.Certificate]:
    """Every certificate in the PEM file at ``path``, in file order.

    Raises ``ValueError`` if the file holds no PEM certificate.
    """
    try:
        certificates = x509.load_pem_x509_certificates(FilePath(path).getContent())
    except ValueError as error:
        raise ValueError(f"{path} holds no PEM certificate") from error
    return [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]


def load_private_certificate(certificate_path: str, key_path: str | None = None) -> ssl.PrivateCertificate:
    """A certificate and its private key, read from PEM files.

    Without ``key_path`` the key is read from ``certificate_path`` too.  When
    the certificate file holds a chain, the first certificate is the one
    that goes with the key.
    """
    pem = FilePath(certificate_path).getContent()
    if key_path is not None:
        pem += b"\n" + FilePath(key_path).getContent()
    return ssl.PrivateCertificate.loadPEM(pem)
