"""TLS listeners: TLS 1.2 or newer, AEAD cipher suites, optionally client certificates.

Twisted's own ``ssl:`` parser can express neither a client CA nor a cipher
policy, and its ``sslmethod`` could lower the protocol floor.  Relay
therefore registers its own endpoint string parser, ``relay-tls:``
(declared in ``twisted/plugins/relay_endpoints.py``), which takes the same
keys as ``ssl:`` except ``sslmethod``, plus ``clientCA``.  Twisted's built-in
``ssl`` prefix always wins over plugins, so the command line's ``ssl:``
descriptions are routed to it by ``endpoint_description``.
"""

from __future__ import annotations

from typing import Any

from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, quoteStringArgument
from twisted.internet.interfaces import (
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer

from relay.pem import load_certificates, load_private_certificate
from relay.requests import has_control_character

TLS_PREFIX = "relay-tls"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# Mozilla's "intermediate" TLS 1.2 suites: forward secret key exchange and
# AEAD only, so no CBC (LUCKY13) and no static RSA.  The DHE ones use the
# dhParameters group when given.  TLS 1.3 suites are configured apart and
# keep OpenSSL's set.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)
ACCEPTABLE_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)
# RFC 5280's upper bound for a common name (ub-common-name).
MAX_COMMON_NAME = 64


def endpoint_description(description: str, client_ca: str | None = None) -> str:
    """The strports description to listen on for a ``--port``/``--websocket`` value.

    ``ssl:`` (and ``relay-tls:``) descriptions become ``relay-tls:`` ones,
    carrying ``client_ca`` (a PEM file of CA certificates) as ``clientCA``;
    the rest of the description is passed on untouched.  Anything else is
    returned unchanged.
    """
    prefix, _, rest = description.partition(":")
    if prefix.lower() not in ("ssl", TLS_PREFIX):
        return description
    routed = f"{TLS_PREFIX}:{rest}"
    if client_ca is not None:
        routed += f":clientCA={quoteStringArgument(client_ca)}"
    return routed


def server_options(
    private_key: str = "server.pem",
    cert_key: str | None = None,
    extra_cert_chain: str | None = None,
    dh_parameters: str | None = None,
    client_ca: str | None = None,
) -> ssl.CertificateOptions:
    """TLS options for a Relay listener, from PEM file paths.

    ``cert_key`` defaults to the ``private_key`` file.  With ``client_ca``
    every client must present a certificate signed by one of its CAs.
    """
    if cert_key is None:
        certificate = load_private_certificate(private_key)
    else:
        certificate = load_private_certificate(cert_key, private_key)
    options: dict[str, Any] = {}
    if extra_cert_chain is not None:
        options["extraCertChain"] = [c.original for c in load_certificates(extra_cert_chain)]
    if dh_parameters is not None:
        options["dhParameters"] = ssl.DiffieHellmanParameters.fromFile(FilePath(dh_parameters))
    if client_ca is not None:
        options.update(
            verify=True,
            requireCertificate=True,
            caCerts=[c.original for c in load_certificates(client_ca)],
        )
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        acceptableCiphers=ACCEPTABLE_CIPHERS,
        **options,
    )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class RelayTLSServerParser:
    """The ``relay-tls:`` server endpoint: Twisted's ``ssl:`` keys under Relay's TLS policy.

    Keys: the port (first positional field or ``port``), ``privateKey``,
    ``certKey``, ``extraCertChain``, ``dhParameters``, ``interface`` and
    ``backlog`` as for ``ssl:``, and ``clientCA``.  Any other key, notably
    ``sslmethod``, is a ``ValueError``.
    """

    prefix = TLS_PREFIX

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> IStreamServerEndpoint:
        return _tls_server_endpoint(reactor, *args, **kwargs)


def _tls_server_endpoint(
    reactor: Any,
    port: str | None = None,
    privateKey: str = "server.pem",
    certKey: str | None = None,
    interface: str = "",
    backlog: str = "50",
    extraCertChain: str | None = None,
    dhParameters: str | None = None,
    clientCA: str | None = None,
    **unsupported: str,
) -> IStreamServerEndpoint:
    if unsupported:
        why = "; sslmethod could lower the TLS 1.2 floor" if "sslmethod" in unsupported else ""
        raise ValueError(f"unsupported {TLS_PREFIX} option(s) {', '.join(sorted(unsupported))}{why}")
    if port is None:
        raise ValueError(f"a {TLS_PREFIX} listener needs a port")
    options = server_options(privateKey, certKey, extraCertChain, dhParameters, clientCA)
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def certificate_user_id(certificate: Any) -> str | None:
    """The common name of a peer certificate (pyOpenSSL X509), or None.

    A name that is empty, longer than RFC 5280 allows or holds control
    characters is None too: it would become a user id echoed to others.
    """
    if certificate is None:
        return None
    subject = certificate.to_cryptography().subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    if not isinstance(value, str) or not 0 < len(value) <= MAX_COMMON_NAME:
        return None
    return None if has_control_character(value) else value
