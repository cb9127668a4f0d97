"""Reaching Redis: a Unix socket, a password, TLS (rediss://), a refused password."""

from __future__ import annotations

import os
import tempfile

import trustme
from twisted.trial import unittest

from relay.wire import MessageType
from relay.server.tap import Options, makeService
from tests.cluster_support import ClusterNodes, RedisServer, connect, free_port, require_redis, wait_until
from tests.test_cluster_failures import LogCapture, member

SECRET = "s3cret-Pa55word"


class RedisConnectionTests(unittest.TestCase):
    timeout = 60

    async def two_nodes_deliver(self, url: str) -> None:
        nodes = ClusterNodes(self, url)
        a, b = await nodes.node(), await nodes.node()
        alice = await member(self, a, "alice")
        bob = await member(self, b, "bob")
        self.assertEqual((await (await connect(self, b)).join("lobby"))["members"], 3)
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "over the link"})
        self.assertEqual((await bob.next_json())[1]["content"], "over the link")

    async def test_a_unix_socket_with_a_password_carries_the_cluster(self) -> None:
        redis = await RedisServer(self, unix_socket=True, extra=("--requirepass", SECRET)).start()
        logs = LogCapture(self)
        await self.two_nodes_deliver(f"unix://:{SECRET}@{redis.socket_path}")
        self.assertEqual([line for line in logs.lines if SECRET in line], [])

    async def test_a_password_from_the_environment(self) -> None:
        redis = await RedisServer(self, extra=("--requirepass", SECRET)).start()
        self.patch(os, "environ", {**os.environ, "RELAY_REDIS_PASSWORD": SECRET})
        await self.two_nodes_deliver(redis.url)

    async def test_rediss_verifies_the_server_certificate(self) -> None:
        ca = trustme.CA()
        directory = tempfile.mkdtemp()
        paths = {name: os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")}
        ca.cert_pem.write_to_path(paths["ca.pem"])
        server = ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(paths["cert.pem"])
        server.private_key_pem.write_to_path(paths["key.pem"])
        redis = RedisServer(self, extra=(
            "--port", "0", "--tls-port", "{port}",
            "--tls-cert-file", paths["cert.pem"], "--tls-key-file", paths["key.pem"],
            "--tls-ca-cert-file", paths["ca.pem"], "--tls-auth-clients", "no",
        ))
        await redis.start()
        await self.two_nodes_deliver(f"rediss://127.0.0.1:{redis.port}/0?trustRoots={paths['ca.pem']}")

    async def test_a_wrong_password_keeps_the_link_down_and_is_never_logged(self) -> None:
        redis = await RedisServer(self, extra=("--requirepass", SECRET)).start()
        logs = LogCapture(self)
        wrong = "not-the-" + SECRET
        node = await ClusterNodes(self, f"redis://:{wrong}@127.0.0.1:{redis.port}/0").node(wait=False)
        backplane = node.factory.backplane
        await wait_until(lambda: backplane.stats.failed_attempts >= 6, "a few attempts")
        self.assertFalse(backplane.link_up)
        # Once, however often it is retried (both connections give the same reason).
        self.assertEqual(logs.count("Redis refused"), 1)
        # Local rooms still work.
        alice = await member(self, node, "alice")
        self.assertEqual((await alice.join("lobby"))["members"], 1)
        self.assertEqual([line for line in logs.lines if wrong in line or SECRET in line], [])

    async def test_an_unreachable_redis_is_said_once_and_local_rooms_work(self) -> None:
        require_redis(self)
        logs = LogCapture(self)
        node = await ClusterNodes(self, f"redis://127.0.0.1:{free_port()}/0").node(wait=False)
        backplane = node.factory.backplane
        await wait_until(lambda: backplane.stats.failed_attempts >= 8, "a few attempts")
        self.assertEqual(logs.count("Redis unreachable"), 1)
        self.assertFalse(backplane.health()[0])
        alice = await member(self, node, "alice")
        bob = await member(self, node, "bob")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "local"})
        self.assertEqual((await bob.next_json())[1]["content"], "local")

    def test_unreadable_tls_files_stop_startup(self) -> None:
        options = Options()
        options.parseOptions(["--port", "tcp:0", "--redis", "rediss://127.0.0.1:1/0?trustRoots=/nonexistent/ca.pem"])
        self.assertRaises(OSError, makeService, options)
