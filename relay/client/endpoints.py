"""Client endpoints: Twisted endpoint descriptions and WebSocket URLs, and ``connect()``.

``build_endpoint`` turns ``tcp:``/``tls:``/``unix:`` descriptions and
``ws://``/``wss://`` URLs into an ``IStreamClientEndpoint``; ``connect``
opens one connection over it and fires once HELLO is acknowledged.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory

from relay.client.protocol import RelayClientFactory, RelayClientProtocol
from relay.server.tls import split_description
from relay.wsmapping import PATH as WEBSOCKET_PATH, SUBPROTOCOL as WEBSOCKET_SUBPROTOCOL

# How long one TCP connection attempt may take (Twisted's default too).
CONNECT_TIMEOUT_SECONDS = 30.0
WEBSOCKET_DEFAULT_PORTS = {"ws": 80, "wss": 443}


def build_endpoint(reactor: Any, description: str, ca_file: str | None = None,
                   client_cert: str | None = None) -> IStreamClientEndpoint:
    """Turn a client endpoint description or a ``ws://``/``wss://`` URL into an endpoint.

    ``ca_file`` (PEM certificates to trust instead of the system's) and
    ``client_cert`` (PEM holding a certificate and its private key) apply to
    ``tls:`` descriptions and ``wss://`` URLs.
    """
    if description.startswith(("ws://", "wss://")):
        return _websocket_endpoint(reactor, description, ca_file, client_cert)
    if ca_file is None and client_cert is None:
        return clientFromString(reactor, description)
    scheme, args, kwargs = split_description(description)
    if scheme != "tls":
        raise ValueError("ca_file and client_cert need a tls: endpoint or a wss:// URL")
    host = kwargs.get("host") or (args[0] if args else None)
    port = kwargs.get("port") or (args[1] if len(args) > 1 else None)
    if not host or not port:
        raise ValueError(f"{description!r} needs a host and a port")
    timeout = float(kwargs.get("timeout", CONNECT_TIMEOUT_SECONDS))
    inner = HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    return wrapClientTLS(_tls_options(host, ca_file, client_cert), inner)


def _tls_options(host: str, ca_file: str | None, client_cert: str | None) -> Any:
    trust_root = None
    if ca_file is not None:
        with open(ca_file, "rb") as pem:
            blocks = _PEM_CERTIFICATE.findall(pem.read())
        if not blocks:
            raise ValueError(f"{ca_file} holds no PEM certificate")
        trust_root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    certificate = None
    if client_cert is not None:
        with open(client_cert, "rb") as pem:
            certificate = ssl.PrivateCertificate.loadPEM(pem.read())
    return ssl.optionsForClientTLS(host, trustRoot=trust_root, clientCertificate=certificate)


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _websocket_endpoint(reactor: Any, url: str, ca_file: str | None,
                        client_cert: str | None) -> IStreamClientEndpoint:
    from relay.client.websocket import WebSocketClientEndpoint

    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r} names no host")
    port = parts.port or WEBSOCKET_DEFAULT_PORTS[parts.scheme]
    inner: IStreamClientEndpoint = HostnameEndpoint(
        reactor, host, port, timeout=CONNECT_TIMEOUT_SECONDS
    )
    if secure:
        inner = wrapClientTLS(_tls_options(host, ca_file, client_cert), inner)
    if not parts.path:
        url = url + WEBSOCKET_PATH
    return WebSocketClientEndpoint(reactor, inner, url, WEBSOCKET_SUBPROTOCOL)


def _handshake(endpoint: IStreamClientEndpoint, factory: Factory) -> defer.Deferred[Any]:
    """Connect, then wait for the HELLO ack; fires with the ready protocol."""
    connecting = endpoint.connect(factory)
    return connecting.addCallback(lambda client: client.ready)


def connect(reactor: Any, description: str, *, user: str | None = None,
            token: str | None = None, echo: bool = False, ca_file: str | None = None,
            client_cert: str | None = None) -> defer.Deferred[RelayClientProtocol]:
    """Connect once; fires with a ``RelayClientProtocol`` after the HELLO ack.

    ``description`` is a Twisted client endpoint string (``tcp:``, ``tls:``,
    ``unix:``) or a ``ws://``/``wss://`` URL.  ``tls:`` verifies the server
    against the system's trust store unless ``ca_file`` is given.
    A refused HELLO fails with ``RelayError``.
    """
    endpoint = build_endpoint(reactor, description, ca_file, client_cert)
    return _handshake(endpoint, RelayClientFactory(reactor, user=user, token=token, echo=echo))
