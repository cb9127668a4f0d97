"""What docs/operations.md promises: systemd socket activation works with the
real twistd, and the Grafana dashboard uses only metrics the server exports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
from pathlib import Path

from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, MessageType
from tests.scrape import base_url, scrape
from tests.support import FrameClient
from tests.test_service import REPO, TWISTD, ProcessWatcher, source_env

GRAFANA = REPO / "docs" / "grafana-dashboard.json"
# What systemd does before it execs the service: the sockets are fds 3, 4, ...
# and the environment names them for the process that is exec'd (same pid).
SYSTEMD_EXEC = 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=relay exec "$0" "$@"'


class SocketActivationTests(unittest.TestCase):
    async def test_twistd_serves_on_a_socket_inherited_from_systemd(self) -> None:
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        watcher = ProcessWatcher()
        process = reactor.spawnProcess(
            watcher,
            "/bin/sh",
            ["/bin/sh", "-c", SYSTEMD_EXEC, TWISTD, "-n", "--pidfile=", "relay",
             "--port", "systemd:domain=INET:name=relay"],
            env=source_env(),
            path=tempfile.mkdtemp(),
            childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
        )
        self.addCleanup(lambda: (process.pid is not None and process.signalProcess("KILL")) or watcher.ended)
        await watcher.wait_for(b"Listening on")
        listening.close()  # the server holds its own copy now
        client = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), FrameClient()
        )
        await client.hello(userId="activated")
        self.assertEqual((await client.join("r"))["members"], 1)
        os.kill(process.pid, signal.SIGTERM)
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"]), (MessageType.ERROR, ErrorCode.SERVER_SHUTDOWN))
        ended = await watcher.ended
        self.assertEqual(ended.signal, signal.SIGTERM)
        self.assertNotIn(b"Traceback", watcher.output)


class GrafanaDashboardTests(unittest.TestCase):
    async def test_every_query_uses_metrics_the_server_exports(self) -> None:
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        exported = (await scrape(base_url(service.metrics_ports[0]))).names()

        dashboard = json.loads(Path(GRAFANA).read_text())
        queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        self.assertGreater(len(queries), 20)
        used = {
            name for query in queries
            for name in re.findall(r"\b((?:relay|process|python)_[a-z_]+)\b", query)
        }
        self.assertIn("relay_frames_sent_total", used)
        self.assertEqual(used - exported, set())
        # Every panel asks the one data source variable, and panels do not overlap.
        self.assertEqual({p["datasource"]["uid"] for p in dashboard["panels"]}, {"${datasource}"})
        cells = set()
        for panel in dashboard["panels"]:
            box = panel["gridPos"]
            for x in range(box["x"], box["x"] + box["w"]):
                for y in range(box["y"], box["y"] + box["h"]):
                    self.assertNotIn((x, y), cells, panel["title"])
                    cells.add((x, y))
