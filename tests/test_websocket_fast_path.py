"""The server's WebSocket write path: Relay frames framed as messages by Relay itself.

Every test goes through twisted.web's HTTP channel and autobahn's real
upgrade, over a stream that records each write, and reads what the server
wrote with an independent client (the ``websockets`` sans-IO protocol).
"""

from __future__ import annotations

from typing import Any

from autobahn.exception import PayloadExceededError
from autobahn.twisted.resource import WebSocketResource
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.uri import parse_uri

from relay import wsmapping
from relay.server import websocket
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.fanout import Fanout
from relay.wire import Decoder, Flags, MessageType, encode, encode_binary_message, encode_json, loads


class RecordingStream(StringTransport):
    """The socket under the WebSocket: keeps every write as it was given."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Client:
    """One client through the real upgrade, reading with ``websockets``."""

    def __init__(self, site: Any, extensions: list[Any] | None = None) -> None:
        self.stream = RecordingStream()
        channel = site.buildProtocol(self.stream.getPeer())
        self.stream.protocol = channel  # the upgrade replaces it, as on a socket
        channel.makeConnection(self.stream)
        self.peer = ClientProtocol(
            parse_uri("ws://127.0.0.1/relay"),
            subprotocols=[wsmapping.SUBPROTOCOL],
            extensions=extensions,
        )
        self.peer.send_request(self.peer.connect())
        self.send_pending()
        [response] = self.events()
        assert response.status_code == 101, response
        self.websocket = self.stream.protocol
        self.relay = self.websocket.relay
        self.stream.writes.clear()

    def send(self, data: bytes) -> None:
        self.peer.send_binary(data)
        self.send_pending()

    def send_pending(self) -> None:
        for data in self.peer.data_to_send():
            if data:
                self.stream.protocol.dataReceived(data)

    def send_in_one_read(self, *messages: bytes | str, close: bool = False) -> None:
        """Each of ``messages`` a WebSocket message (text for a str, then a
        close frame), all arriving in one read of the socket."""
        for message in messages:
            if isinstance(message, str):
                self.peer.send_text(message.encode())
            else:
                self.peer.send_binary(message)
        if close:
            self.peer.send_close()
        self.stream.protocol.dataReceived(b"".join(self.peer.data_to_send()))

    def events(self) -> list[Any]:
        self.peer.receive_data(self.stream.value())
        self.stream.clear()
        return self.peer.events_received()

    def messages(self) -> list[bytes]:
        """The binary messages received since the last call; each must be one frame."""
        payloads = []
        for frame in self.events():
            if frame.opcode is Opcode.BINARY:
                frames = list(Decoder().feed(frame.data))
                assert len(frames) == 1 and encode(*frames[0]) == frame.data, frame
                payloads.append(frame.data)
        return payloads

    def lose(self) -> None:
        self.websocket.connectionLost(Failure(error.ConnectionDone()))


def contents(messages: list[bytes]) -> list[Any]:
    return [loads(next(Decoder().feed(message)).payload).get("content") for message in messages]


def publish(room: str, *contents: Any) -> bytes:
    return b"".join(encode_json(MessageType.MESSAGE, {"room": room, "content": c}) for c in contents)


class FastPathTestCase(unittest.TestCase):
    config: dict[str, Any] = {}
    client_options: dict[str, Any] = {}

    # autobahn options for this case's server, on top of Relay's own.
    protocol_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.factory = RelayFactory(RelayConfig(**self.config), reactor=task.Clock())
        if not self.protocol_options:
            self.site = websocket.make_site(self.factory)
            return
        ws_factory = websocket.RelayWebSocketFactory(self.factory)
        ws_factory.setProtocolOptions(**self.protocol_options)
        root = Resource()
        root.putChild(b"relay", WebSocketResource(ws_factory))
        self.site = websocket.RelaySite(root, reactor=self.factory.reactor)

    def joined(self, user: str, room: str = "lobby", **hello: Any) -> Client:
        client = Client(self.site, **self.client_options)
        self.addCleanup(client.lose)
        client.send(
            encode_json(MessageType.HELLO, {"userId": user, **hello})
            + encode_json(MessageType.JOIN_ROOM, {"room": room})
        )
        client.messages()
        client.stream.writes.clear()
        return client


class SharedFramingTests(FastPathTestCase):
    def test_broadcast_is_framed_once_and_written_once_to_every_websocket_member(self) -> None:
        publisher, alice, bob = (self.joined(user) for user in ("publisher", "alice", "bob"))
        publisher.send(publish("lobby", 0, 1, 2))
        self.assertEqual(len(alice.stream.writes), 1)
        # The very same bytes object: framed once for both.
        self.assertIs(alice.stream.writes[0], bob.stream.writes[0])
        for member in (alice, bob):
            self.assertEqual(contents(member.messages()), [0, 1, 2])
        self.assertEqual(publisher.stream.writes, [])

    def test_replies_and_deliveries_of_one_read_are_one_write_in_order(self) -> None:
        echoing = self.joined("echo", echo=True)
        echoing.send(
            publish("lobby", "first")
            + encode(MessageType.HEARTBEAT, 0, b"beat")
            + publish("lobby", "second")
        )
        self.assertEqual(len(echoing.stream.writes), 1)
        messages = echoing.messages()
        self.assertEqual(len(messages), 3)
        self.assertEqual(contents([messages[0], messages[2]]), ["first", "second"])
        self.assertEqual(next(Decoder().feed(messages[1])), (MessageType.HEARTBEAT, 0, b"beat"))

    def test_the_messages_of_one_read_are_delivered_in_one_write(self) -> None:
        # One WebSocket message per Relay frame, as browsers send them: the
        # frames of a read are handled first and written once, as on TCP.
        publisher, alice = self.joined("publisher"), self.joined("alice")
        publisher.send_in_one_read(publish("lobby", 0), publish("lobby", 1), publish("lobby", 2))
        self.assertEqual(len(alice.stream.writes), 1)
        self.assertEqual(contents(alice.messages()), [0, 1, 2])

    def test_framing_is_byte_for_byte_what_autobahn_sends(self) -> None:
        client = self.joined("carol")
        for size in (0, 1, 118, 119, 125, 126, 127, 65_535, 65_536, 70_000):
            frame = encode(MessageType.HEARTBEAT, 0, b"x" * size)
            client.websocket.sendMessage(frame, isBinary=True)
            by_autobahn = client.stream.value()
            client.stream.clear()
            client.relay.transport.write_entries([frame])
            self.assertEqual(client.stream.value(), by_autobahn, size)
            client.stream.clear()

    def test_framing_a_fanout_closes_it_and_is_done_once(self) -> None:
        fanout = Fanout((), None)
        fanout.append(b"abc")
        fanout.append(b"y" * 200)
        data = websocket.framed(fanout, 1000)
        self.assertTrue(fanout.closed)  # no frame may join bytes already made
        self.assertEqual(data, b"\x82\x03abc" + b"\x82\x7e\x00\xc8" + b"y" * 200)
        self.assertIs(websocket.framed(fanout, 1000), data)
        # A frame above the limit leaves the Fanout to autobahn, which refuses it.
        too_big = Fanout((), None)
        too_big.append(b"z" * 1001)
        self.assertIsNone(websocket.framed(too_big, 1000))

    def test_autobahn_pings_fall_between_messages(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        publisher.send(publish("lobby", 0))
        member.websocket.sendPing(b"are you there")
        publisher.send(publish("lobby", 1, 2))
        events = member.events()
        self.assertEqual(
            [event.opcode for event in events], [Opcode.BINARY, Opcode.PING, Opcode.BINARY, Opcode.BINARY]
        )
        self.assertEqual(contents([e.data for e in events if e.opcode is Opcode.BINARY]), [0, 1, 2])


class AutobahnPathTests(FastPathTestCase):
    """Where Relay's framing would not be autobahn's, autobahn frames every message."""

    def test_message_above_the_limit_is_refused_by_autobahn_as_before(self) -> None:
        client = self.joined("dave")
        largest = wsmapping.max_message_size(self.factory.config.max_frame_size)
        with self.assertRaises(PayloadExceededError):
            client.relay.transport.write_entries([encode(MessageType.HEARTBEAT, 0, b"x" * largest)])
        self.assertEqual(client.stream.writes, [])

    def test_writes_while_autobahn_is_inside_a_message_go_through_autobahn(self) -> None:
        client = self.joined("erin")
        client.websocket.beginMessage(isBinary=True)
        sent = client.websocket.trafficStats.outgoingWebSocketMessages
        client.relay.transport.write_entries([encode(MessageType.HEARTBEAT, 0, b"")])
        self.assertEqual(client.websocket.trafficStats.outgoingWebSocketMessages, sent + 1)

class InboundTests(FastPathTestCase):
    """Small binary messages are read by Relay; everything else by autobahn."""

    # No closing-handshake timer: autobahn would start it on the global reactor.
    protocol_options = {"closeHandshakeTimeout": 0}

    def wire_bytes(self, client: Client) -> bytes:
        """A mix of frames as one client stream: small and large messages,
        a ping, and a fragmented message between them."""
        peer = client.peer
        peer.send_binary(publish("lobby", 0))
        peer.send_binary(publish("lobby", 1))
        peer.send_ping(b"are you there")
        fragmented = publish("lobby", 2)
        peer.send_binary(fragmented[:5], fin=False)
        peer.send_continuation(fragmented[5:], fin=True)
        peer.send_binary(publish("lobby", "x" * websocket.SMALL_MESSAGE))  # autobahn's
        peer.send_binary(publish("lobby", 3) + publish("lobby", 4))  # two frames, one message
        return b"".join(peer.data_to_send())

    def test_every_frame_arrives_in_order_however_the_stream_is_split(self) -> None:
        for cut in range(1, 160, 3):
            publisher, member = self.joined("publisher"), self.joined("member")
            data = self.wire_bytes(publisher)
            for at in range(0, len(data), cut):
                publisher.stream.protocol.dataReceived(data[at : at + cut])
            got = contents(member.messages())
            self.assertEqual(got, [0, 1, 2, "x" * websocket.SMALL_MESSAGE, 3, 4], f"cut every {cut}")
            pongs = [e for e in publisher.events() if e.opcode is Opcode.PONG]
            self.assertEqual([pong.data for pong in pongs], [b"are you there"])
            publisher.lose()
            member.lose()

    def test_a_read_that_starts_inside_autobahn_s_frame_is_autobahn_s(self) -> None:
        # A large message whose payload holds what looks like a small frame,
        # split just before it: that is payload, not a frame.
        publisher, member = self.joined("publisher"), self.joined("member")
        key = b"\x07\x07\x07\x07"
        lookalike = publish("lobby", "not a message")
        lookalike = bytes((0x82, 0x80 | len(lookalike))) + key + wsmapping.mask(lookalike, key)
        data = b"\x00" * 3000 + lookalike
        frame = encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", data))
        zero = b"\x00\x00\x00\x00"  # a key that leaves the payload as it is
        stream = bytes((0x82, 0x80 | 126)) + len(frame).to_bytes(2, "big") + zero + frame
        split = stream.index(lookalike)
        publisher.stream.protocol.dataReceived(stream[:split])
        publisher.stream.protocol.dataReceived(stream[split:])
        [delivered] = member.messages()
        self.assertTrue(delivered.endswith(lookalike))

    def test_a_read_that_starts_inside_a_ping_is_autobahn_s(self) -> None:
        # A control frame is no message: only autobahn's current frame says
        # that the read begins inside one.
        publisher, member = self.joined("publisher"), self.joined("member")
        key, zero = b"\x07\x07\x07\x07", b"\x00\x00\x00\x00"
        lookalike = publish("lobby", "not a message")
        lookalike = bytes((0x82, 0x80 | len(lookalike))) + key + wsmapping.mask(lookalike, key)
        ping_head = bytes((0x89, 0x80 | len(lookalike))) + zero
        publisher.stream.protocol.dataReceived(ping_head + lookalike[:1])
        publisher.stream.protocol.dataReceived(lookalike[1:])
        self.assertEqual(member.messages(), [])
        [pong] = [event for event in publisher.events() if event.opcode is Opcode.PONG]
        self.assertEqual(pong.data, lookalike)

    def test_a_read_that_starts_inside_a_frame_header_is_autobahn_s(self) -> None:
        # Split after a header's first byte, the rest of that header reads
        # like another small frame's start: it must not be taken for one.
        publisher, member = self.joined("publisher"), self.joined("member")
        frame, key = publish("lobby", 0), b"\x85\x00\x00\x00"
        head = bytes((0x82, 0x80 | 2)) + key + wsmapping.mask(frame[:2], key)
        rest = bytes((0x82, 0x80 | (len(frame) - 2))) + key + wsmapping.mask(frame[2:], key)
        publisher.stream.protocol.dataReceived(head[:1])
        publisher.stream.protocol.dataReceived(head[1:] + rest)
        self.assertEqual(contents(member.messages()), [0])

    def test_a_new_message_inside_a_fragmented_one_is_still_a_protocol_error(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        key = b"\x01\x02\x03\x04"
        first, second = publish("lobby", 0), publish("lobby", 1)
        unfinished = bytes((0x02, 0x80 | len(first))) + key + wsmapping.mask(first, key)
        publisher.stream.protocol.dataReceived(unfinished)
        publisher.stream.protocol.dataReceived(bytes((0x82, 0x80 | len(second))) + key + wsmapping.mask(second, key))
        self.assertEqual(member.messages(), [])
        self.assert_protocol_error(publisher)

    def test_small_messages_skip_autobahn_s_frame_reader_however_split(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        frames = publisher.websocket.trafficStats.incomingWebSocketFrames
        for n in range(40):
            publisher.peer.send_binary(publish("lobby", n))
        data = b"".join(publisher.peer.data_to_send())
        for at in range(0, len(data), 5):
            publisher.stream.protocol.dataReceived(data[at : at + 5])
        self.assertEqual(contents(member.messages()), list(range(40)))
        self.assertEqual(publisher.websocket.trafficStats.incomingWebSocketFrames, frames)

    def assert_protocol_error(self, client: Client) -> None:
        closes = [event for event in client.events() if event.opcode is Opcode.CLOSE]
        self.assertEqual(len(closes), 1)
        self.assertEqual(int.from_bytes(closes[0].data[:2], "big"), 1002)

    def test_an_unmasked_client_frame_is_still_a_protocol_error(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        frame = publish("lobby", 0)
        publisher.stream.protocol.dataReceived(bytes((0x82, len(frame))) + frame)
        self.assertEqual(member.messages(), [])
        self.assert_protocol_error(publisher)

    def test_a_length_not_minimally_encoded_is_still_a_protocol_error(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        frame, key = publish("lobby", 0), b"\x01\x02\x03\x04"
        head = bytes((0x82, 0x80 | 126)) + len(frame).to_bytes(2, "big") + key
        publisher.stream.protocol.dataReceived(head + wsmapping.mask(frame, key))
        self.assertEqual(member.messages(), [])
        self.assert_protocol_error(publisher)


class ClosingTests(FastPathTestCase):
    # No closing-handshake timer: autobahn would start it on the global reactor.
    protocol_options = {"closeHandshakeTimeout": 0}

    def test_nothing_is_written_once_the_closing_handshake_began(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        member.relay.transport.loseConnection()
        member.stream.writes.clear()
        publisher.send(publish("lobby", 0))
        member.relay.transport.write_entries([encode(MessageType.HEARTBEAT, 0, b"")])
        self.assertEqual(member.stream.writes, [])


    def test_answers_to_a_read_come_before_the_close_that_ends_it(self) -> None:
        echoing = self.joined("echo", echo=True)
        echoing.send_in_one_read(publish("lobby", "last words"), close=True)
        events = echoing.events()
        self.assertEqual([event.opcode for event in events], [Opcode.BINARY, Opcode.CLOSE])
        self.assertEqual(contents([events[0].data]), ["last words"])

    def test_answers_to_a_read_come_before_the_close_a_text_message_causes(self) -> None:
        echoing = self.joined("echo", echo=True)
        echoing.send_in_one_read(publish("lobby", "before"), "text is refused")
        events = echoing.events()
        self.assertEqual([event.opcode for event in events], [Opcode.BINARY, Opcode.CLOSE])
        self.assertEqual(contents([events[0].data]), ["before"])


class PerMessageDeflateTests(FastPathTestCase):
    """If permessage-deflate is ever negotiated, autobahn compresses every message."""

    client_options = {"extensions": [ClientPerMessageDeflateFactory()]}
    protocol_options = {"perMessageCompressionAccept": lambda offers: accept_deflate(offers)}

    def test_deliveries_are_compressed_messages_when_deflate_is_in_use(self) -> None:
        publisher, member = self.joined("publisher"), self.joined("member")
        self.assertTrue(member.websocket.websocket_extensions_in_use)
        sent = member.websocket.trafficStats.outgoingWebSocketMessages
        publisher.send(publish("lobby", "a" * 500, "b" * 500))
        self.assertEqual(member.websocket.trafficStats.outgoingWebSocketMessages, sent + 2)
        # Compressed on the wire, whole again once inflated.
        self.assertLess(sum(map(len, member.stream.writes)), 500)
        self.assertEqual(contents(member.messages()), ["a" * 500, "b" * 500])


def accept_deflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    """Accept a client's permessage-deflate offer (the server's default refuses it)."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
