"""``--workers``: listeners opened once by a supervisor and adopted by each worker."""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import trustme
from twisted.application import strports
from twisted.internet import endpoints, reactor, ssl
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.workers import Adopter, ListenerCapture, restart_delay, worker_argv
from relay.wire import ErrorCode, MessageType
from tests.cluster_support import OutputWatcher, RedisServer, listening_ports, wait_until
from tests.support import FrameClient

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


class PiecesTests(unittest.TestCase):
    def test_workers_get_the_options_less_workers(self) -> None:
        self.assertEqual(
            worker_argv(["--port", "tcp:1", "--workers", "2", "--redis", "redis://", "--workers=3", "--debug"]),
            ["--port", "tcp:1", "--redis", "redis://", "--debug"],
        )

    def test_restarts_back_off_while_a_worker_keeps_dying_young(self) -> None:
        self.assertEqual([restart_delay(n) for n in (1, 2, 3)], [0.5, 1.0, 2.0])
        self.assertEqual(restart_delay(100), 10.0)

    async def test_a_tls_listener_is_captured_then_adopted_and_serves_tls(self) -> None:
        ca = trustme.CA()
        directory = tempfile.mkdtemp()
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        issued = ca.issue_cert("localhost")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        description = f"relay-tls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        capture = ListenerCapture(reactor)
        strports.service(description, None, reactor=capture).startService()
        (captured,) = capture.ports
        self.addCleanup(captured.stopListening)
        # What a worker does with the descriptor it inherited.
        factory = RelayFactory(RelayConfig(), reactor=reactor)
        listener = strports.service(description, factory, reactor=Adopter(reactor, os.dup(captured.fileno())))
        listener.startService()
        self.addCleanup(listener.stopService)
        self.addCleanup(factory.wait_closed)
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])
        endpoint = endpoints.wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=trust),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", captured.getHost().port),
        )
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        self.assertEqual((await client.hello(userId="tls"))["userId"], "tls")


class SupervisorTests(unittest.TestCase):
    """The real ``twistd relay --workers 2`` with a real Redis."""

    timeout = 120

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        self.watcher = OutputWatcher()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = reactor.spawnProcess(
            self.watcher,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "relay", "--workers", "2", "--redis", self.redis.url,
             "--port", "tcp:0:interface=127.0.0.1", "--websocket", "tcp:0:interface=127.0.0.1"],
            env=env,
            path=tempfile.mkdtemp(),
        )
        self.addCleanup(self.kill_all)
        await wait_until(lambda: self.watcher.output.count(b"Redis link up") >= 2, "both workers up")
        # The supervisor's, then each worker's (the same ports, adopted).
        self.port, self.websocket_port = listening_ports(self.watcher.output)[:2]

    def kill_all(self):
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        if self.watcher.running:
            self.process.signalProcess("KILL")
        return self.watcher.ended

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(rb"worker \d+ started, pid (\d+)", self.watcher.output)}

    async def client(self) -> tuple[FrameClient, int]:
        """A connected client that said HELLO, and the pid of the worker serving it."""
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        connection = (await client.hello())["connectionId"].encode()
        pattern = rb"worker \d+ \[(\d+)\] [^\n]*" + connection + rb" connected from"
        await wait_until(lambda: re.search(pattern, self.watcher.output), "the worker's log line")
        return client, int(re.search(pattern, self.watcher.output).group(1))

    async def client_on_another_worker(self, busy_pid: int) -> tuple[FrameClient, int]:
        """While the worker ``busy_pid`` is stopped, only the other can accept."""
        os.kill(busy_pid, signal.SIGSTOP)
        try:
            return await self.client()
        finally:
            os.kill(busy_pid, signal.SIGCONT)

    async def test_both_workers_accept_share_rooms_and_drain_on_sigterm(self) -> None:
        first, first_pid = await self.client()
        second, second_pid = await self.client_on_another_worker(first_pid)
        self.assertNotEqual(first_pid, second_pid)
        self.assertEqual(self.worker_pids(), {first_pid, second_pid})
        self.assertEqual((await first.join("lobby"))["members"], 1)
        self.assertEqual((await second.join("lobby"))["members"], 2)
        first.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "across workers"})
        self.assertEqual((await second.next_json())[1]["content"], "across workers")

        stopping = reactor.seconds()
        self.process.signalProcess("TERM")
        for client in (first, second):
            type_, body = await client.next_json()
            self.assertEqual((type_, body["code"]), (MessageType.ERROR, ErrorCode.SERVER_SHUTDOWN))
            await client.closed
        ended = await self.watcher.ended
        self.assertEqual(ended.signal, signal.SIGTERM)
        self.assertLess(reactor.seconds() - stopping, 10)
        self.assertIn(b"All workers stopped", self.watcher.output)
        self.assertNotIn(b"Traceback", self.watcher.output)

    async def test_the_websocket_listener_is_shared_too(self) -> None:
        from twisted.web.client import Agent, readBody

        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{self.websocket_port}/".encode())
        self.assertEqual(response.code, 200)
        self.assertIn(b"Relay", await readBody(response))

    async def test_a_killed_worker_is_restarted_and_accepts_again(self) -> None:
        _, victim = await self.client()
        survivor = (self.worker_pids() - {victim}).pop()
        before = len(self.watcher.output)
        os.kill(victim, signal.SIGKILL)
        await self.watcher.wait_for(b"restarting it in", after=before)
        await wait_until(lambda: self.watcher.output.count(b"Redis link up", before) >= 1, "the new worker up")
        (replacement,) = self.worker_pids() - {victim, survivor}
        _, pid = await self.client_on_another_worker(survivor)
        self.assertEqual(pid, replacement)
        self.assertIn(f"(pid {victim}) exited".encode(), self.watcher.output)
