"""
Conformance tests for the Relay v1 wire protocol, written from docs/protocol.md.

The client here uses only the standard library (socket, struct, json): nothing
from the relay package encodes or decodes a frame.  The server runs in-process
on a loopback port; each scenario drives it with blocking sockets from a worker
thread and raises AssertionError on any disagreement with the reference.
"""

import json
import socket
import struct
import time
import unicodedata

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory

TIMEOUT = 5.0

HELLO, JOIN_ROOM, LEAVE_ROOM, MESSAGE, HEARTBEAT, ERROR = 1, 2, 3, 4, 5, 6
F_JSON, F_BINARY, F_COMPRESSED = 0x01, 0x02, 0x04

MAX_FRAME = 1048576  # the documented default of --max-frame-size
DELIVERY_SLACK = 512
MAX_ROOMS = 64  # the documented default of --max-rooms

_MISSING = object()


# -- encoding -----------------------------------------------------------------


def frame(ftype, flags=0, payload=b"", version=1, length=None):
    if length is None:
        length = 3 + len(payload)
    return struct.pack(">IBBB", length, version, ftype, flags) + payload


def jdump(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def jframe(ftype, obj):
    return frame(ftype, F_JSON, jdump(obj))


def binary_payload(room, data):
    name = room.encode("utf-8") if isinstance(room, str) else room
    return struct.pack(">H", len(name)) + name + data


def binary_publish(room, data):
    return frame(MESSAGE, F_BINARY, binary_payload(room, data))


def _reject_constant(name):
    raise ValueError("not JSON: %s" % name)


def strict_json(data):
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def server_clock_ms():
    """The server's clock, in the unit of a delivery's timestamp.

    The server under test stamps deliveries from its reactor's clock, so a
    stamp taken before a publish and one taken after its delivery bound the
    timestamp exactly, with no slack for a machine that is slow.
    """
    return reactor.seconds() * 1000


def assert_stamped_between(msg, before_ms, after_ms):
    stamp = msg["timestamp"]
    assert isinstance(stamp, int) and not isinstance(stamp, bool), msg
    # Milliseconds, truncated: a stamp may fall below ``before_ms`` by the
    # fraction of a millisecond that was dropped.
    assert int(before_ms) <= stamp <= after_ms, (before_ms, msg, after_ms)


def decode_binary_delivery(payload):
    (rlen,) = struct.unpack_from(">H", payload, 0)
    room = payload[2 : 2 + rlen].decode("utf-8")
    off = 2 + rlen
    (slen,) = struct.unpack_from(">H", payload, off)
    sender = payload[off + 2 : off + 2 + slen].decode("utf-8")
    data = payload[off + 2 + slen :]
    assert len(payload) >= off + 2 + slen, "short binary delivery"
    return room, sender, data


class Frame:
    def __init__(self, raw):
        self.raw = bytes(raw)
        self.length, self.version, self.type, self.flags = struct.unpack(
            ">IBBB", self.raw[:7]
        )
        self.payload = self.raw[7:]

    def json(self):
        assert self.flags == F_JSON, "expected JSON flag, got %r" % (self,)
        obj = strict_json(self.payload)
        assert isinstance(obj, dict), obj
        return obj

    def __repr__(self):
        return "<Frame v%d type %d flags %#x payload %r>" % (
            self.version,
            self.type,
            self.flags,
            self.payload[:200],
        )


# -- a blocking client --------------------------------------------------------


class Client:
    def __init__(self, port=None, sock=None):
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self._sync = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def recv_frame(self, max_length=MAX_FRAME + DELIVERY_SLACK):
        while len(self.buf) < 4:
            self._fill()
        (length,) = struct.unpack(">I", self.buf[:4])
        assert 3 <= length <= max_length, "server sent length %d" % length
        while len(self.buf) < 4 + length:
            self._fill()
        raw = self.buf[: 4 + length]
        del self.buf[: 4 + length]
        f = Frame(raw)
        assert f.version == 1, f
        assert 1 <= f.type <= 6, f
        return f

    def recv_json(self, ftype):
        f = self.recv_frame()
        assert f.type == ftype, "expected type %d, got %r" % (ftype, f)
        return f.json()

    def request(self, ftype, obj):
        self.send(jframe(ftype, obj))
        return self.recv_json(ftype)

    def hello(self, **fields):
        ack = self.request(HELLO, fields)
        assert ack.get("status") == "connected", ack
        return ack

    def join(self, room, **fields):
        fields["room"] = room
        ack = self.request(JOIN_ROOM, fields)
        assert ack.get("status") == "joined", ack
        return ack

    def leave(self, room, **fields):
        fields["room"] = room
        ack = self.request(LEAVE_ROOM, fields)
        assert ack.get("status") == "left", ack
        return ack

    def publish(self, room, content, **fields):
        fields["room"] = room
        fields["content"] = content
        self.send(jframe(MESSAGE, fields))

    def expect_error(self, code, fatal=False, id=_MISSING):
        f = self.recv_frame()
        assert f.type == ERROR, "expected ERROR %s, got %r" % (code, f)
        err = f.json()
        assert err.get("code") == code, err
        assert err.get("fatal") is fatal, err
        assert isinstance(err.get("message"), str), err
        if id is _MISSING:
            assert "id" not in err, err
        else:
            assert err.get("id") == id and type(err["id"]) is type(id), err
        return err

    def expect_eof(self):
        assert not self.buf, "unexpected bytes before EOF: %r" % bytes(self.buf)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not chunk:
                return
            raise AssertionError("expected EOF, got %r" % chunk[:200])

    def expect_fatal(self, code):
        err = self.expect_error(code, fatal=True)
        self.expect_eof()
        return err

    def sync(self):
        """
        Round-trip a HEARTBEAT and return every frame that arrived before its
        echo.  Replies are sent in order, so anything the server wrote to this
        connection before handling the heartbeat is in the list.
        """
        self._sync += 1
        token = b"sync-%d" % self._sync
        self.send(frame(HEARTBEAT, 0, token))
        before = []
        while True:
            f = self.recv_frame()
            if f.type == HEARTBEAT and f.payload == token:
                return before
            before.append(f)

    def assert_nothing_pending(self):
        before = self.sync()
        assert before == [], "unexpected frames: %r" % (before,)


# -- the server under test ------------------------------------------------------


class RelayCase(unittest.TestCase):
    timeout = 30
    config = {}

    def setUp(self):
        self.factory = RelayFactory(RelayConfig(**self.config), reactor=reactor)
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.listening.stopListening()
        if self.factory.connections:
            yield self.factory.wait_closed()

    def scenario(self, fn):
        """Run fn(connect) in a thread; every client it opens is closed after."""
        port = self.port

        def body():
            clients = []

            def connect():
                c = Client(port)
                clients.append(c)
                return c

            try:
                return fn(connect)
            finally:
                for c in clients:
                    c.close()

        return threads.deferToThread(body)


# -- frames: the documented examples --------------------------------------------


class DocumentExamplesTests(RelayCase):
    def test_encoder_matches_examples(self):
        self.assertEqual(frame(HEARTBEAT), bytes.fromhex("00000003010500"))
        self.assertEqual(
            jframe(JOIN_ROOM, {"room": "test"}),
            bytes.fromhex("00000012010201") + b'{"room":"test"}',
        )
        self.assertEqual(
            jframe(HELLO, {"userId": "alice", "id": 1}),
            bytes.fromhex("0000001c010101") + b'{"userId":"alice","id":1}',
        )
        self.assertEqual(
            jframe(MESSAGE, {"room": "test", "content": "hi"}),
            bytes.fromhex("00000021010401") + b'{"room":"test","content":"hi"}',
        )
        self.assertEqual(
            binary_publish("test", b"\x01\x02\x03"),
            bytes.fromhex("0000000c010402000474657374010203"),
        )

    def test_heartbeat_example_echoed_byte_for_byte(self):
        def run(connect):
            c = connect()
            c.send(bytes.fromhex("00000003010500"))
            assert c.recv_frame().raw == bytes.fromhex("00000003010500")

        return self.scenario(run)

    def test_join_example_and_ack_bytes(self):
        def run(connect):
            c = connect()
            c.send(bytes.fromhex("00000012010201") + b'{"room":"test"}')
            f = c.recv_frame()
            assert f.raw[:7] == bytes.fromhex("00000030010201"), f.raw
            assert f.json() == {"status": "joined", "room": "test", "members": 1}

        return self.scenario(run)

    def test_binary_example_both_ways(self):
        def run(connect):
            alice, member = connect(), connect()
            alice.hello(userId="alice")
            alice.join("test")
            member.join("test")
            alice.send(bytes.fromhex("0000000c010402000474657374010203"))
            f = member.recv_frame()
            assert f.raw == bytes.fromhex(
                "00000013010402" "000474657374" "0005616c696365" "010203"
            ), f.raw
            alice.assert_nothing_pending()

        return self.scenario(run)

    def test_whole_exchange_byte_by_byte(self):
        def run(connect):
            alice, bob = connect(), connect()
            alice.send(bytes.fromhex("0000001c010101") + b'{"userId":"alice","id":1}')
            ack = alice.recv_frame()
            assert ack.raw[4:7] == b"\x01\x01\x01"
            ack = ack.json()
            assert ack["status"] == "connected" and ack["userId"] == "alice"
            assert ack["serverVersion"] == "0.1.0"
            assert ack["heartbeatInterval"] == 30
            assert ack["maxFrameSize"] == MAX_FRAME
            assert ack["features"] == [] and ack["id"] == 1
            assert isinstance(ack["connectionId"], str) and ack["connectionId"]

            alice.send(bytes.fromhex("00000012010201") + b'{"room":"test"}')
            assert alice.recv_frame().raw == bytes.fromhex("00000030010201") + (
                b'{"status":"joined","room":"test","members":1}'
            )
            bob.send(bytes.fromhex("00000012010201") + b'{"room":"test"}')
            assert bob.recv_frame().raw == bytes.fromhex("00000030010201") + (
                b'{"status":"joined","room":"test","members":2}'
            )
            before = server_clock_ms()
            alice.send(bytes.fromhex("00000021010401") + b'{"room":"test","content":"hi"}')
            f = bob.recv_frame()
            after = server_clock_ms()
            assert f.raw[4:7] == b"\x01\x04\x01", f
            msg = f.json()
            assert msg["room"] == "test" and msg["from"] == "alice"
            assert msg["content"] == "hi" and msg["seq"] == 1
            assert_stamped_between(msg, before, after)

            bob.send(bytes.fromhex("00000003010500"))
            assert bob.recv_frame().raw == bytes.fromhex("00000003010500")
            # The reference shows 00 00 00 21 for this frame; the payload is
            # 34 bytes, so the length is 0x25.
            bob.send(bytes.fromhex("00000025010401") + b'{"room":"nope","content":1,"id":9}')
            f = bob.recv_frame()
            assert f.raw[4:7] == b"\x01\x06\x01", f
            err = f.json()
            assert err["code"] == "NOT_IN_ROOM" and err["fatal"] is False
            assert err["id"] == 9
            bob.send(bytes.fromhex("00000003020500"))
            f = bob.recv_frame()
            assert f.raw[4:7] == b"\x01\x06\x01", f
            err = f.json()
            assert err["code"] == "UNSUPPORTED_VERSION" and err["fatal"] is True
            assert "id" not in err
            bob.expect_eof()
            # bob has left room test.
            assert alice.join("test")["members"] == 1

        return self.scenario(run)


# -- HELLO ----------------------------------------------------------------------


class HelloTests(RelayCase):
    def test_ack_fields(self):
        def run(connect):
            c = connect()
            ack = c.hello(userId="alice", clientVersion="conformance/1.0", id=1)
            assert ack["status"] == "connected"
            assert isinstance(ack["connectionId"], str) and ack["connectionId"]
            assert ack["userId"] == "alice"
            assert isinstance(ack["serverVersion"], str) and ack["serverVersion"]
            assert ack["heartbeatInterval"] == 30  # half the default idle timeout
            assert ack["maxFrameSize"] == MAX_FRAME
            assert ack["features"] == []
            assert ack["id"] == 1

        return self.scenario(run)

    def test_compact_utf8_json(self):
        def run(connect):
            c = connect()
            c.send(jframe(HELLO, {"userId": "zoë☃"}))
            f = c.recv_frame()
            assert "zoë☃".encode("utf-8") in f.payload, f.payload
            assert b"\\u" not in f.payload, f.payload
            assert b", " not in f.payload and b": " not in f.payload, f.payload
            assert f.json()["userId"] == "zoë☃"

        return self.scenario(run)

    def test_anonymous_user_id(self):
        def run(connect):
            c = connect()
            ack = c.hello()
            assert ack["userId"] == "anon-" + ack["connectionId"], ack

        return self.scenario(run)

    def test_connection_ids_unique(self):
        def run(connect):
            ids = {connect().hello()["connectionId"] for _ in range(5)}
            assert len(ids) == 5, ids

        return self.scenario(run)

    def test_same_user_id_on_two_connections(self):
        def run(connect):
            a, b = connect(), connect()
            assert a.hello(userId="same")["userId"] == "same"
            assert b.hello(userId="same")["userId"] == "same"

        return self.scenario(run)

    def test_features_token_and_unknown_fields(self):
        def run(connect):
            c = connect()
            ack = c.hello(
                userId="u",
                token="anything",
                features=["x-future", "x-other"],
                echo=False,
                somethingNew={"a": 1},
                id="h",
            )
            assert ack["features"] == [] and ack["id"] == "h", ack

        return self.scenario(run)

    def test_hello_after_heartbeat(self):
        def run(connect):
            c = connect()
            c.send(frame(HEARTBEAT, 0, b"x"))
            assert c.recv_frame().payload == b"x"
            assert c.hello(userId="late")["userId"] == "late"

        return self.scenario(run)

    def test_repeated_hello_refused(self):
        def run(connect):
            c, peer = connect(), connect()
            c.hello(userId="first")
            c.send(jframe(HELLO, {"userId": "second", "echo": True, "id": 5}))
            c.expect_error("BAD_REQUEST", id=5)
            # Nothing changed: still "first", still no echo.
            c.join("r")
            peer.join("r")
            c.publish("r", 1)
            assert peer.recv_json(MESSAGE)["from"] == "first"
            c.assert_nothing_pending()

        return self.scenario(run)

    def test_hello_after_join_refused(self):
        def run(connect):
            c, peer = connect(), connect()
            c.join("r")
            c.send(jframe(HELLO, {"userId": "late", "echo": True, "id": "h"}))
            c.expect_error("BAD_REQUEST", id="h")
            peer.join("r")
            c.publish("r", 1)
            assert peer.recv_json(MESSAGE)["from"].startswith("anon-")
            c.assert_nothing_pending()

        return self.scenario(run)

    def test_hello_after_leave_or_message_refused(self):
        def run(connect):
            a = connect()
            a.leave("nowhere")
            a.send(jframe(HELLO, {"userId": "x", "id": 1}))
            a.expect_error("BAD_REQUEST", id=1)
            b = connect()
            b.send(jframe(MESSAGE, {"room": "nowhere", "content": 1, "id": 2}))
            b.expect_error("NOT_IN_ROOM", id=2)
            b.send(jframe(HELLO, {"userId": "x", "id": 3}))
            b.expect_error("BAD_REQUEST", id=3)

        return self.scenario(run)

    def test_user_id_limits(self):
        def run(connect):
            assert connect().hello(userId="u" * 128)["userId"] == "u" * 128
            assert connect().hello(userId="é" * 128)["userId"] == "é" * 128
            emoji = "\U0001f600"
            assert connect().hello(userId=emoji * 128)["userId"] == emoji * 128
            # Not trimmed, and white space is not a control character.
            assert connect().hello(userId=" a ")["userId"] == " a "
            for bad in ["", "u" * 129, emoji * 129, "a\x00b", "a\x1f", "\x7f", "a\u0085b", "\u009f"]:
                c = connect()
                c.send(jframe(HELLO, {"userId": bad, "id": 7}))
                c.expect_error("BAD_REQUEST", id=7)
                c.assert_nothing_pending()

        return self.scenario(run)

    def test_wrongly_typed_fields(self):
        def run(connect):
            for fields in [
                {"userId": 5},
                {"userId": ["a"]},
                {"clientVersion": 1},
                {"token": []},
                {"echo": "yes"},
                {"echo": 1},
                {"features": "x"},
                {"features": [1]},
            ]:
                c = connect()
                fields["id"] = "t"
                c.send(jframe(HELLO, fields))
                c.expect_error("BAD_REQUEST", id="t")
                c.assert_nothing_pending()

        return self.scenario(run)

    def test_null_user_id_refused(self):
        def run(connect):
            c = connect()
            c.send(jframe(HELLO, {"userId": None, "id": "t"}))
            c.expect_error("BAD_REQUEST", id="t")

        return self.scenario(run)


    def test_not_json_object_or_flag(self):
        def run(connect):
            for data in [
                frame(HELLO, 0),
                frame(HELLO, F_BINARY, b'{"userId":"x"}'),
                frame(HELLO, F_JSON, b'["userId"]'),
                frame(HELLO, F_JSON, b'"x"'),
                frame(HELLO, F_JSON, b"null"),
            ]:
                c = connect()
                c.send(data)
                c.expect_error("BAD_REQUEST")
                c.assert_nothing_pending()

        return self.scenario(run)


# -- ids ------------------------------------------------------------------------


class IdTests(RelayCase):
    def test_string_and_integer_ids_echoed(self):
        def run(connect):
            c = connect()
            assert c.hello(userId="a", id="hello-1")["id"] == "hello-1"
            ack = c.join("r", id=2)
            assert ack["id"] == 2 and type(ack["id"]) is int
            assert c.join("r", id="two")["id"] == "two"
            assert c.leave("r", id=-3)["id"] == -3
            assert c.leave("r", id="")["id"] == ""
            big = 2**70
            assert c.join("r", id=big)["id"] == big
            c.send(jframe(MESSAGE, {"room": "other", "content": 1, "id": "m"}))
            c.expect_error("NOT_IN_ROOM", id="m")
            c.send(jframe(MESSAGE, {"room": "other", "content": 1, "id": 0}))
            c.expect_error("NOT_IN_ROOM", id=0)

        return self.scenario(run)

    def test_null_id_is_no_id(self):
        def run(connect):
            c = connect()
            assert "id" not in c.hello(id=None)
            assert "id" not in c.join("r", id=None)
            assert "id" not in c.leave("r", id=None)
            c.send(jframe(MESSAGE, {"room": "x", "content": 1, "id": None}))
            c.expect_error("NOT_IN_ROOM")

        return self.scenario(run)

    def test_badly_typed_ids(self):
        def run(connect):
            c = connect()
            for bad in [1.5, 1.0, True, False, [1], {"a": 1}]:
                c.send(jframe(JOIN_ROOM, {"room": "r", "id": bad}))
                c.expect_error("BAD_REQUEST")
            # None of those joins happened.
            assert c.join("r")["members"] == 1
            other = connect()
            assert other.join("r")["members"] == 2
            for bad in [2.5, True, ["x"], {}]:
                c.send(jframe(LEAVE_ROOM, {"room": "r", "id": bad}))
                c.expect_error("BAD_REQUEST")
                c.send(jframe(MESSAGE, {"room": "r", "content": 1, "id": bad}))
                c.expect_error("BAD_REQUEST")
            other.assert_nothing_pending()
            assert c.join("r")["members"] == 2
            h = connect()
            h.send(jframe(HELLO, {"userId": "x", "id": 0.5}))
            h.expect_error("BAD_REQUEST")

        return self.scenario(run)


# -- rooms ----------------------------------------------------------------------


class RoomTests(RelayCase):
    def test_join_leave_members(self):
        def run(connect):
            a, b, c = connect(), connect(), connect()
            assert a.join("lobby", id=1) == {
                "status": "joined",
                "room": "lobby",
                "members": 1,
                "id": 1,
            }
            assert b.join("lobby")["members"] == 2
            assert c.join("lobby")["members"] == 3
            assert a.join("lobby")["members"] == 3  # rejoin: harmless, current count
            assert b.leave("lobby", id=3) == {"status": "left", "room": "lobby", "id": 3}
            assert b.leave("lobby") == {"status": "left", "room": "lobby"}  # idempotent
            assert b.join("lobby")["members"] == 3
            assert c.leave("never") == {"status": "left", "room": "never"}
            assert a.join("other")["members"] == 1

        return self.scenario(run)

    def test_last_leave_deletes_room_and_seq_restarts(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            for n in (1, 2, 3):
                a.publish("r", n)
                assert b.recv_json(MESSAGE)["seq"] == n
            a.leave("r")
            b.leave("r")
            assert a.join("r")["members"] == 1
            b.join("r")
            a.publish("r", "again")
            assert b.recv_json(MESSAGE)["seq"] == 1

        return self.scenario(run)

    def test_trimming(self):
        def run(connect):
            a, b, c = connect(), connect(), connect()
            assert a.join(" lobby ")["room"] == "lobby"
            ack = b.join("\t\r\n lobby\n")
            assert ack["room"] == "lobby" and ack["members"] == 2, ack
            assert c.join("lobby")["members"] == 3
            assert a.leave("  lobby")["room"] == "lobby"
            assert c.join("lobby")["members"] == 2
            a.join(" spaced name ")
            b.join("spaced name")
            a.publish("  spaced name\t", "x")
            msg = b.recv_json(MESSAGE)
            assert msg["room"] == "spaced name", msg

        return self.scenario(run)

    def test_name_length_in_code_points(self):
        def run(connect):
            c = connect()
            for name in ["x" * 64, "é" * 64, "\U0001f600" * 64, "a", "a\u00a0b"]:
                ack = c.join(name)
                assert ack["room"] == name, ack
            assert c.join(" " + "x" * 64 + " ")["room"] == "x" * 64
            for name in ["x" * 65, "é" * 65, "\U0001f600" * 65]:
                c.send(jframe(JOIN_ROOM, {"room": name, "id": 1}))
                c.expect_error("INVALID_ROOM", id=1)

        return self.scenario(run)

    def test_invalid_names(self):
        bad = ["", " ", "\t\n", "a\x00b", "a\x1fb", "a\x7fb", "a\x80b", "a\u0085b", "a\x9fb"]

        def run(connect):
            c = connect()
            for name in bad:
                for ftype in (JOIN_ROOM, LEAVE_ROOM):
                    c.send(jframe(ftype, {"room": name, "id": "n"}))
                    c.expect_error("INVALID_ROOM", id="n")
            c.join("ok")
            for name in bad:
                c.send(jframe(MESSAGE, {"room": name, "content": 1, "id": 4}))
                c.expect_error("INVALID_ROOM", id=4)
            # Not Cc, so allowed.
            for name in ["a\u00a0b", "a\u200bb", "a\u2028b"]:
                assert c.join(name)["room"] == name

        return self.scenario(run)

    def test_unicode_white_space_trimmed(self):
        def run(connect):
            c = connect()
            for name in ["\u3000lobby\u00a0", "\u2028lobby\u2029", "\x85lobby\x0b\x0c"]:
                assert c.join(name)["room"] == "lobby"
            # U+200B and U+FEFF are not white space.
            assert c.join("\u200blobby")["room"] == "\u200blobby"
            assert c.join("\ufefflobby")["room"] == "\ufefflobby"

        return self.scenario(run)

    def test_edge_control_characters_not_trimmed(self):
        def run(connect):
            c = connect()
            for name in ["lobby\x1f", "\x1clobby", "\x1dlobby\x1e"]:
                c.send(jframe(JOIN_ROOM, {"room": name, "id": 1}))
                c.expect_error("INVALID_ROOM", id=1)

        return self.scenario(run)


    def test_names_exact_and_case_sensitive(self):
        def run(connect):
            a, b, c, d = connect(), connect(), connect(), connect()
            assert a.join("Lobby")["members"] == 1
            assert b.join("lobby")["members"] == 1
            nfc = unicodedata.normalize("NFC", "café")
            nfd = unicodedata.normalize("NFD", "café")
            assert nfc != nfd
            assert c.join(nfc)["members"] == 1
            ack = d.join(nfd)
            assert ack["members"] == 1 and ack["room"] == nfd, ack

        return self.scenario(run)

    def test_bad_room_fields(self):
        def run(connect):
            c = connect()
            for ftype in (JOIN_ROOM, LEAVE_ROOM):
                for fields in [{}, {"room": 5}, {"room": None}, {"room": ["a"]}]:
                    fields["id"] = 8
                    c.send(jframe(ftype, fields))
                    c.expect_error("BAD_REQUEST", id=8)
                for data in [b"[]", b'"lobby"', b"1"]:
                    c.send(frame(ftype, F_JSON, data))
                    c.expect_error("BAD_REQUEST")
                c.send(frame(ftype, 0))
                c.expect_error("BAD_REQUEST")
                c.send(frame(ftype, F_BINARY, b'{"room":"a"}'))
                c.expect_error("BAD_REQUEST")
            c.assert_nothing_pending()
            assert c.join("a")["members"] == 1

        return self.scenario(run)

    def test_max_rooms(self):
        def run(connect):
            c = connect()
            c.send(b"".join(jframe(JOIN_ROOM, {"room": "r%d" % i}) for i in range(MAX_ROOMS)))
            for i in range(MAX_ROOMS):
                assert c.recv_json(JOIN_ROOM)["room"] == "r%d" % i
            c.send(jframe(JOIN_ROOM, {"room": "one-more", "id": "x"}))
            c.expect_error("BAD_REQUEST", id="x")
            # Rejoining a room it is in is still harmless.
            assert c.join("r0")["members"] == 1
            c.leave("r1")
            assert c.join("one-more")["members"] == 1
            other = connect()
            assert other.join("one-more")["members"] == 2

        return self.scenario(run)

    def test_membership_removed_on_close(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            assert b.join("r")["members"] == 2
            b.sock.shutdown(socket.SHUT_WR)
            b.expect_eof()
            # The server removes the membership when it sees the close.
            deadline = time.monotonic() + TIMEOUT
            while a.join("r")["members"] != 1:
                assert time.monotonic() < deadline, "membership not removed"

        return self.scenario(run)


# -- MESSAGE --------------------------------------------------------------------


class MessageTests(RelayCase):
    def test_fanout_excludes_sender(self):
        def run(connect):
            a, b, c, outsider = connect(), connect(), connect(), connect()
            a.hello(userId="alice")
            for x in (a, b, c):
                x.join("room")
            outsider.join("elsewhere")
            before = server_clock_ms()
            a.publish("room", {"text": "hi"})
            a.assert_nothing_pending()  # no ack, no echo
            # The echo of the sync came after the server stamped the message.
            after = server_clock_ms()
            for x in (b, c):
                msg = x.recv_json(MESSAGE)
                assert msg["room"] == "room" and msg["from"] == "alice", msg
                assert msg["content"] == {"text": "hi"} and msg["seq"] == 1, msg
                assert_stamped_between(msg, before, after)
                assert "id" not in msg
            outsider.assert_nothing_pending()

        return self.scenario(run)

    def test_id_not_relayed_and_no_ack(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            a.publish("r", "x", id=77)
            a.assert_nothing_pending()
            assert "id" not in b.recv_json(MESSAGE)

        return self.scenario(run)

    def test_echo(self):
        def run(connect):
            a, b = connect(), connect()
            a.hello(userId="alice", echo=True)
            a.join("r")
            b.join("r")
            a.publish("r", 1)
            a.send(binary_publish("r", b"\x00\xff"))
            mine = a.recv_json(MESSAGE)
            assert mine["from"] == "alice" and mine["seq"] == 1
            f = a.recv_frame()
            assert f.type == MESSAGE and f.flags == F_BINARY
            assert decode_binary_delivery(f.payload) == ("r", "alice", b"\x00\xff")
            assert b.recv_json(MESSAGE)["seq"] == 1
            assert decode_binary_delivery(b.recv_frame().payload)[2] == b"\x00\xff"
            # echo false is the default, and explicit.
            c = connect()
            c.hello(userId="c", echo=False)
            c.join("r")
            c.publish("r", 2)
            c.assert_nothing_pending()
            assert a.recv_json(MESSAGE)["seq"] == 3

        return self.scenario(run)

    def test_anonymous_from(self):
        def run(connect):
            a, b, c = connect(), connect(), connect()
            cid = a.hello()["connectionId"]
            a.join("r")
            b.join("r")
            c.join("r")
            a.publish("r", 1)
            assert b.recv_json(MESSAGE)["from"] == "anon-" + cid
            assert c.recv_json(MESSAGE)["from"] == "anon-" + cid
            b.publish("r", 2)
            msg = c.recv_json(MESSAGE)
            assert msg["from"].startswith("anon-") and msg["from"] != "anon-" + cid

        return self.scenario(run)

    def test_seq_counts_every_publish(self):
        def run(connect):
            a, b, c = connect(), connect(), connect()
            a_id = a.hello()["userId"]
            for x in (a, b, c):
                x.join("r")
            got = {a: [], b: [], c: []}
            # Each sender syncs so that the publishes are handled in this order.
            for sender, data in [
                (a, jframe(MESSAGE, {"room": "r", "content": "a1"})),  # seq 1
                (b, jframe(MESSAGE, {"room": "r", "content": "b1"})),  # seq 2
                (a, binary_publish("r", b"bin")),  # seq 3
                (c, jframe(MESSAGE, {"room": "r", "content": "c1"})),  # seq 4
            ]:
                sender.send(data)
                got[sender] += sender.sync()
            for x in (a, b, c):
                got[x] += x.sync()

            def summary(frames):
                return [
                    f.json()["seq"] if f.flags == F_JSON else decode_binary_delivery(f.payload)
                    for f in frames
                ]

            assert summary(got[a]) == [2, 4], summary(got[a])
            assert summary(got[b]) == [1, ("r", a_id, b"bin"), 4], summary(got[b])
            assert summary(got[c]) == [1, 2, ("r", a_id, b"bin")], summary(got[c])

        return self.scenario(run)

    def test_content_values_relayed(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            big = 2**100
            for value in [None, 0, -1, big, -big, True, "", [], {}, {"a": [1, {"b": None}]}, 1.5]:
                a.publish("r", value)
                msg = b.recv_json(MESSAGE)
                assert msg["content"] == value and type(msg["content"]) is type(value), msg
            a.publish("r", big)
            assert str(big).encode() in b.recv_frame().payload
            a.send(frame(MESSAGE, F_JSON, b'{"room":"r","content":1e5}'))
            assert b'"content":100000.0' in b.recv_frame().payload
            a.send(frame(MESSAGE, F_JSON, b'{ "room" : "r" , "content" : { "a" : [ 1 , 2 ] } }'))
            assert b'"content":{"a":[1,2]}' in b.recv_frame().payload
            a.send(frame(MESSAGE, F_JSON, b'{"room":"r","content":"\\u00e9\\u2603\\ud83d\\ude00"}'))
            f = b.recv_frame()
            assert '"content":"é☃\U0001f600"'.encode("utf-8") in f.payload, f.payload

        return self.scenario(run)

    def test_not_in_room(self):
        def run(connect):
            a, b = connect(), connect()
            b.join("exists")
            a.send(jframe(MESSAGE, {"room": "missing", "content": 1, "id": 1}))
            a.expect_error("NOT_IN_ROOM", id=1)
            a.send(jframe(MESSAGE, {"room": "exists", "content": 1, "id": "2"}))
            a.expect_error("NOT_IN_ROOM", id="2")
            a.join("exists")
            a.leave("exists")
            a.send(jframe(MESSAGE, {"room": "exists", "content": 1}))
            a.expect_error("NOT_IN_ROOM")
            a.send(binary_publish("exists", b"x"))
            a.expect_error("NOT_IN_ROOM")
            b.assert_nothing_pending()
            a.join("exists")
            a.publish("exists", "now")
            assert b.recv_json(MESSAGE)["content"] == "now"

        return self.scenario(run)

    def test_deeply_nested_content(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            depth = 1000  # the whole payload nests 1001 deep
            content = b"[" * depth + b"]" * depth
            a.send(frame(MESSAGE, F_JSON, b'{"room":"r","content":' + content + b',"id":1}'))
            # Either relayed, or refused with an ERROR; never a silent close.
            before = a.sync()
            if before:
                assert before[0].type == ERROR, before
            else:
                assert b.recv_frame().payload.count(b"[") == depth

        return self.scenario(run)


    def test_integers_beyond_64_bits_relayed_exactly(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            for text in [b"-9223372036854775809", b"-9999999999999999999", b"18446744073709551616"]:
                a.send(frame(MESSAGE, F_JSON, b'{"room":"r","content":' + text + b"}"))
                f = b.recv_frame()
                assert b'"content":' + text + b"," in f.payload, f.payload

        return self.scenario(run)


    def test_json_checks_do_not_depend_on_other_fields(self):
        # A run of 20 digits elsewhere in the payload must not change how
        # the rest of it is parsed.
        digits = b',"x":"12345678901234567890"'
        cases = [
            b'{"room":"r","content":1e400' + digits + b"}",
            b'{"room":"r","content":[1e400,123456789012345678901234]}',
            b'{"room":"r","content":"\\ud800"' + digits + b"}",
            b'{"room":"r","content":' + b"[" * 1500 + b"]" * 1500 + digits + b"}",
        ]

        def run(connect):
            failures = []
            for body in cases:
                a, b = connect(), connect()
                a.join("r")
                b.join("r")
                a.send(frame(MESSAGE, F_JSON, body))
                try:
                    a.expect_fatal("PARSE_ERROR")
                    b.assert_nothing_pending()
                except (AssertionError, EOFError, OSError) as e:
                    failures.append("%r: %s" % (body[:60], e))
            assert not failures, "\n".join(failures)

        return self.scenario(run)


    def test_refused_publish_takes_no_seq(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            a.publish("r", 1)
            assert b.recv_json(MESSAGE)["seq"] == 1
            growing = b"[" + b",".join([b"1e9"] * 200) + b"]"
            head = b'{"id":"big","room":"r","content":[' + growing + b',"'
            tail = b'"]}'
            pad = MAX_FRAME - 3 - len(head) - len(tail)
            a.send(frame(MESSAGE, F_JSON, head + b"x" * pad + tail))
            a.expect_error("BAD_REQUEST", id="big")
            a.publish("r", 2)
            assert b.recv_json(MESSAGE)["seq"] == 2

        return self.scenario(run)


    def test_bad_message_requests(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            for fields in [
                {"room": "r"},
                {"content": 1},
                {"room": 1, "content": 1},
                {"room": None, "content": 1},
            ]:
                fields["id"] = 3
                a.send(jframe(MESSAGE, fields))
                a.expect_error("BAD_REQUEST", id=3)
            for data in [b"[]", b"1", b'"r"']:
                a.send(frame(MESSAGE, F_JSON, data))
                a.expect_error("BAD_REQUEST")
            a.send(frame(MESSAGE, 0))
            a.expect_error("BAD_REQUEST")
            b.assert_nothing_pending()
            a.publish("r", None)
            assert b.recv_json(MESSAGE)["content"] is None

        return self.scenario(run)

    def test_delivery_may_exceed_max_frame(self):
        def run(connect):
            a, b = connect(), connect()
            a.hello(userId="u" * 128)
            a.join("r")
            b.join("r")
            head = b'{"room":"r","content":"'
            tail = b'"}'
            pad = MAX_FRAME - 3 - len(head) - len(tail)
            req = frame(MESSAGE, F_JSON, head + b"x" * pad + tail)
            assert len(req) == 4 + MAX_FRAME
            a.send(req)
            a.assert_nothing_pending()
            f = b.recv_frame()
            assert MAX_FRAME < f.length <= MAX_FRAME + DELIVERY_SLACK, f.length
            msg = f.json()
            assert msg["content"] == "x" * pad and msg["from"] == "u" * 128

        return self.scenario(run)

    def test_delivery_too_large_refused(self):
        def run(connect):
            a, b = connect(), connect()
            a.join("r")
            b.join("r")
            # Each 1e9 grows from 3 to 12 bytes when re-serialised.
            growing = b"[" + b",".join([b"1e9"] * 200) + b"]"
            head = b'{"id":"big","room":"r","content":[' + growing + b',"'
            tail = b'"]}'
            pad = MAX_FRAME - 3 - len(head) - len(tail)
            a.send(frame(MESSAGE, F_JSON, head + b"x" * pad + tail))
            a.expect_error("BAD_REQUEST", id="big")
            b.assert_nothing_pending()
            a.publish("r", "small")
            assert b.recv_json(MESSAGE)["seq"] >= 1

        return self.scenario(run)


class BinaryMessageTests(RelayCase):
    def test_layout_both_ways(self):
        def run(connect):
            a, b, j = connect(), connect(), connect()
            a.hello(userId="zoë")
            a.join("sälle")
            b.join("sälle")
            j.join("sälle")
            data = bytes(range(256))
            a.send(binary_publish("sälle", data))
            for x in (b, j):
                f = x.recv_frame()
                assert f.type == MESSAGE and f.flags == F_BINARY, f
                room = "sälle".encode()
                sender = "zoë".encode()
                assert f.payload == (
                    struct.pack(">H", len(room)) + room + struct.pack(">H", len(sender)) + sender + data
                ), f.payload
            a.send(binary_publish("sälle", b""))
            assert decode_binary_delivery(b.recv_frame().payload) == ("sälle", "zoë", b"")

        return self.scenario(run)

    def test_anonymous_sender_and_trimmed_room(self):
        def run(connect):
            a, b = connect(), connect()
            cid = a.hello()["connectionId"]
            a.join("r")
            b.join("r")
            a.send(binary_publish(" r\t", b"z"))
            assert decode_binary_delivery(b.recv_frame().payload) == ("r", "anon-" + cid, b"z")

        return self.scenario(run)

    def test_invalid_room_has_no_id(self):
        def run(connect):
            a = connect()
            a.join("r")
            for name in ["", "  ", "a\x00", "x" * 65]:
                a.send(binary_publish(name, b"data"))
                a.expect_error("INVALID_ROOM")
            a.assert_nothing_pending()

        return self.scenario(run)


# -- HEARTBEAT ------------------------------------------------------------------


class HeartbeatTests(RelayCase):
    def test_echo_with_payload_and_flags(self):
        def run(connect):
            c = connect()
            for flags, payload in [
                (0, b""),
                (0, b"counter-1"),
                (F_BINARY, b"\x00\x01\xff"),
                (F_BINARY, b""),
                (F_JSON, b'{"t":1795305813683}'),
                (F_JSON, b"opaque, not JSON"),
                (F_JSON, b""),
            ]:
                c.send(frame(HEARTBEAT, flags, payload))
                f = c.recv_frame()
                assert (f.type, f.flags, f.payload) == (HEARTBEAT, flags, payload), f
            c.send(frame(HEARTBEAT, 0, b"x" * 100000))
            assert c.recv_frame().payload == b"x" * 100000
            # HEARTBEAT needs no HELLO and does not count as a request.
            c.hello(userId="after-heartbeats")

        return self.scenario(run)

    def test_largest_frame_accepted(self):
        def run(connect):
            c = connect()
            payload = bytes(range(256)) * ((MAX_FRAME - 3) // 256) + b"\x00" * ((MAX_FRAME - 3) % 256)
            c.send(frame(HEARTBEAT, F_BINARY, payload))
            f = c.recv_frame()
            assert f.length == MAX_FRAME and f.payload == payload

        return self.scenario(run)


# -- fatal errors ---------------------------------------------------------------

TRAILER = frame(HEARTBEAT, 0, b"after") + jframe(JOIN_ROOM, {"room": "after", "id": 1})

FATAL_CASES = [
    # length < 3
    ("INVALID_FRAME", struct.pack(">I", 0)),
    ("INVALID_FRAME", struct.pack(">I", 1) + b"\x01"),
    ("INVALID_FRAME", struct.pack(">I", 2) + b"\x01\x05"),
    # flags
    ("INVALID_FRAME", frame(HEARTBEAT, 0x08)),
    ("INVALID_FRAME", frame(HEARTBEAT, 0x10)),
    ("INVALID_FRAME", frame(JOIN_ROOM, 0x80 | F_JSON, b'{"room":"a"}')),
    ("INVALID_FRAME", frame(HEARTBEAT, F_JSON | F_BINARY)),
    ("INVALID_FRAME", frame(HEARTBEAT, F_COMPRESSED)),
    ("INVALID_FRAME", frame(MESSAGE, F_COMPRESSED | F_JSON, b"x\x9c")),
    # bad binary MESSAGE layout
    ("INVALID_FRAME", frame(MESSAGE, F_BINARY, b"\x00")),
    ("INVALID_FRAME", frame(MESSAGE, F_BINARY, b"\x00\x05abc")),
    ("INVALID_FRAME", frame(MESSAGE, F_BINARY, b"\x00\x02\xc3\x28data")),
    ("INVALID_FRAME", frame(MESSAGE, F_BINARY, b"\x00\x03\xed\xa0\x80")),
    # size, from the header
    ("FRAME_TOO_LARGE", struct.pack(">I", MAX_FRAME + 1)),
    ("FRAME_TOO_LARGE", struct.pack(">I", 0xFFFFFFFF)),
    # version
    ("UNSUPPORTED_VERSION", frame(HEARTBEAT, version=0)),
    ("UNSUPPORTED_VERSION", frame(HEARTBEAT, version=2)),
    ("UNSUPPORTED_VERSION", frame(HEARTBEAT, version=255)),
    # type
    ("UNKNOWN_MESSAGE_TYPE", frame(0x00)),
    ("UNKNOWN_MESSAGE_TYPE", frame(0x07)),
    ("UNKNOWN_MESSAGE_TYPE", frame(0xFF, F_JSON, b"{}")),
    # JSON
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b'{"room":')),
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b"")),
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b'{"room":"a"} trailing')),
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b"{'room':'a'}")),
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b'{"room":"\xc3"}')),
    ("PARSE_ERROR", frame(JOIN_ROOM, F_JSON, b'{"room":"\xed\xa0\x80"}')),
    ("PARSE_ERROR", frame(HELLO, F_JSON, b'{"userId":"\\ud800"}')),
    ("PARSE_ERROR", frame(MESSAGE, F_JSON, b'{"room":"r","content":"\\udc00"}')),
    ("PARSE_ERROR", frame(MESSAGE, F_JSON, b'{"room":"r","content":NaN}')),
    ("PARSE_ERROR", frame(MESSAGE, F_JSON, b'{"room":"r","content":Infinity}')),
    ("PARSE_ERROR", frame(MESSAGE, F_JSON, b'{"room":"r","content":-Infinity}')),
    ("PARSE_ERROR", frame(LEAVE_ROOM, F_JSON, b"\xff\xfe{}")),
]

# Precedence of the header checks.
PRECEDENCE_CASES = [
    ("INVALID_FRAME", struct.pack(">IBBB", 2, 2, 0x09, 0xFF)),
    ("FRAME_TOO_LARGE", struct.pack(">IBBB", MAX_FRAME + 1, 2, 0x09, 0xFF)),
    ("UNSUPPORTED_VERSION", struct.pack(">IBBB", 3, 2, 0x09, 0xFF)),
    ("UNKNOWN_MESSAGE_TYPE", struct.pack(">IBBB", 3, 1, 0x09, 0xFF)),
]


class FatalErrorTests(RelayCase):
    def _check_each(self, cases, trailer=TRAILER):
        def run(connect):
            failures = []
            for code, data in cases:
                c = connect()
                c.send(data + trailer)
                try:
                    c.expect_fatal(code)
                except (AssertionError, EOFError, OSError) as e:
                    failures.append("%s %r: %s" % (code, data[:40], e))
                c.close()
            assert not failures, "\n".join(failures)

        return self.scenario(run)

    def test_fatal_errors_and_nothing_parsed_after(self):
        return self._check_each(FATAL_CASES)

    def test_header_check_precedence(self):
        return self._check_each(PRECEDENCE_CASES)

    def test_decided_from_header_before_payload(self):
        # Only the header is sent; the payload never arrives.
        cases = [
            ("FRAME_TOO_LARGE", struct.pack(">I", MAX_FRAME + 1)),
            ("FRAME_TOO_LARGE", struct.pack(">IBB", 0x7FFFFFFF, 1, HEARTBEAT)),
            ("UNSUPPORTED_VERSION", struct.pack(">IBBB", 100, 2, HEARTBEAT, 0)),
            ("UNKNOWN_MESSAGE_TYPE", struct.pack(">IBBB", 100, 1, 0x07, 0)),
            ("INVALID_FRAME", struct.pack(">IBBB", 100, 1, HEARTBEAT, 0x08)),
            ("INVALID_FRAME", struct.pack(">IBBB", 100, 1, MESSAGE, F_COMPRESSED)),
            ("INVALID_FRAME", struct.pack(">IBBB", 100, 1, MESSAGE, F_JSON | F_BINARY)),
        ]
        return self._check_each(cases, trailer=b"")

    def test_replies_before_the_violation_are_sent(self):
        def run(connect):
            a, b = connect(), connect()
            b.join("r")
            a.send(
                jframe(JOIN_ROOM, {"room": "r", "id": 1})
                + frame(HEARTBEAT, 0, b"hb")
                + jframe(MESSAGE, {"room": "r", "content": "before"})
                + frame(HEARTBEAT, version=2)
                + jframe(MESSAGE, {"room": "r", "content": "after"})
                + frame(HEARTBEAT, 0, b"after")
            )
            ack = a.recv_json(JOIN_ROOM)
            assert ack["members"] == 2 and ack["id"] == 1
            assert a.recv_frame().payload == b"hb"
            a.expect_fatal("UNSUPPORTED_VERSION")
            assert b.recv_json(MESSAGE)["content"] == "before"
            b.assert_nothing_pending()

        return self.scenario(run)

    def test_client_error_frame_ignored(self):
        def run(connect):
            c = connect()
            c.send(jframe(ERROR, {"code": "BAD_REQUEST", "message": "x", "fatal": True}))
            c.send(frame(ERROR, 0))
            c.assert_nothing_pending()
            c.hello(userId="still-first")

        return self.scenario(run)


# -- stream handling ------------------------------------------------------------


class StreamTests(RelayCase):
    def test_frame_split_into_single_bytes(self):
        def run(connect):
            c = connect()
            data = jframe(HELLO, {"userId": "slow", "id": 1}) + jframe(JOIN_ROOM, {"room": "r"})
            for i in range(len(data)):
                c.send(data[i : i + 1])
            assert c.recv_json(HELLO)["userId"] == "slow"
            assert c.recv_json(JOIN_ROOM)["room"] == "r"

        return self.scenario(run)

    def test_several_frames_in_one_send(self):
        def run(connect):
            c = connect()
            c.send(
                jframe(HELLO, {"userId": "batch", "id": 0})
                + jframe(JOIN_ROOM, {"room": "a", "id": 1})
                + jframe(JOIN_ROOM, {"room": "", "id": 2})
                + frame(HEARTBEAT, 0, b"3")
                + jframe(MESSAGE, {"room": "zzz", "content": 1, "id": 4})
                + jframe(JOIN_ROOM, {"room": "b", "id": 5})
                + jframe(LEAVE_ROOM, {"room": "a", "id": 6})
                + jframe(MESSAGE, {"room": "b", "content": 1, "id": 7})
                + frame(HEARTBEAT, 0, b"8")
            )
            assert c.recv_json(HELLO)["id"] == 0
            assert c.recv_json(JOIN_ROOM)["id"] == 1
            c.expect_error("INVALID_ROOM", id=2)
            assert c.recv_frame().payload == b"3"
            c.expect_error("NOT_IN_ROOM", id=4)
            assert c.recv_json(JOIN_ROOM)["id"] == 5
            assert c.recv_json(LEAVE_ROOM)["id"] == 6
            assert c.recv_frame().payload == b"8"

        return self.scenario(run)

    def test_split_header_and_coalesced_tail(self):
        def run(connect):
            c = connect()
            data = frame(HEARTBEAT, 0, b"one") + frame(HEARTBEAT, F_BINARY, b"two") + frame(HEARTBEAT)
            for piece in (data[:2], data[2:5], data[5:12], data[12:]):
                c.send(piece)
            assert c.recv_frame().payload == b"one"
            assert c.recv_frame().payload == b"two"
            assert c.recv_frame().raw == frame(HEARTBEAT)

        return self.scenario(run)


# -- limits and operational errors, with a configured server ------------------


class IdleTimeoutTests(RelayCase):
    config = {"idle_timeout": 1}

    def test_heartbeat_interval_and_timeout(self):
        def run(connect):
            c = connect()
            before = server_clock_ms()
            ack = c.hello(userId="quiet")
            assert ack["heartbeatInterval"] == 1, ack  # half of 1, at least 1
            # Silence: the server gives up after the idle timeout, not before.
            c.expect_fatal("HEARTBEAT_TIMEOUT")
            waited = server_clock_ms() - before
            assert waited >= 1000, "timed out after %.0f ms of silence" % waited

        return self.scenario(run)


class ConnectionLimitTests(RelayCase):
    config = {"max_connections": 2}

    def test_too_many_connections(self):
        def run(connect):
            a, b = connect(), connect()
            a.assert_nothing_pending()
            b.assert_nothing_pending()
            c = connect()
            c.expect_fatal("TOO_MANY_CONNECTIONS")
            a.assert_nothing_pending()

        return self.scenario(run)


class SmallLimitsTests(RelayCase):
    config = {"max_frame_size": 1024, "max_rooms": 3}

    def test_max_frame_size_advertised_and_enforced(self):
        def run(connect):
            c = connect()
            assert c.hello()["maxFrameSize"] == 1024
            c.send(frame(HEARTBEAT, 0, b"x" * (1024 - 3)))
            assert c.recv_frame().length == 1024
            c.send(struct.pack(">IBBB", 1025, 1, HEARTBEAT, 0))
            c.expect_fatal("FRAME_TOO_LARGE")

        return self.scenario(run)

    def test_delivery_slack(self):
        def run(connect):
            a, b = connect(), connect()
            a.hello(userId="u" * 128)
            a.join("r")
            b.join("r")
            head = b'{"room":"r","content":"'
            tail = b'"}'
            a.send(frame(MESSAGE, F_JSON, head + b"x" * (1024 - 3 - len(head) - len(tail)) + tail))
            f = b.recv_frame(max_length=1024 + DELIVERY_SLACK)
            assert 1024 < f.length <= 1024 + DELIVERY_SLACK, f.length
            a.send(binary_publish("r", b"z" * (1024 - 3 - 2 - 1)))
            f = b.recv_frame(max_length=1024 + DELIVERY_SLACK)
            assert 1024 < f.length <= 1024 + DELIVERY_SLACK, f.length
            assert decode_binary_delivery(f.payload)[1] == "u" * 128
            # 150 numbers that grow from 3 to 12 bytes when re-serialised.
            growing = b"[" + b",".join([b"1e9"] * 150) + b"]"
            a.send(frame(MESSAGE, F_JSON, b'{"room":"r","id":"g","content":' + growing + b"}"))
            a.expect_error("BAD_REQUEST", id="g")
            b.assert_nothing_pending()

        return self.scenario(run)

    def test_max_rooms(self):
        def run(connect):
            c = connect()
            for r in "abc":
                c.join(r)
            c.send(jframe(JOIN_ROOM, {"room": "d", "id": 1}))
            c.expect_error("BAD_REQUEST", id=1)
            assert c.join(" a ")["members"] == 1
            c.leave("b")
            assert c.join("d")["members"] == 1

        return self.scenario(run)


class SlowConsumerTests(RelayCase):
    config = {"max_pending": 65536, "max_frame_size": 65536}

    def test_slow_consumer_cut_off_others_unaffected(self):
        port = self.port

        def run(connect):
            slow = socket.socket()
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.settimeout(TIMEOUT)
            slow.connect(("127.0.0.1", port))
            try:
                slow.sendall(jframe(JOIN_ROOM, {"room": "r"}))
                pub, reader = connect(), connect()
                pub.join("r")
                assert reader.join("r")["members"] == 3
                data = b"p" * 8000
                n = 0
                # Publish, one at a time, until the slow member is gone:
                # within 32 MB, more than any kernel buffers and the
                # server's queue hold, however slow the machine.
                while True:
                    assert n < 4096, "slow consumer not cut off after %d bytes" % (n * len(data))
                    pub.send(binary_publish("r", struct.pack(">I", n) + data))
                    pub.assert_nothing_pending()
                    f = reader.recv_frame()
                    assert decode_binary_delivery(f.payload)[2][:4] == struct.pack(">I", n)
                    n += 1
                    if n % 16 == 0 and reader.join("r")["members"] == 2:
                        break
                assert n * len(data) > 65536
                # The slow member gets what was written before the cut, then
                # (best effort) SLOW_CONSUMER, then the connection ends.
                got = Client(sock=slow)
                frames = []
                try:
                    while True:
                        frames.append(got.recv_frame())
                except (EOFError, ConnectionResetError):
                    pass
                assert frames and frames[0].type == JOIN_ROOM, frames[:1]
                seen = [
                    decode_binary_delivery(f.payload)[2][:4]
                    for f in frames[1:]
                    if f.type == MESSAGE
                ]
                assert seen == [struct.pack(">I", i) for i in range(len(seen))]
                for f in frames[1 + len(seen) :]:
                    assert f.type == ERROR and f.json()["code"] == "SLOW_CONSUMER", f
            finally:
                slow.close()

        return self.scenario(run)
