"""Authentication and per-room permissions: who a connection is, where it may go.

With ``--auth-tokens`` (a JSON file of API keys) or ``--jwt-key`` (a key that
verifies JSON Web Tokens), or both, every connection must open with a HELLO
carrying a ``token``.  ``Authenticator.authenticate`` turns that token into a
``Grant``: the user id the connection then has, the rooms it may join, the
rooms it may publish to and when the grant expires.  A token that does not
verify raises ``Unauthorized``, a fatal ``ProtocolError``, so the connection
is closed before anything of it reaches room code.

Room patterns are shell globs (``team-*``, ``user.{sub}.*``); ``{sub}`` is
replaced by the user id with its own glob characters escaped, so a user id
can never widen its grant.  The protocol asks a grant once per JOIN_ROOM
and keeps the publish permission with the membership, so nothing here runs
per message.

Secrets never reach a log line or an error message: a token is named by
``fingerprint``, and refusals carry fixed texts of this module, never the
text of an exception raised while parsing a token.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import glob
import hashlib
import hmac
import json
import math
import re
import signal
from dataclasses import dataclass
from typing import Any, Iterable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from relay.requests import MAX_USER_ID, has_control_character
from relay.server.limits import non_negative_seconds
from relay.wire import ErrorCode, ProtocolError

log = Logger()

# Longer tokens are refused before any parsing: a JWT with a few dozen room
# patterns is well under 4 KiB.
MAX_TOKEN_LENGTH = 8192
# Bounds on what one grant may list, so a token cannot make a join costly.
MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 256
# RFC 7518 3.2: an HS256 key must be at least as long as the hash.
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
DEFAULT_LEEWAY = 30.0
SUBJECT = "{sub}"
# Characters of a token shown in a fingerprint.
FINGERPRINT_PREFIX = 6

# What a JWT must carry, whatever PyJWT's defaults are.
_JWT_OPTIONS = {
    "require": ["exp", "sub"],
    # Time is the reactor's (see JwtVerifier.verify), so tests can drive it.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_signature": True,
    "verify_aud": True,
    "verify_iss": True,
}
_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# A refusal's text for each PyJWT error: fixed strings only, since PyJWT's own
# messages may quote what the client sent.
_JWT_REFUSALS: list[tuple[type[Exception], str]] = [
    (jwt.InvalidAlgorithmError, "invalid token: algorithm not accepted"),
    (jwt.InvalidSignatureError, "invalid token: bad signature"),
    (jwt.InvalidAudienceError, "invalid token: wrong audience"),
    (jwt.InvalidIssuerError, "invalid token: wrong issuer"),
    (jwt.DecodeError, "invalid token: malformed"),
]


class Unauthorized(ProtocolError):
    """A connection that could not be authenticated: fatal ``UNAUTHORIZED``."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAUTHORIZED, message)


class AuthConfigError(Exception):
    """A key or token file that cannot be used; the message says why and
    never quotes a secret."""


def fingerprint(token: str) -> str:
    """How a token appears in logs: a few leading characters and a hash.

    Enough to tell two tokens apart or find one in an issuer's records;
    useless for getting in.
    """
    head = "".join(c if c.isalnum() or c in "-_." else "?" for c in token[:FINGERPRINT_PREFIX])
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{head}…#{digest}"


# Grants


@functools.lru_cache(maxsize=4096)
def compile_patterns(patterns: tuple[str, ...], user_id: str) -> re.Pattern[str] | None:
    """One regular expression matching the rooms any of ``patterns`` allows.

    ``{sub}`` becomes ``user_id`` with its glob characters escaped.  No
    pattern at all allows no room (None).
    """
    if not patterns:
        return None
    escaped = glob.escape(user_id)
    parts = [f"(?:{fnmatch.translate(p.replace(SUBJECT, escaped))})" for p in patterns]
    return re.compile("|".join(parts))


@dataclass(frozen=True)
class Grant:
    """What one authenticated connection is and may do.

    ``user_id`` is None for an anonymous connection (it keeps the id the
    server gave it).  ``expires_at`` is in the reactor's seconds, None for
    a grant that does not expire (API keys, anonymous access).
    """

    user_id: str | None
    join: re.Pattern[str] | None
    publish: re.Pattern[str] | None
    expires_at: float | None = None
    source: str = "anonymous"
    # The direct extension: may send direct messages to users ("direct": true).
    direct: bool = False

    def may_join(self, room: str) -> bool:
        """Whether the grant lets the connection join ``room`` (a normalised name)."""
        return self.join is not None and self.join.match(room) is not None

    def may_publish(self, room: str) -> bool:
        """Whether the grant lets the connection publish to ``room``."""
        return self.publish is not None and self.publish.match(room) is not None


def grant_for(user_id: str, rooms: tuple[str, ...], publish: tuple[str, ...] | None,
              expires_at: float | None, source: str, direct: bool = False) -> Grant:
    """A grant for ``user_id``; ``publish`` defaults to ``rooms``."""
    publish = rooms if publish is None else publish
    return Grant(user_id, compile_patterns(rooms, user_id), compile_patterns(publish, user_id),
                 expires_at, source, direct)


def valid_user_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_USER_ID
        and not has_control_character(value)
    )


def pattern_list(value: Any) -> tuple[str, ...] | None:
    """``value`` as a tuple of room patterns, or None if it is not a valid list."""
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        return None
    if not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LENGTH for p in value):
        return None
    return tuple(value)


# API keys


@dataclass(frozen=True)
class ApiKey:
    """One entry of the API-key file (the key itself is kept only as a digest)."""

    digest: bytes
    user_id: str
    rooms: tuple[str, ...]
    publish: tuple[str, ...] | None
    direct: bool = False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ApiKeyFile:
    """Static API keys from a JSON file, re-read by ``load``.

    The file maps each key to ``{"user": ..., "rooms": [...], "publish": [...]}``
    (``publish`` optional: the same as ``rooms``).  Keys are held as SHA-256
    digests: a lookup is by digest, so its timing says nothing about how
    much of a real key a guess shares, and the match is confirmed with
    ``hmac.compare_digest``.
    """

    kind = "API keys"

    def __init__(self, path: str) -> None:
        self.path = path
        self._keys: dict[bytes, ApiKey] = {}
        self.load()

    def __len__(self) -> int:
        return len(self._keys)

    def load(self) -> None:
        """Read the file; on any problem raise ``AuthConfigError`` and keep the keys held."""
        try:
            with open(self.path, "rb") as file:
                document = json.loads(file.read())
        except OSError as problem:
            raise AuthConfigError(f"cannot read {self.path}: {problem.strerror}") from None
        except ValueError as problem:
            # The position only: the parser's message could quote a key.
            where = getattr(problem, "lineno", None)
            at = f" (line {where})" if where is not None else ""
            raise AuthConfigError(f"{self.path} is not valid JSON{at}") from None
        self._keys = parse_api_keys(document, self.path)

    def lookup(self, token: str) -> ApiKey | None:
        """The entry of ``token``, or None if it is not a key of the file."""
        digest = _digest(token)
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry


def parse_api_keys(document: Any, path: str) -> dict[bytes, ApiKey]:
    """The entries of an API-key document, by key digest.

    Problems are named by the entry's position, never by its key.
    """
    if not isinstance(document, dict):
        raise AuthConfigError(f"{path}: the file must hold a JSON object of key -> entry")
    keys: dict[bytes, ApiKey] = {}
    for number, (key, entry) in enumerate(document.items(), 1):
        where = f"{path}: entry {number}"
        if not key:
            raise AuthConfigError(f"{where}: the key is empty")
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: must be an object with \"user\" and \"rooms\"")
        user = entry.get("user")
        if not valid_user_id(user):
            raise AuthConfigError(
                f'{where}: "user" must be a string of 1-{MAX_USER_ID} characters, no control characters'
            )
        rooms = pattern_list(entry.get("rooms", []))
        publish = pattern_list(entry["publish"]) if "publish" in entry else ()
        if rooms is None or publish is None:
            raise AuthConfigError(
                f'{where}: "rooms" and "publish" must be lists of at most {MAX_PATTERNS} '
                f"patterns of 1-{MAX_PATTERN_LENGTH} characters"
            )
        if not isinstance(entry.get("direct", False), bool):
            raise AuthConfigError(f'{where}: "direct" must be true or false')
        if len(key) < 16:
            log.warn("{where}: the key is shorter than 16 characters, easy to guess", where=where)
        digest = _digest(key)
        keys[digest] = ApiKey(
            digest, user, rooms, publish if "publish" in entry else None, entry.get("direct", False)
        )
    return keys


# JSON Web Tokens


def load_jwt_key(path: str) -> tuple[Any, list[str]]:
    """The verification key in ``path`` and the only algorithms it may verify.

    A PEM public key (or certificate) gives RS256, ES256/384/512 or EdDSA by
    its type; anything else is an HMAC secret for HS256 (surrounding white
    space removed).  The algorithms never come from a token.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as problem:
        raise AuthConfigError(f"cannot read {path}: {problem.strerror}") from None
    if b"-----BEGIN" not in data:
        secret = data.strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise AuthConfigError(
                f"{path}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes "
                "(relay-token --new-secret FILE makes one)"
            )
        return secret, ["HS256"]
    if b"PRIVATE KEY" in data:
        raise AuthConfigError(
            f"{path} holds a private key; the server needs only the public key "
            f"(openssl pkey -in {path} -pubout)"
        )
    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise AuthConfigError(f"{path}: not a PEM public key or certificate") from None
    return key, [_algorithm_of(key, path)]


def _algorithm_of(key: Any, path: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AuthConfigError(f"{path}: an RSA key must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _CURVE_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise AuthConfigError(f"{path}: curve {key.curve.name} is not one of P-256, P-384, P-521")
        return algorithm
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "EdDSA"
    raise AuthConfigError(f"{path}: a {type(key).__name__} cannot verify JWTs")


class JwtVerifier:
    """Verifies JWTs with one key, re-read by ``load``.

    Signature, algorithm, audience and issuer are PyJWT's checks; ``exp``
    (required) and ``nbf`` are checked here against the caller's clock,
    with ``leeway`` seconds of tolerance.
    """

    kind = "JWT key"

    def __init__(self, path: str, audience: str | None = None, issuer: str | None = None,
                 leeway: float = DEFAULT_LEEWAY) -> None:
        self.path = path
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._key: Any = None
        self.algorithms: list[str] = []
        self.load()

    def load(self) -> None:
        """Read the key; on a problem raise ``AuthConfigError`` and keep the one held."""
        self._key, self.algorithms = load_jwt_key(self.path)

    def verify(self, token: str, now: float) -> Grant:
        """The grant ``token`` carries, or ``Unauthorized`` saying why not."""
        claims = self._decode(token)
        expires = claims["exp"]
        if not _is_time(expires):
            raise Unauthorized('invalid token: "exp" must be a number')
        if now > expires + self.leeway:
            raise Unauthorized("token expired")
        not_before = claims.get("nbf")
        if not_before is not None and (not _is_time(not_before) or now + self.leeway < not_before):
            raise Unauthorized("token not yet valid")
        subject = claims["sub"]
        if not valid_user_id(subject):
            raise Unauthorized(
                f'invalid token: "sub" must be a string of 1-{MAX_USER_ID} characters, no control characters'
            )
        rooms = pattern_list(claims.get("rooms", []))
        publish = pattern_list(claims["publish"]) if "publish" in claims else ()
        if rooms is None or publish is None:
            raise Unauthorized(
                f'invalid token: "rooms" and "publish" must be lists of at most {MAX_PATTERNS} patterns'
            )
        direct = claims.get("direct", False)
        if not isinstance(direct, bool):
            raise Unauthorized('invalid token: "direct" must be true or false')
        return grant_for(subject, rooms, publish if "publish" in claims else None,
                         expires + self.leeway, "jwt", direct)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options=_JWT_OPTIONS,
            )
        except jwt.MissingRequiredClaimError as missing:
            raise Unauthorized(f'invalid token: no "{_claim_name(missing.claim)}" claim') from None
        except jwt.InvalidTokenError as problem:
            raise Unauthorized(_jwt_refusal(problem)) from None
        except Exception as problem:  # a token no PyJWT check foresaw must not crash the connection
            log.warn("Unexpected {kind} while verifying a token", kind=type(problem).__name__)
            raise Unauthorized("invalid token") from None


def _claim_name(claim: Any) -> str:
    # PyJWT names claims it was asked to require, so this is one of ours.
    return claim if claim in ("exp", "sub", "iss", "aud") else "required"


def _jwt_refusal(problem: Exception) -> str:
    for kind, message in _JWT_REFUSALS:
        if isinstance(problem, kind):
            return message
    return "invalid token"


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The authenticator


class Authenticator:
    """Turns the token of a HELLO into a ``Grant``, or refuses the connection.

    ``api_keys`` and ``jwt`` are the configured backends (at least one).
    ``anonymous_rooms``, when given, lets a HELLO without a token in, to
    join rooms matching those patterns and publish nowhere.
    ``failures`` counts refusals by reason.
    """

    def __init__(self, api_keys: ApiKeyFile | None = None, jwt_verifier: JwtVerifier | None = None,
                 anonymous_rooms: Iterable[str] | None = None) -> None:
        if api_keys is None and jwt_verifier is None:
            raise ValueError("an Authenticator needs API keys, a JWT key or both")
        self.api_keys = api_keys
        self.jwt = jwt_verifier
        self.anonymous: Grant | None = None
        if anonymous_rooms is not None:
            patterns = compile_patterns(tuple(anonymous_rooms), "")
            self.anonymous = Grant(None, patterns, None)
        self.failures: collections.Counter[str] = collections.Counter()

    @property
    def backends(self) -> list[ApiKeyFile | JwtVerifier]:
        return [b for b in (self.api_keys, self.jwt) if b is not None]

    def authenticate(self, token: str | None, now: float, conn: str = "-",
                     certified_user_id: str | None = None) -> Grant:
        """The grant for a HELLO's ``token`` at reactor time ``now``.

        ``certified_user_id`` is the verified client certificate's name, if
        any: the token's subject must then be the same.  Raises
        ``Unauthorized``.
        """
        try:
            grant = self._grant(token, now)
            if grant.user_id is not None and certified_user_id not in (None, grant.user_id):
                raise Unauthorized("the token's subject is not the client certificate's name")
        except Unauthorized as refusal:
            self.refused(refusal, conn, token)
            raise
        log.info(
            "{conn} authenticated as {user} by {source} (token {token})",
            conn=conn,
            user=grant.user_id or "anonymous",
            source=grant.source,
            token="none" if token is None else fingerprint(token),
        )
        return grant

    def refused(self, refusal: Unauthorized, conn: str = "-", token: str | None = None) -> Unauthorized:
        """Count and log a refusal (of a token, or of a client that sent none in time)."""
        self.failures[refusal.message] += 1
        log.info(
            "{conn} authentication failed: {reason} (token {token})",
            conn=conn,
            reason=refusal.message,
            token="none" if token is None else fingerprint(token),
        )
        return refusal

    def _grant(self, token: str | None, now: float) -> Grant:
        if token is None:
            if self.anonymous is None:
                raise Unauthorized("a token is required: send HELLO with \"token\"")
            return self.anonymous
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"invalid token: longer than {MAX_TOKEN_LENGTH} characters")
        if self.api_keys is not None:
            entry = self.api_keys.lookup(token)
            if entry is not None:
                return grant_for(entry.user_id, entry.rooms, entry.publish, None, "api-key", entry.direct)
        if self.jwt is None:
            raise Unauthorized("invalid token: unknown API key")
        return self.jwt.verify(token, now)

    def reload(self) -> None:
        """Re-read every key file; one that cannot be used keeps the previous keys."""
        for backend in self.backends:
            try:
                backend.load()
            except AuthConfigError as problem:
                log.error("Kept the previous {kind}: {why}", kind=backend.kind, why=str(problem))
            else:
                count = f" ({len(backend)} keys)" if isinstance(backend, ApiKeyFile) else ""
                log.info("Reloaded {kind} from {path}{count}", kind=backend.kind,
                         path=backend.path, count=count)


class ReloadOnHangup(service.Service):
    """Re-reads the authenticator's key files on SIGHUP while running."""

    def __init__(self, authenticator: Authenticator, reactor: Any) -> None:
        self.authenticator = authenticator
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        # Out of the signal handler, into the reactor's loop.
        self.reactor.callFromThread(self.authenticator.reload)


# Command-line options (added to ``twistd relay``'s by relay.server.tap)


OPTIONS: list[list[Any]] = [
    ["auth-tokens", None, None, "JSON file of API keys (key -> {user, rooms, publish}); authentication is then required. Re-read on SIGHUP."],
    ["jwt-key", None, None, "HS256 secret file, or PEM public key (RS256, ES256, EdDSA), verifying JWT tokens; authentication is then required. Re-read on SIGHUP."],
    ["jwt-audience", None, None, "JWTs must carry this audience (aud)."],
    ["jwt-issuer", None, None, "JWTs must carry this issuer (iss)."],
    ["jwt-leeway", None, DEFAULT_LEEWAY, "Seconds of tolerance on a JWT's exp and nbf; a connection is closed at exp plus this.", non_negative_seconds],
    ["anonymous-rooms", None, None, "Comma-separated room patterns clients without a token may join (read-only), with --allow-anonymous."],
]
FLAGS: list[list[Any]] = [
    ["allow-anonymous", None, "With authentication, let clients without a token in, read-only, to the --anonymous-rooms."],
]


def anonymous_patterns(value: str) -> tuple[str, ...]:
    """The ``--anonymous-rooms`` value (comma-separated) as patterns."""
    patterns = tuple(p.strip() for p in value.split(",") if p.strip())
    if not patterns:
        raise usage.UsageError("--anonymous-rooms names no pattern")
    for pattern in patterns:
        if SUBJECT in pattern:
            raise usage.UsageError("--anonymous-rooms: an anonymous client has no {sub}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise usage.UsageError(f"--anonymous-rooms: a pattern is at most {MAX_PATTERN_LENGTH} characters")
    return patterns


def from_options(options: Any) -> Authenticator | None:
    """The authenticator that ``twistd relay`` options describe, or None.

    Raises ``usage.UsageError`` for options that make no sense together and
    for key files that cannot be used.
    """
    tokens, key = options["auth-tokens"], options["jwt-key"]
    allow_anonymous, anonymous = options["allow-anonymous"], options["anonymous-rooms"]
    if key is None:
        for needs_key in ("jwt-audience", "jwt-issuer"):
            if options[needs_key] is not None:
                raise usage.UsageError(f"--{needs_key} needs --jwt-key")
    if tokens is None and key is None:
        if allow_anonymous or anonymous is not None:
            raise usage.UsageError("--allow-anonymous and --anonymous-rooms need --auth-tokens or --jwt-key")
        return None
    if bool(allow_anonymous) != (anonymous is not None):
        raise usage.UsageError("--allow-anonymous and --anonymous-rooms go together")
    try:
        api_keys = ApiKeyFile(tokens) if tokens is not None else None
        verifier = (
            JwtVerifier(key, options["jwt-audience"], options["jwt-issuer"], options["jwt-leeway"])
            if key is not None
            else None
        )
    except AuthConfigError as problem:
        raise usage.UsageError(str(problem)) from None
    rooms = anonymous_patterns(anonymous) if anonymous is not None else None
    return Authenticator(api_keys, verifier, rooms)
