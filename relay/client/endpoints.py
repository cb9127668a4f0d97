"""Client endpoints: Twisted endpoint descriptions and WebSocket URLs, and ``connect()``.

``build_endpoint`` turns ``tcp:``/``tls:``/``unix:`` descriptions and
``ws://``/``wss://`` URLs into an ``IStreamClientEndpoint``; ``connect``
opens one connection over it and fires once HELLO is acknowledged.
"""

from __future__ import annotations

from typing import Any, Callable, Union
from urllib.parse import urlsplit

from twisted.internet import defer, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    clientFromString,
    quoteStringArgument,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.internet.protocol import Factory
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.client.protocol import RelayClientFactory, RelayClientProtocol
from relay.pem import load_certificates, load_private_certificate
from relay.wsmapping import PATH as WEBSOCKET_PATH
from relay.wsmapping import SUBPROTOCOL as WEBSOCKET_SUBPROTOCOL

# How long one TCP connection attempt may take (Twisted's default too).
CONNECT_TIMEOUT_SECONDS = 30.0
WEBSOCKET_DEFAULT_PORTS = {"ws": 80, "wss": 443}
# Relay's own client TLS endpoint prefix (Twisted's tls: cannot trust a PEM bundle file).
TLS_PREFIX = "relay-tls"


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
    prefix, _, rest = description.partition(":")
    if prefix.lower() not in ("tls", TLS_PREFIX):
        raise ValueError("ca_file and client_cert need a tls: endpoint or a wss:// URL")
    # The files travel as keywords of the relay-tls: parser; the rest of the
    # description is Twisted's to parse, as for tls:.
    if ca_file is not None:
        rest += f":caFile={quoteStringArgument(ca_file)}"
    if client_cert is not None:
        rest += f":certificate={quoteStringArgument(client_cert)}"
    return clientFromString(reactor, f"{TLS_PREFIX}:{rest}")


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class RelayTLSClientParser:
    """The ``relay-tls:`` client endpoint: Twisted's ``tls:`` with a PEM bundle to trust.

    Keys: ``host`` and ``port`` (or the first two positional fields),
    ``timeout``, ``bindAddress``, ``certificate``, ``privateKey`` and
    ``endpoint`` as for ``tls:``, and ``caFile``, a PEM file of one or more
    certificates to trust instead of the system's.  Any other key is a
    ``ValueError``.
    """

    prefix = TLS_PREFIX

    def parseStreamClient(self, reactor: Any, *args: str, **kwargs: str) -> IStreamClientEndpoint:
        return _tls_client_endpoint(reactor, *args, **kwargs)


def _tls_client_endpoint(
    reactor: Any,
    host: str | None = None,
    port: str | None = None,
    timeout: str | None = None,
    bindAddress: str | None = None,
    certificate: str | None = None,
    privateKey: str | None = None,
    caFile: str | None = None,
    endpoint: str | None = None,
    **unsupported: str,
) -> IStreamClientEndpoint:
    if unsupported:
        # trustRoots (a directory) is left to tls:; caFile takes its place here.
        raise ValueError(f"unsupported {TLS_PREFIX} option(s) {', '.join(sorted(unsupported))}")
    if not host or not (port or endpoint):
        raise ValueError(f"a {TLS_PREFIX} endpoint needs a host and a port")
    options = _tls_options(host, caFile, certificate, privateKey)
    inner: IStreamClientEndpoint
    if endpoint is not None:
        inner = clientFromString(reactor, endpoint)
    else:
        bind = None if bindAddress is None else (bindAddress, 0)
        seconds = CONNECT_TIMEOUT_SECONDS if timeout is None else float(timeout)
        inner = HostnameEndpoint(reactor, host, int(port), timeout=seconds, bindAddress=bind)
    return wrapClientTLS(options, inner)


def _tls_options(host: str, ca_file: str | None, certificate: str | None,
                 private_key: str | None = None) -> Any:
    trust_root = None
    if ca_file is not None:
        trust_root = ssl.trustRootFromCertificates(load_certificates(ca_file))
    client_certificate = None
    if certificate is not None:
        client_certificate = load_private_certificate(certificate, private_key)
    return ssl.optionsForClientTLS(host, trustRoot=trust_root, clientCertificate=client_certificate)


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


# A callable giving a fresh token, at once or later: called before each connection.
TokenProvider = Callable[[], Union[str, "defer.Deferred[str]"]]


def fetch_token(provider: TokenProvider) -> defer.Deferred[str]:
    """Call ``provider`` for a token; fails with TypeError if it gives no string."""
    def check(token: Any) -> str:
        if not isinstance(token, str):
            raise TypeError(f"the token provider gave a {type(token).__name__}, not a string")
        return token

    return defer.maybeDeferred(provider).addCallback(check)


def _handshake(endpoint: IStreamClientEndpoint, factory: Factory) -> defer.Deferred[Any]:
    """Connect, then wait for the HELLO ack; fires with the ready protocol."""
    connecting = endpoint.connect(factory)
    return connecting.addCallback(lambda client: client.ready)


def connect(reactor: Any, description: str, *, user: str | None = None,
            token: str | None = None, echo: bool = False, ca_file: str | None = None,
            client_cert: str | None = None,
            token_provider: TokenProvider | None = None,
            **extensions: bool) -> defer.Deferred[RelayClientProtocol]:
    """Connect once; fires with a ``RelayClientProtocol`` after the HELLO ack.

    ``description`` is a Twisted client endpoint string (``tcp:``, ``tls:``,
    ``unix:``) or a ``ws://``/``wss://`` URL.  ``tls:`` verifies the server
    against the system's trust store unless ``ca_file`` is given.
    ``token`` goes into HELLO; or ``token_provider``, a callable returning a
    token or a Deferred of one, is called first for a fresh token.
    A refused HELLO fails with ``RelayError``.  ``extensions`` are the
    protocol's flags: ``acks=True``, ``compression=True``, ``history=True``,
    ``presence=True``, ``direct=True``.
    """
    if token is not None and token_provider is not None:
        raise ValueError("give a token or a token provider, not both")
    endpoint = build_endpoint(reactor, description, ca_file, client_cert)
    if token_provider is None:
        return _handshake(endpoint, RelayClientFactory(reactor, user=user, token=token, echo=echo, **extensions))
    return fetch_token(token_provider).addCallback(
        lambda fresh: _handshake(
            endpoint, RelayClientFactory(reactor, user=user, token=fresh, echo=echo, **extensions)
        )
    )
