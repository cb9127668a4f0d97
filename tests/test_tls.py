"""Relay over TLS: real handshakes on loopback, certificates made per run."""

from __future__ import annotations

import tempfile
from typing import Any

import trustme
from OpenSSL import SSL
from twisted.internet import endpoints, reactor, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial import unittest
from zope.interface import implementer

from relay.server import tls
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, MessageType
from tests.support import FrameClient, _disconnect, connect_frame_client

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("localhost", "127.0.0.1")
CLIENT_CERT = CA.issue_cert("alice.example", common_name="alice")
OTHER_CA = trustme.CA()
STRANGER_CERT = OTHER_CA.issue_cert("mallory.example", common_name="mallory")


class RecordingClient(FrameClient):
    """A FrameClient that remembers why its connection ended."""

    reason: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        super().connectionLost(reason)


@implementer(IOpenSSLClientConnectionCreator)
class PinnedVersionClientTLS:
    """Client TLS that offers exactly one protocol version.

    Security level 0 lets OpenSSL offer versions older than TLS 1.2 at all,
    so a refusal can only come from the server.
    """

    def __init__(self, version: int) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(version)
        self._context.set_max_proto_version(version)
        self._context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        return connection


def temporary_directory(case: unittest.TestCase) -> FilePath:
    """A fresh directory outside the source tree, removed after the test."""
    directory = FilePath(tempfile.mkdtemp(prefix="relay-tls-"))
    case.addCleanup(directory.remove)
    return directory


def write_pem(directory: FilePath, name: str, blob: trustme.Blob) -> str:
    path = directory.child(name)
    blob.write_to_path(path.path)
    return path.path


class TLSTestCase(unittest.TestCase):
    """A Relay factory with a TLS listener and a plain TCP one."""

    client_ca = False

    async def setUp(self) -> None:
        directory = temporary_directory(self)
        key = write_pem(directory, "key.pem", SERVER_CERT.private_key_pem)
        cert = write_pem(directory, "cert.pem", SERVER_CERT.cert_chain_pems[0])
        ca = write_pem(directory, "ca.pem", CA.cert_pem) if self.client_ca else None
        self.factory = RelayFactory(RelayConfig(), reactor=reactor)
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        tcp, wrapped = tls.listener(description, self.factory, client_ca=ca)
        self.tls_port = await endpoints.serverFromString(reactor, tcp).listen(wrapped)
        self.addCleanup(self.tls_port.stopListening)
        self.tcp_port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.factory
        )
        self.addCleanup(self.tcp_port.stopListening)
        # Registered before the clients' cleanups, so it runs after them.
        self.addCleanup(self.factory.wait_closed)

    async def connect_tls(self, creator: Any = None, client_cert: Any = None) -> RecordingClient:
        if creator is None:
            options: dict[str, Any] = {"trustRoot": ssl.Certificate.loadPEM(CA.cert_pem.bytes())}
            if client_cert is not None:
                options["clientCertificate"] = ssl.PrivateCertificate.loadPEM(
                    client_cert.private_key_and_cert_chain_pem.bytes()
                )
            creator = ssl.optionsForClientTLS("localhost", **options)
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.tls_port.getHost().port)
        client = await endpoints.connectProtocol(endpoints.wrapClientTLS(creator, tcp), RecordingClient())
        self.addCleanup(_disconnect, client)
        return client

    async def connect_tcp(self) -> FrameClient:
        return await connect_frame_client(self, self.tcp_port)

    async def assert_refused(self, client: RecordingClient, alert: str) -> None:
        """The handshake failed with ``alert`` and no Relay frame got through."""
        client.send_json(MessageType.HELLO, {})
        await client.closed
        self.assertIsInstance(client.reason.value, SSL.Error)
        self.assertIn(alert, str(client.reason.value))
        self.assertEqual(client.frames, [])


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

    async def test_tls_1_1_client_refused_by_the_server(self) -> None:
        client = await self.connect_tls(PinnedVersionClientTLS(SSL.TLS1_1_VERSION))
        # The alert comes from the server: the client did offer TLS 1.1.
        await self.assert_refused(client, "alert protocol version")

    async def test_tls_1_2_client_accepted(self) -> None:
        client = await self.connect_tls(PinnedVersionClientTLS(SSL.TLS1_2_VERSION))
        client.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)

    async def test_without_client_ca_no_certificate_is_asked_for(self) -> None:
        client = await self.connect_tls(client_cert=CLIENT_CERT)
        self.assertTrue((await client.hello())["userId"].startswith("anon-"))


class MutualTLSTests(TLSTestCase):
    client_ca = True

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

    async def test_client_without_certificate_refused(self) -> None:
        client = await self.connect_tls()
        await self.assert_refused(client, "certificate required")

    async def test_certificate_from_another_ca_refused(self) -> None:
        client = await self.connect_tls(client_cert=STRANGER_CERT)
        await self.assert_refused(client, "alert unknown ca")

    async def test_plain_tcp_listener_is_unaffected(self) -> None:
        client = await self.connect_tcp()
        self.assertTrue((await client.hello(userId="bob"))["userId"] == "bob")


class DescriptionTests(unittest.TestCase):
    def test_escaped_colons_stay_in_their_field(self) -> None:
        self.assertEqual(
            tls.split_description(r"ssl:4443:interface=\:\:1:privateKey=C\:\\key.pem"),
            ("ssl", ["4443"], {"interface": "::1", "privateKey": "C:\\key.pem"}),
        )

    def test_non_tls_descriptions_pass_through(self) -> None:
        factory = RelayFactory(RelayConfig(), reactor=reactor)
        self.assertEqual(tls.listener("tcp:4000", factory), ("tcp:4000", factory))
        self.assertFalse(tls.is_tls_description("unix:/tmp/ssl"))

    def test_sslmethod_refused_so_the_floor_cannot_be_lowered(self) -> None:
        with self.assertRaises(ValueError) as caught:
            tls.parse_tls_description("ssl:4443:privateKey=k.pem:sslmethod=TLSv1_METHOD")
        self.assertIn("sslmethod", str(caught.exception))

    def test_tls_listener_is_tcp_with_interface_and_backlog(self) -> None:
        directory = temporary_directory(self)
        key = write_pem(directory, "key.pem", SERVER_CERT.private_key_pem)
        cert = write_pem(directory, "cert.pem", SERVER_CERT.cert_chain_pems[0])
        tcp, _ = tls.parse_tls_description(
            f"ssl:port=4443:privateKey={key}:certKey={cert}:interface=\\:\\:1:backlog=5"
        )
        self.assertEqual(tcp, r"tcp:4443:interface=\:\:1:backlog=5")


class ServiceTests(unittest.TestCase):
    """``twistd relay --port ssl:... --tls-client-ca ...`` end to end."""

    async def test_ssl_port_with_client_ca_from_the_command_line(self) -> None:
        directory = temporary_directory(self)
        key = write_pem(directory, "key.pem", SERVER_CERT.private_key_pem)
        cert = write_pem(directory, "cert.pem", SERVER_CERT.cert_chain_pems[0])
        ca = write_pem(directory, "ca.pem", CA.cert_pem)
        options = Options()
        options.parseOptions(
            ["--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1", "--tls-client-ca", ca]
        )
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = service.listening_ports
        creator = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(CA.cert_pem.bytes()),
            clientCertificate=ssl.PrivateCertificate.loadPEM(
                CLIENT_CERT.private_key_and_cert_chain_pem.bytes()
            ),
        )
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await endpoints.connectProtocol(endpoints.wrapClientTLS(creator, tcp), FrameClient())
        self.addCleanup(_disconnect, client)
        self.assertEqual((await client.hello())["userId"], "alice")

    def test_missing_client_ca_file_is_a_usage_error(self) -> None:
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--tls-client-ca", "/nonexistent/ca.pem"])
