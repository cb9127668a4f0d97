"""Relay over TLS: real handshakes on loopback, certificates made per run."""

from __future__ import annotations

import socket
import tempfile
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet import endpoints, reactor, ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial import unittest
from zope.interface import implementer

from relay.client.endpoints import build_endpoint, connect
from relay.pem import load_certificates
from relay.server import tls
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import stream_socket
from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, MessageType
from tests.support import FrameClient, _disconnect, connect_frame_client

# trustme makes ECDSA keys unless told otherwise.
CA = trustme.CA()
SERVER_CERT = CA.issue_cert("localhost", "127.0.0.1")
CLIENT_CERT = CA.issue_cert("alice.example", common_name="alice")
OTHER_CA = trustme.CA()
STRANGER_CERT = OTHER_CA.issue_cert("mallory.example", common_name="mallory")
RSA_CA = trustme.CA(key_type=trustme.KeyType.RSA)
RSA_SERVER_CERT = RSA_CA.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
# RFC 7919's ffdhe2048 group: published parameters, so no test waits for DH generation.
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class RecordingClient(FrameClient):
    """A FrameClient that remembers why its connection ended."""

    reason: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        super().connectionLost(reason)


@implementer(IOpenSSLClientConnectionCreator)
class ProbeClientTLS:
    """Client TLS that offers exactly one protocol version and the given TLS 1.2 suites.

    Security level 0 lets OpenSSL offer old versions and weak suites at all,
    so a refusal can only come from the server.  The server's certificate
    is not checked: the probe is about what the server agrees to.
    """

    def __init__(self, version: int, ciphers: bytes = b"ALL", tls13_suites: bytes | None = None) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(version)
        self._context.set_max_proto_version(version)
        self._context.set_cipher_list(ciphers + b":@SECLEVEL=0")
        if tls13_suites is not None:
            self._context.set_tls13_ciphersuites(tls13_suites)

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLContextFactory)
class RelaxedServerTLS:
    """Relay's server options with OpenSSL's own checks relaxed as far as they go.

    Every cipher suite at security level 0: OpenSSL alone would then
    negotiate TLS 1.0 and 1.1, so only Relay's protocol floor refuses them.
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self._context = options.getContext()
        self._context.set_cipher_list(b"ALL:@SECLEVEL=0")

    def getContext(self) -> SSL.Context:
        return self._context


def temporary_directory(case: unittest.TestCase) -> FilePath:
    """A fresh directory outside the source tree, removed after the test."""
    directory = FilePath(tempfile.mkdtemp(prefix="relay-tls-"))
    case.addCleanup(directory.remove)
    return directory


def write_pem(directory: FilePath, name: str, blob: trustme.Blob | bytes) -> str:
    path = directory.child(name)
    path.setContent(blob if isinstance(blob, bytes) else blob.bytes())
    return path.path


async def assert_handshake_failed(case: unittest.TestCase, client: RecordingClient, error: str) -> None:
    """``client``'s handshake failed with ``error`` before any Relay frame got through.

    A HELLO is sent first, so a handshake that succeeds fails the test at
    once with the server's answer instead of waiting for a timeout.
    """
    client.send_json(MessageType.HELLO, {})
    try:
        frame = await client.next_frame()
    except ConnectionError:
        pass
    else:
        case.fail(f"served instead of refused: {frame}")
    case.assertIsInstance(client.reason.value, SSL.Error)
    case.assertIn(error, str(client.reason.value))


def verifying_client_tls(ca: trustme.CA = CA, client_cert: Any = None) -> Any:
    """Client TLS for ``localhost`` trusting ``ca``, optionally with a client certificate."""
    options: dict[str, Any] = {"trustRoot": ssl.Certificate.loadPEM(ca.cert_pem.bytes())}
    if client_cert is not None:
        options["clientCertificate"] = ssl.PrivateCertificate.loadPEM(
            client_cert.private_key_and_cert_chain_pem.bytes()
        )
    return ssl.optionsForClientTLS("localhost", **options)


class TLSTestCase(unittest.TestCase):
    """A Relay factory with an ``ssl:`` listener, as ``--port`` gives it, and a plain TCP one."""

    server_cert = SERVER_CERT
    client_ca_pems: tuple[trustme.Blob, ...] = ()

    async def setUp(self) -> None:
        self.directory = temporary_directory(self)
        key = write_pem(self.directory, "key.pem", self.server_cert.private_key_pem)
        cert = write_pem(self.directory, "cert.pem", self.server_cert.cert_chain_pems[0])
        client_ca = None
        if self.client_ca_pems:
            client_ca = write_pem(self.directory, "ca.pem", b"".join(p.bytes() for p in self.client_ca_pems))
        self.factory = RelayFactory(RelayConfig(), reactor=reactor)
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1{self.more_keys()}"
        listening = endpoints.serverFromString(reactor, tls.endpoint_description(description, client_ca))
        self.tls_port = await listening.listen(self.factory)
        self.addCleanup(self.tls_port.stopListening)
        self.tcp_port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.factory
        )
        self.addCleanup(self.tcp_port.stopListening)
        # Registered before the clients' cleanups, so it runs after them.
        self.addCleanup(self.factory.wait_closed)

    def more_keys(self) -> str:
        """Further ``:key=value`` fields for the listener's description."""
        return ""

    async def connect_tls(self, creator: Any = None, client_cert: Any = None) -> RecordingClient:
        if creator is None:
            creator = verifying_client_tls(client_cert=client_cert)
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.tls_port.getHost().port)
        client = await endpoints.connectProtocol(endpoints.wrapClientTLS(creator, tcp), RecordingClient())
        self.addCleanup(_disconnect, client)
        return client

    async def connect_tcp(self) -> FrameClient:
        return await connect_frame_client(self, self.tcp_port)

    async def assert_served(self, client: RecordingClient) -> None:
        """The handshake completed and Relay answers a heartbeat."""
        client.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)

    async def assert_refused(self, client: RecordingClient, alert: str) -> None:
        """The handshake failed with ``alert`` and no Relay frame got through."""
        await assert_handshake_failed(self, client, alert)

    async def assert_suite_accepted(self, suite: str) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_2_VERSION, suite.encode()))
        await self.assert_served(client)
        self.assertEqual(client.transport.getHandle().get_cipher_name(), suite)

    async def assert_suite_refused(self, suite: str) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_2_VERSION, suite.encode()))
        # The server found no suite it accepts among the client's offer.
        await self.assert_refused(client, "alert handshake failure")


class TLSTests(TLSTestCase):
    async def test_tls_and_tcp_clients_share_a_room(self) -> None:
        secure = await self.connect_tls()
        plain = await self.connect_tcp()
        await secure.hello(userId="secure")
        await plain.hello(userId="plain")
        await secure.join("mixed")
        self.assertEqual((await plain.join("mixed"))["members"], 2)
        secure.send_json(MessageType.MESSAGE, {"room": "mixed", "content": "over TLS"})
        _, body = await plain.next_json()
        self.assertEqual((body["from"], body["content"]), ("secure", "over TLS"))
        plain.send_json(MessageType.MESSAGE, {"room": "mixed", "content": "over TCP"})
        _, body = await secure.next_json()
        self.assertEqual((body["from"], body["content"]), ("plain", "over TCP"))

    async def test_the_socket_under_tls_sends_without_nagle_delay(self) -> None:
        secure = await self.connect_tls()
        await secure.hello(userId="secure")
        [connection] = self.factory.connections
        sock = stream_socket(connection.transport)
        self.assertIsNot(sock, connection.transport.getHandle())  # TLS's handle is no socket
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)

    async def test_listener_binds_the_interface_of_its_description(self) -> None:
        self.assertEqual(self.tls_port.getHost().host, "127.0.0.1")

    async def test_tls_1_1_client_refused_by_the_server(self) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_1_VERSION))
        # The alert comes from the server: the client did offer TLS 1.1.  The
        # cipher policy and OpenSSL's security level refuse it here as well;
        # ProtocolFloorTests takes those away to prove the floor itself.
        await self.assert_refused(client, "alert protocol version")

    async def test_tls_1_2_client_accepted(self) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_2_VERSION))
        await self.assert_served(client)
        self.assertEqual(client.transport.getHandle().get_protocol_version_name(), "TLSv1.2")

    async def test_tls_1_3_accepts_each_of_openssls_default_suites(self) -> None:
        for suite in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"):
            client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_3_VERSION, tls13_suites=suite.encode()))
            await self.assert_served(client)
            self.assertEqual(client.transport.getHandle().get_cipher_name(), suite)

    async def test_without_client_ca_no_certificate_is_asked_for(self) -> None:
        client = await self.connect_tls(client_cert=CLIENT_CERT)
        self.assertTrue((await client.hello())["userId"].startswith("anon-"))


class ECDSACipherTests(TLSTestCase):
    """TLS 1.2 with an ECDSA certificate: only ECDHE with an AEAD cipher."""

    async def test_cbc_suites_refused(self) -> None:
        for suite in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
            await self.assert_suite_refused(suite)

    async def test_aead_suites_accepted(self) -> None:
        for suite in (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ):
            await self.assert_suite_accepted(suite)


class RSACipherTests(TLSTestCase):
    """TLS 1.2 with an RSA certificate: only forward secret key exchange with an AEAD cipher."""

    server_cert = RSA_SERVER_CERT

    async def test_cbc_suites_refused(self) -> None:
        for suite in ("ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA"):
            await self.assert_suite_refused(suite)

    async def test_suites_without_forward_secrecy_refused(self) -> None:
        for suite in ("AES128-GCM-SHA256", "AES256-GCM-SHA384"):
            await self.assert_suite_refused(suite)

    async def test_aead_suites_accepted(self) -> None:
        for suite in (
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-RSA-CHACHA20-POLY1305",
        ):
            await self.assert_suite_accepted(suite)


class DiffieHellmanTests(TLSTestCase):
    """``dhParameters`` enables the DHE suites of the policy, and only those."""

    server_cert = RSA_SERVER_CERT

    def more_keys(self) -> str:
        return f":dhParameters={write_pem(self.directory, 'dh.pem', FFDHE2048)}"

    async def test_dhe_aead_suites_accepted(self) -> None:
        for suite in ("DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-CHACHA20-POLY1305"):
            await self.assert_suite_accepted(suite)

    async def test_dhe_cbc_suites_refused(self) -> None:
        for suite in ("DHE-RSA-AES128-SHA", "DHE-RSA-AES256-SHA256"):
            await self.assert_suite_refused(suite)


class ProtocolFloorTests(TLSTestCase):
    """The TLS 1.2 floor holds on its own, not only through OpenSSL's defaults.

    The server runs Relay's options with every cipher suite at security
    level 0, where OpenSSL would negotiate TLS 1.0 and 1.1: lowering Relay's
    floor (say with ``insecurelyLowerMinimumTo``) makes these tests fail.
    Twisted's own default floor is TLS 1.2 too; Relay states its floor
    explicitly so that it does not depend on that default.
    """

    async def setUp(self) -> None:
        await super().setUp()
        key, cert = (self.directory.child(name).path for name in ("key.pem", "cert.pem"))
        options = tls.server_options(key, cert)
        relaxed = endpoints.SSL4ServerEndpoint(reactor, 0, RelaxedServerTLS(options), interface="127.0.0.1")
        self.tls_port = await relaxed.listen(self.factory)
        self.addCleanup(self.tls_port.stopListening)

    async def test_relaxed_server_accepts_what_the_cipher_policy_refuses(self) -> None:
        # Proves the relaxation takes effect, so the refusals below are the floor's.
        await self.assert_suite_accepted("ECDHE-ECDSA-AES128-SHA")

    async def test_tls_1_1_refused_where_openssl_would_allow_it(self) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_1_VERSION))
        await self.assert_refused(client, "alert protocol version")

    async def test_tls_1_0_refused_where_openssl_would_allow_it(self) -> None:
        client = await self.connect_tls(ProbeClientTLS(SSL.TLS1_VERSION))
        await self.assert_refused(client, "alert protocol version")


class MutualTLSTests(TLSTestCase):
    client_ca_pems = (CA.cert_pem,)

    async def test_certificate_common_name_is_the_user_id(self) -> None:
        client = await self.connect_tls(client_cert=CLIENT_CERT)
        self.assertEqual((await client.hello())["userId"], "alice")

    async def test_user_id_without_hello_is_the_common_name(self) -> None:
        alice = await self.connect_tls(client_cert=CLIENT_CERT)
        bob = await self.connect_tcp()
        await alice.join("room")
        await bob.join("room")
        alice.send_json(MessageType.MESSAGE, {"room": "room", "content": "hi"})
        self.assertEqual((await bob.next_json())[1]["from"], "alice")

    async def test_hello_cannot_claim_another_user_id(self) -> None:
        client = await self.connect_tls(client_cert=CLIENT_CERT)
        type_, body = await client.request(MessageType.HELLO, {"userId": "bob", "id": 1})
        self.assertEqual(type_, MessageType.ERROR)
        self.assertEqual((body["code"], body["fatal"], body["id"]), (ErrorCode.BAD_REQUEST, False, 1))
        # Naming itself as the certificate does is fine.
        self.assertEqual((await client.hello(userId="alice"))["userId"], "alice")

    async def test_common_name_with_control_characters_leaves_the_user_anonymous(self) -> None:
        client = await self.connect_tls(client_cert=CA.issue_cert("eve.example", common_name="eve\x1b[2J"))
        self.assertTrue((await client.hello())["userId"].startswith("anon-"))

    async def test_client_without_certificate_refused(self) -> None:
        client = await self.connect_tls()
        await self.assert_refused(client, "certificate required")

    async def test_certificate_from_another_ca_refused(self) -> None:
        client = await self.connect_tls(client_cert=STRANGER_CERT)
        await self.assert_refused(client, "alert unknown ca")

    async def test_plain_tcp_listener_is_unaffected(self) -> None:
        client = await self.connect_tcp()
        self.assertTrue((await client.hello(userId="bob"))["userId"] == "bob")


class ClientCABundleTests(TLSTestCase):
    """``--tls-client-ca`` may hold several CAs: each of them is trusted."""

    client_ca_pems = (OTHER_CA.cert_pem, CA.cert_pem)

    async def test_every_ca_in_the_bundle_is_trusted(self) -> None:
        alice = await self.connect_tls(client_cert=CLIENT_CERT)
        mallory = await self.connect_tls(client_cert=STRANGER_CERT)
        self.assertEqual((await alice.hello())["userId"], "alice")
        self.assertEqual((await mallory.hello())["userId"], "mallory")


class CertificateChainTests(unittest.TestCase):
    """``extraCertChain`` sends intermediates, so clients that trust only the root verify the server."""

    async def listen(self, chain: bool) -> int:
        root = trustme.CA()
        self.root_pem = root.cert_pem.bytes()
        intermediate = root.create_child_ca()
        leaf = intermediate.issue_cert("localhost")
        directory = temporary_directory(self)
        key = write_pem(directory, "key.pem", leaf.private_key_pem)
        cert = write_pem(directory, "cert.pem", leaf.cert_chain_pems[0])
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        if chain:
            description += f":extraCertChain={write_pem(directory, 'chain.pem', intermediate.cert_pem)}"
        factory = RelayFactory(RelayConfig(), reactor=reactor)
        self.addCleanup(factory.wait_closed)
        listening = endpoints.serverFromString(reactor, tls.endpoint_description(description))
        port = await listening.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def connect(self, port: int) -> RecordingClient:
        creator = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(self.root_pem))
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoints.connectProtocol(endpoints.wrapClientTLS(creator, tcp), RecordingClient())
        self.addCleanup(_disconnect, client)
        return client

    async def test_client_trusting_the_root_verifies_through_the_chain(self) -> None:
        client = await self.connect(await self.listen(chain=True))
        self.assertTrue((await client.hello())["userId"].startswith("anon-"))

    async def test_without_the_chain_the_client_cannot_verify(self) -> None:
        client = await self.connect(await self.listen(chain=False))
        await assert_handshake_failed(self, client, "certificate verify failed")


class DescriptionTests(unittest.TestCase):
    def test_relay_tls_parsers_are_twisted_plugins(self) -> None:
        servers = {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}
        clients = {p.prefix for p in getPlugins(IStreamClientEndpointStringParserWithReactor)}
        self.assertIn(tls.TLS_PREFIX, servers)
        self.assertIn(tls.TLS_PREFIX, clients)

    def test_ssl_prefix_is_swapped_and_the_rest_left_as_written(self) -> None:
        description = r"ssl:4443:interface=\:\:1:privateKey=C\:\\key.pem"
        self.assertEqual(
            tls.endpoint_description(description), r"relay-tls:4443:interface=\:\:1:privateKey=C\:\\key.pem"
        )

    def test_client_ca_is_added_as_a_quoted_keyword(self) -> None:
        self.assertEqual(
            tls.endpoint_description("SSL:4443", client_ca=r"C:\ca.pem"),
            r"relay-tls:4443:clientCA=C\:\\ca.pem",
        )

    def test_non_tls_descriptions_pass_through(self) -> None:
        for description in ("tcp:4000", "unix:/tmp/ssl", "tcp6:port=4000:interface=\\:\\:1"):
            self.assertEqual(tls.endpoint_description(description, client_ca="ca.pem"), description)

    def test_sslmethod_refused_so_the_floor_cannot_be_lowered(self) -> None:
        with self.assertRaises(ValueError) as caught:
            endpoints.serverFromString(reactor, "relay-tls:4443:privateKey=k.pem:sslmethod=TLSv1_METHOD")
        self.assertIn("sslmethod", str(caught.exception))

    def test_unknown_keys_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            endpoints.serverFromString(reactor, "relay-tls:4443:privateKey=k.pem:ciphers=ALL")
        self.assertIn("ciphers", str(caught.exception))

    def test_port_is_required(self) -> None:
        with self.assertRaises(ValueError):
            endpoints.serverFromString(reactor, "relay-tls:privateKey=k.pem")

    def test_pem_file_without_certificates_is_an_error(self) -> None:
        path = temporary_directory(self).child("empty.pem")
        path.setContent(b"no certificate here\n")
        with self.assertRaises(ValueError):
            load_certificates(path.path)


class EscapingTests(TLSTestCase):
    """Paths with colons, escaped as Twisted descriptions escape them, reach the files."""

    async def setUp(self) -> None:
        self.directory = temporary_directory(self).child("a:b")
        self.directory.makedirs()
        quote = endpoints.quoteStringArgument
        key = quote(write_pem(self.directory, "key.pem", SERVER_CERT.private_key_pem))
        cert = quote(write_pem(self.directory, "cert.pem", SERVER_CERT.cert_chain_pems[0]))
        client_ca = write_pem(self.directory, "ca.pem", CA.cert_pem)
        self.factory = RelayFactory(RelayConfig(), reactor=reactor)
        self.addCleanup(self.factory.wait_closed)
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        listening = endpoints.serverFromString(reactor, tls.endpoint_description(description, client_ca))
        self.tls_port = await listening.listen(self.factory)
        self.addCleanup(self.tls_port.stopListening)

    async def test_client_ca_path_with_a_colon_is_used(self) -> None:
        await self.assert_refused(await self.connect_tls(), "certificate required")
        client = await self.connect_tls(client_cert=CLIENT_CERT)
        self.assertEqual((await client.hello())["userId"], "alice")

    async def test_client_files_with_a_colon_are_used(self) -> None:
        ca_file = self.directory.child("ca.pem").path
        client_pem = write_pem(self.directory, "alice.pem", CLIENT_CERT.private_key_and_cert_chain_pem)
        description = f"tls:host=localhost:port={self.tls_port.getHost().port}"
        client = await connect(reactor, description, ca_file=ca_file, client_cert=client_pem)
        self.addCleanup(client.disconnect)
        self.assertEqual(client.user_id, "alice")


class ClientTLSTests(TLSTestCase):
    """relay.client against a Relay TLS listener: PEM bundles and client certificates."""

    client_ca_pems = (CA.cert_pem,)

    def client_files(self) -> dict[str, str]:
        bundle = OTHER_CA.cert_pem.bytes() + CA.cert_pem.bytes()
        return {
            "bundle": write_pem(self.directory, "bundle.pem", bundle),
            "alice": write_pem(self.directory, "alice.pem", CLIENT_CERT.private_key_and_cert_chain_pem),
            "alice_cert": write_pem(self.directory, "alice-cert.pem", CLIENT_CERT.cert_chain_pems[0]),
            "alice_key": write_pem(self.directory, "alice-key.pem", CLIENT_CERT.private_key_pem),
        }

    async def test_ca_file_bundle_and_client_cert_on_a_tls_description(self) -> None:
        files = self.client_files()
        description = f"tls:host=localhost:port={self.tls_port.getHost().port}"
        client = await connect(reactor, description, ca_file=files["bundle"], client_cert=files["alice"])
        self.addCleanup(client.disconnect)
        self.assertEqual(client.user_id, "alice")

    async def test_relay_tls_description_takes_certificate_and_key_files(self) -> None:
        files = self.client_files()
        description = (
            f"relay-tls:localhost:{self.tls_port.getHost().port}:caFile={files['bundle']}"
            f":certificate={files['alice_cert']}:privateKey={files['alice_key']}"
        )
        client = await connect(reactor, description)
        self.addCleanup(client.disconnect)
        self.assertEqual(client.user_id, "alice")

    async def test_ca_file_replaces_the_system_trust_store(self) -> None:
        files = self.client_files()
        other = write_pem(self.directory, "other.pem", OTHER_CA.cert_pem)
        description = f"tls:host=localhost:port={self.tls_port.getHost().port}"
        failing = connect(reactor, description, ca_file=other, client_cert=files["alice"])
        lost = await self.assertFailure(failing, Exception)
        self.assertIn("certificate verify failed", str(lost))

    def test_ca_file_without_certificates_is_an_error(self) -> None:
        path = write_pem(self.directory, "empty.pem", b"nothing\n")
        with self.assertRaises(ValueError):
            build_endpoint(reactor, "tls:host=localhost:port=4443", ca_file=path)

    def test_unknown_keys_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            build_endpoint(reactor, "tls:host=localhost:port=4443:trustRoots=/etc/ssl", ca_file="ca.pem")
        self.assertIn("trustRoots", str(caught.exception))


class ServiceTests(unittest.TestCase):
    """``twistd relay --port ssl:... --tls-client-ca ...`` end to end."""

    def write_files(self) -> dict[str, str]:
        directory = temporary_directory(self)
        return {
            "key": write_pem(directory, "key.pem", SERVER_CERT.private_key_pem),
            "cert": write_pem(directory, "cert.pem", SERVER_CERT.cert_chain_pems[0]),
            "ca": write_pem(directory, "ca.pem", CA.cert_pem),
            "alice": write_pem(directory, "alice.pem", CLIENT_CERT.private_key_and_cert_chain_pem),
        }

    def start(self, *arguments: str) -> Any:
        options = Options()
        options.parseOptions(list(arguments))
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def test_ssl_port_with_client_ca_from_the_command_line(self) -> None:
        files = self.write_files()
        service = self.start(
            "--port", f"ssl:0:privateKey={files['key']}:certKey={files['cert']}:interface=127.0.0.1",
            "--tls-client-ca", files["ca"],
        )
        (port,) = service.listening_ports
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        creator = verifying_client_tls(client_cert=CLIENT_CERT)
        client = await endpoints.connectProtocol(endpoints.wrapClientTLS(creator, tcp), FrameClient())
        self.addCleanup(_disconnect, client)
        self.assertEqual((await client.hello())["userId"], "alice")

    async def test_ssl_websocket_with_client_ca_from_the_command_line(self) -> None:
        files = self.write_files()
        service = self.start(
            "--port", "tcp:0:interface=127.0.0.1",
            "--websocket", f"ssl:0:privateKey={files['key']}:certKey={files['cert']}:interface=127.0.0.1",
            "--tls-client-ca", files["ca"],
        )
        wss = service.listening_ports[1].getHost().port
        url = f"wss://localhost:{wss}/relay"
        client = await connect(reactor, url, ca_file=files["ca"], client_cert=files["alice"])
        self.addCleanup(client.disconnect)
        self.assertEqual(client.user_id, "alice")

    def test_sslmethod_stops_startup(self) -> None:
        files = self.write_files()
        options = Options()
        options.parseOptions(["--port", f"ssl:0:privateKey={files['key']}:sslmethod=TLSv1_METHOD"])
        with self.assertRaises(ValueError):
            makeService(options, reactor=reactor)

    def test_missing_client_ca_file_is_a_usage_error(self) -> None:
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--tls-client-ca", "/nonexistent/ca.pem"])
