"""ReconnectingClient: keeps a Relay connection up, with backoff, re-joining its rooms."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.client.endpoints import TokenProvider, build_endpoint, fetch_token
from relay.client.protocol import (
    DirectMessage,
    MemberList,
    Message,
    MessageHub,
    PresenceEvent,
    RelayClientFactory,
    RelayClientProtocol,
    RelayError,
    default_error_handler,
)
from relay.wire import ErrorCode, ProtocolError

log = Logger()

# Codes after which reconnecting cannot help: the same client would be refused
# again (its credentials), or would break the stream the same way again.
TERMINAL_CODES = frozenset({
    ErrorCode.UNAUTHORIZED,
    ErrorCode.INVALID_FRAME,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.UNSUPPORTED_VERSION,
    ErrorCode.UNKNOWN_MESSAGE_TYPE,
    ErrorCode.PARSE_ERROR,
})
# OpenSSL's reasons for refusing a certificate, on either side of the handshake.
_CERTIFICATE_REASONS = ("certificate", "unknown ca")
# Reconnection backoff: 0.75 s, 1.1 s, 1.7 s ... up to 30 s, each plus jitter.
RETRY_INITIAL_DELAY_SECONDS = 0.5
RETRY_MAX_DELAY_SECONDS = 30.0
# How long stop() lets the connection close before aborting it.
STOP_GRACE_SECONDS = 2.0


def is_terminal(reason: Failure | None) -> bool:
    """Whether reconnecting cannot cure ``reason``, so retrying is pointless.

    Terminal: an ERROR whose code is in ``TERMINAL_CODES``; a peer that does
    not speak Relay v1 (``ProtocolError``); a TLS certificate the client
    does not trust, a host name it does not match, or a client certificate
    the server refused.  Refused or lost connections, timeouts and the
    operational codes (SERVER_SHUTDOWN, SLOW_CONSUMER...) are worth a retry.
    """
    while reason is not None:
        if reason.check(RelayError):
            return reason.value.code in TERMINAL_CODES
        if reason.check(ProtocolError, VerificationError, CertificateError):
            return True
        if reason.check(SSL.Error):
            return _refuses_a_certificate(reason.value)
        # ConnectionLost keeps the transport's own failure as ``reason``.
        inner = getattr(reason.value, "reason", None)
        reason = inner if isinstance(inner, Failure) else None
    return False


def _refuses_a_certificate(problem: SSL.Error) -> bool:
    errors = problem.args[0] if problem.args and isinstance(problem.args[0], list) else []
    texts = [str(entry[-1]).lower() for entry in errors if isinstance(entry, tuple) and entry]
    return any(reason in text for text in texts for reason in _CERTIFICATE_REASONS)


def _is_unauthorized(reason: Failure | None) -> bool:
    return reason is not None and reason.check(RelayError) is not None and (
        reason.value.code is ErrorCode.UNAUTHORIZED
    )


class _Session(Protocol):
    """What ClientService holds for one established, ready connection."""

    client: RelayClientProtocol | None = None

    def attach(self, client: RelayClientProtocol) -> None:
        self.client = client


class _ReadyEndpoint:
    """Endpoint for ClientService: a connection counts once HELLO is acked.

    ClientService cannot cope with a connection dropping while its
    ``prepareConnection`` runs, so the handshake and the re-joins happen here,
    before ClientService sees the connection at all.
    """

    def __init__(self, owner: ReconnectingClient) -> None:
        self._owner = owner

    def connect(self, service_factory: Any) -> defer.Deferred[Any]:
        owner = self._owner
        attempt: list[RelayClientProtocol] = []

        def made(client: RelayClientProtocol) -> defer.Deferred[RelayClientProtocol]:
            attempt.append(client)
            return client.ready

        def failed(failure: Failure) -> Failure:
            # A cancelled or failed attempt must not leave its socket open.
            if attempt and attempt[0].is_open:
                attempt[0].transport.abortConnection()
            return owner._attempt_failed(failure)

        ready = owner._prepared_factory().addCallback(owner.endpoint.connect).addCallback(made)
        ready.addCallback(owner._rejoin)
        ready.addCallback(self._present, service_factory)
        ready.addErrback(failed)
        return ready

    def _present(self, client: RelayClientProtocol, service_factory: Any) -> Any:
        # First, so the owner hears of a loss before ClientService schedules the retry.
        self._owner._connected(client)
        if self._owner.stopped:
            # A hook stopped it: ClientService, stopping too, must not get this connection.
            raise defer.CancelledError("stopped while connecting")
        session = service_factory.buildProtocol(client.transport.getPeer())
        session.attach(client)
        session.makeConnection(client.transport)
        client.when_closed().addCallback(lambda _: session.connectionLost(client.close_reason))
        return session


class ReconnectingClient:
    """Keeps a Relay connection up, reconnecting with exponential backoff and jitter.

    Rooms joined through it are joined again after every reconnection.
    Requests made while disconnected wait for the next connection; a request
    in flight when the connection drops fails with ``ConnectionLost``.
    A failure that reconnecting cannot cure (see ``is_terminal``) stops it.

    ``token_provider`` (instead of ``token``) is a callable returning a token
    or a Deferred of one; it is called before every connection attempt, so
    a reconnection never reuses an expired token.  With it, a connection
    the server ends with UNAUTHORIZED (its token expired) is reconnected with
    a fresh token; a fresh token refused with UNAUTHORIZED stops the client.

    Hooks (plain attributes, all optional):

    - ``on_connected(client)``: a connection is ready and its rooms re-joined;
    - ``on_disconnected(reason)``: an established connection ended;
    - ``on_reconnecting(attempt, delay, reason)``: next attempt in ``delay`` s;
    - ``on_gave_up(reason)``: a terminal failure (UNAUTHORIZED, an untrusted
      certificate...); it stops as soon as the hook returns;
    - ``on_message(message)`` and ``on_error(relay_error)`` as on the protocol;
    - ``on_presence(event)`` and ``on_direct(message)`` with ``presence=True``
      and ``direct=True``, as on the protocol.
    - ``on_recovered(room, recovered, missed)``: with ``history=True``, a room
      re-joined after a reconnection; ``missed`` messages were replayed
      (through ``on_message``, ``replayed`` set, before this hook), and
      ``recovered`` says whether that was everything: when False, messages
      were lost and the application must resynchronise by other means.

    With ``history=True`` each room's position (``positions``, the last
    ``(seq, epoch)`` seen) outlives the connections, and a re-join asks
    the server for what came after it.
    """

    def __init__(self, reactor: Any, description: str, *, user: str | None = None,
                 token: str | None = None, echo: bool = False, ca_file: str | None = None,
                 client_cert: str | None = None, acks: bool = False, history: bool = False,
                 compression: bool = False,
                 retry_policy: Callable[[int], float] | None = None,
                 token_provider: TokenProvider | None = None,
                 presence: bool = False, direct: bool = False) -> None:
        if token is not None and token_provider is not None:
            raise ValueError("give a token or a token provider, not both")
        self.reactor = reactor
        self.description = description
        self.endpoint = build_endpoint(reactor, description, ca_file, client_cert)
        self.factory = RelayClientFactory(
            reactor, user=user, token=token, echo=echo, acks=acks, history=history,
            compression=compression, presence=presence, direct=direct,
        )
        # Room -> (seq, epoch) last seen, shared by every connection (history).
        self.positions: dict[str, tuple[int, str]] = {}
        self.on_recovered: Callable[[str, bool, int], Any] | None = None
        self.rooms: dict[str, None] = {}  # ordered set of acked room names
        self.client: RelayClientProtocol | None = None
        self.on_connected: Callable[[RelayClientProtocol], Any] | None = None
        self.on_disconnected: Callable[[Failure], Any] | None = None
        self.on_reconnecting: Callable[[int, float, Failure | None], Any] | None = None
        self.on_gave_up: Callable[[Failure], Any] | None = None
        self.on_message: Callable[[Message], Any] | None = None
        self.on_error: Callable[[RelayError], Any] = default_error_handler
        self.on_presence: Callable[[PresenceEvent], Any] | None = None
        self.on_direct: Callable[[DirectMessage], Any] | None = None
        self._policy = retry_policy or backoffPolicy(
            initialDelay=RETRY_INITIAL_DELAY_SECONDS, maxDelay=RETRY_MAX_DELAY_SECONDS
        )
        self._last_failure: Failure | None = None
        self._token_provider = token_provider
        # The last connection ended with UNAUTHORIZED and the provider will
        # give a fresh token: a retry, not a terminal failure.
        self._renewing = False
        self._hub = MessageHub()
        # Requests wait here, not in ClientService, so that they can be made
        # from any callback, even one run while ClientService changes state.
        self._waiting: list[defer.Deferred[RelayClientProtocol]] = []
        self._stopped = False
        self._service = ClientService(
            _ReadyEndpoint(self), Factory.forProtocol(_Session),
            retryPolicy=self._retry_delay, clock=reactor,
        )

    def start(self) -> None:
        """Start connecting (and keep reconnecting until ``stop``)."""
        self._stopped = False
        self._service.startService()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the connection; fires once closed.

        Requests still waiting for a connection fail with ``CancelledError``.
        A connection that has not closed after ``STOP_GRACE_SECONDS`` (a
        server that stopped reading) is aborted.
        """
        self._stopped = True
        self._hub.close()
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.cancel()
        closing = [self._service.stopService()] if self._service.running else []
        if self.connected:
            # Closed here too: ClientService leaves open a connection that
            # was being handed to it when it was stopped.
            closing.append(self._close(self.client))
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def _close(self, client: RelayClientProtocol) -> defer.Deferred[None]:
        abort = self.reactor.callLater(STOP_GRACE_SECONDS, client.transport.abortConnection)

        def closed(result: None) -> None:
            if abort.active():
                abort.cancel()

        return client.disconnect().addCallback(closed)

    @property
    def connected(self) -> bool:
        """Whether a ready connection is up now."""
        return self.client is not None and self.client.is_open

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` was called (or a terminal failure stopped it)."""
        return self._stopped

    def when_connected(self) -> defer.Deferred[RelayClientProtocol]:
        """The current ready connection, or the next one.

        Fails with ``CancelledError`` once ``stop`` has been called.
        """
        if self.connected:
            return defer.succeed(self.client)
        if self._stopped:
            return defer.fail(defer.CancelledError("the client has been stopped"))
        waiter: defer.Deferred[RelayClientProtocol] = defer.Deferred(self._forget)
        self._waiting.append(waiter)
        return waiter

    def _forget(self, waiter: defer.Deferred[RelayClientProtocol]) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)

    def join(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Join ``room`` (now and after each reconnection); fires with the ack."""
        def joined(ack: dict[str, Any]) -> dict[str, Any]:
            self.rooms[ack.get("room", room)] = None
            return ack

        return self._call(lambda client: client.join(room)).addCallback(joined)

    def leave(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Leave ``room`` and stop re-joining it; fires with the ack."""
        self.rooms.pop(room.strip(), None)
        return self._call(lambda client: client.leave(room))

    def send(self, room: str, content: Any) -> defer.Deferred[int | None]:
        """Publish JSON ``content``: fires with its ``seq`` once accepted when
        acks are enabled, else once written (see ``RelayClientProtocol.send``)."""
        return self._call(lambda client: client.send(room, content))

    def send_binary(self, room: str, data: bytes) -> defer.Deferred[None]:
        """Publish ``data`` as a binary message; fires once written."""
        return self._call(lambda client: client.send_binary(room, data))

    def heartbeat(self) -> defer.Deferred[float]:
        """Ping the server; fires with the round trip in seconds."""
        return self._call(lambda client: client.heartbeat())

    def messages(self) -> AsyncIterator[Message]:
        """Messages from every connection, from now until ``stop``."""
        return self._hub.subscribe()

    def who(self, room: str) -> defer.Deferred[MemberList]:
        """The members of ``room`` (see ``RelayClientProtocol.who``)."""
        return self._call(lambda client: client.who(room))

    def send_direct(self, user: str, content: Any) -> defer.Deferred[None]:
        """Send ``content`` to ``user`` (see ``RelayClientProtocol.send_direct``)."""
        return self._call(lambda client: client.send_direct(user, content))

    def _call(self, request: Callable[[RelayClientProtocol], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        return self.when_connected().addCallback(request)

    # Connection life cycle, driven by _ReadyEndpoint and ClientService

    def _prepared_factory(self) -> defer.Deferred[RelayClientFactory]:
        """The factory for the next attempt, holding a fresh token if there is a provider."""
        if self._token_provider is None:
            return defer.succeed(self.factory)

        def fresh(token: str) -> RelayClientFactory:
            self.factory.options["token"] = token
            return self.factory

        return fetch_token(self._token_provider).addCallback(fresh)

    def _rejoin(self, client: RelayClientProtocol) -> defer.Deferred[RelayClientProtocol]:
        client.on_message = self._deliver
        client.on_error = lambda relay_error: self.on_error(relay_error)
        client.on_presence = lambda event: self._run_hook(self.on_presence, event)
        client.on_direct = lambda message: self._run_hook(self.on_direct, message)
        client.positions = self.positions
        joins = [
            client.join(room, self.positions.get(room))
            .addCallback(self._rejoined)
            .addErrback(self._rejoin_failed, room)
            for room in list(self.rooms)
        ]
        return defer.gatherResults(joins, consumeErrors=True).addCallback(lambda _: client)

    def _rejoined(self, ack: dict[str, Any]) -> None:
        recovered = ack.get("recovered")
        if isinstance(recovered, bool):
            replayed = ack.get("replayed")
            missed = replayed if type(replayed) is int else 0
            self._run_hook(self.on_recovered, str(ack.get("room", "")), recovered, missed)

    def _rejoin_failed(self, failure: Failure, room: str) -> None:
        if failure.check(RelayError) and not failure.value.fatal:
            # The server no longer accepts this room: stop asking for it.
            self.rooms.pop(room, None)
            self.on_error(failure.value)
            return None
        return failure

    def _connected(self, client: RelayClientProtocol) -> None:
        self.client = client
        self._last_failure = None
        client.when_closed().addCallback(lambda _: self._disconnected(client))
        self._run_hook(self.on_connected, client)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(client)

    def _disconnected(self, client: RelayClientProtocol) -> None:
        if self.client is client:
            self.client = None
        reason = client.close_reason
        self._last_failure = reason
        # An established connection ended by UNAUTHORIZED: its token expired.
        self._renewing = self._token_provider is not None and _is_unauthorized(reason)
        self._run_hook(self.on_disconnected, reason)
        if not self._renewing:
            self._check_terminal(reason)

    def _attempt_failed(self, failure: Failure) -> Failure:
        self._last_failure = failure
        self._renewing = False
        self._check_terminal(failure)
        return failure

    def _check_terminal(self, reason: Failure | None) -> None:
        if is_terminal(reason):
            # Let ClientService settle first, then stop its retry.
            self.reactor.callLater(0, self._give_up, reason)

    def _give_up(self, reason: Failure) -> None:
        if self._stopped or not self._service.running:
            return
        # The cause first, then its consequences: stopping cancels the
        # requests still waiting for a connection.
        self._run_hook(self.on_gave_up, reason)
        self.stop()

    def _retry_delay(self, attempt: int) -> float:
        delay = self._policy(attempt)
        retrying = self._renewing or not is_terminal(self._last_failure)
        if self.on_reconnecting is not None and retrying:
            # Not from inside ClientService's transition: the hook may stop us.
            self.reactor.callLater(0, self._run_hook, self.on_reconnecting, attempt, delay,
                                   self._last_failure)
        return delay

    @staticmethod
    def _run_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
        # A bug in a hook must not cost the connection (or loop reconnecting).
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.failure("a ReconnectingClient hook raised: {hook!r}", hook=hook)

    def _deliver(self, message: Message) -> None:
        if self.on_message is not None:
            self.on_message(message)
        self._hub.publish(message)

