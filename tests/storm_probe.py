"""A connection storm against a real ``twistd relay``: the probe behind the storm test.

Starts the server, opens ``--count`` connections in a tight loop with
blocking sockets (each connect() returns once the kernel completed the
handshake, so its time is what a reconnecting client waits), and prints one
JSON object: the listener's backlog as ``ss`` shows it, the connect
latencies, and how much the kernel's listen overflow and drop counters
grew.  Run it in a network namespace of its own (``unshare -n``) and those
counters are the server's alone.

    python -m tests.storm_probe --count 2000 [-- extra twistd relay options]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def kernel_counters() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops of this network namespace."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    names, values = lines[0][1:], lines[1][1:]
    counters = dict(zip(names, map(int, values)))
    return {name: counters.get(name, 0) for name in ("ListenOverflows", "ListenDrops")}


def listen_backlog(port: int) -> int | None:
    """The backlog of the listener on ``port`` (ss shows it as Send-Q)."""
    try:
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = out.split()
    return int(fields[2]) if len(fields) >= 3 else None


def start_server(options: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A file, not a pipe: a pipe nobody reads would stall the server's logging.
    log = tempfile.NamedTemporaryFile(prefix="relay-storm-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "relay", *options],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        match = re.search(rb"Listening on .*?port=(\d+)", Path(log.name).read_bytes())
        if match:
            return server, int(match.group(1))
        time.sleep(0.05)
    server.kill()
    raise SystemExit("the server did not start listening: " + Path(log.name).read_text()[-2000:])


def storm(port: int, count: int) -> list[float]:
    """Connect ``count`` sockets as fast as possible; each connect's seconds."""
    sockets, latencies = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            started = time.perf_counter()
            sock.connect(("127.0.0.1", port))
            latencies.append(time.perf_counter() - started)
            sockets.append(sock)
    finally:
        for sock in sockets:
            sock.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--port", default="tcp:0:interface=127.0.0.1")
    parser.add_argument("server_options", nargs="*")
    args = parser.parse_args()
    server, port = start_server(["--port", args.port, *args.server_options])
    try:
        backlog = listen_backlog(port)
        before = kernel_counters()
        started = time.perf_counter()
        latencies = storm(port, args.count)
        elapsed = time.perf_counter() - started
        after = kernel_counters()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    ordered = sorted(latencies)
    print(
        json.dumps(
            {
                "backlog": backlog,
                "connects": len(latencies),
                "seconds": round(elapsed, 3),
                "max_ms": round(ordered[-1] * 1000, 2),
                "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
                "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 3),
                "over_200ms": sum(1 for latency in latencies if latency > 0.2),
                "listen_overflows": after["ListenOverflows"] - before["ListenOverflows"],
                "listen_drops": after["ListenDrops"] - before["ListenDrops"],
            }
        )
    )


if __name__ == "__main__":
    main()
