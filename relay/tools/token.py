"""relay-token: mint tokens and keys for a Relay server that requires them.

For local development, tests and the documentation's examples, so they need
no other tool::

    relay-token --new-secret secret.key                  # an HS256 secret
    relay-token --key secret.key --sub alice --rooms 'team-*' --ttl 1h
    relay-token --new-key ed25519 --key signing.pem      # signing.pem + signing.pub.pem
    relay-token --key signing.pem --sub bob --rooms 'user.{sub}.*'
    relay-token --api-key --sub carol --rooms lobby --tokens-file tokens.json

A JWT is printed on standard output.  The algorithm follows from the key:
HS256 for a secret, RS256, ES256/384/512 or EdDSA for a PEM private key.
In production, an application backend mints tokens itself (docs/auth.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import tempfile
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

DEFAULT_TTL = "1h"
# What the server requires of an HS256 secret, and what --new-secret makes.
MIN_SECRET_BYTES = 32
NEW_SECRET_BYTES = 48
API_KEY_PREFIX = "relay_"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
KEY_TYPES = ("rsa", "ec", "ed25519")


class TokenError(Exception):
    """A request this tool cannot carry out; the message says why."""


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``7d``."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def signing_key(path: str) -> tuple[Any, str]:
    """The key in ``path`` and the algorithm it signs with."""
    with open(path, "rb") as file:
        data = file.read()
    if b"-----BEGIN" not in data:
        secret = data.strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise TokenError(f"{path}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        return secret, "HS256"
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TokenError(f"{path}: not an unencrypted PEM private key (or an HS256 secret)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVE_ALGORITHMS:
        return key, _CURVE_ALGORITHMS[key.curve.name]
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key, "EdDSA"
    raise TokenError(f"{path}: this kind of key cannot sign a Relay JWT")


def claims_for(sub: str, rooms: list[str], publish: list[str] | None, ttl: float,
               now: float, audience: str | None = None, issuer: str | None = None) -> dict[str, Any]:
    """The claims of a Relay JWT; ``publish`` None leaves the claim out (= rooms)."""
    claims: dict[str, Any] = {"sub": sub, "rooms": rooms, "iat": int(now), "exp": int(now + ttl)}
    if publish is not None:
        claims["publish"] = publish
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return claims


def mint_jwt(key_path: str, claims: dict[str, Any]) -> str:
    """A JWT of ``claims`` signed with the key in ``key_path``."""
    key, algorithm = signing_key(key_path)
    return jwt.encode(claims, key, algorithm=algorithm)


def api_key_entry(sub: str, rooms: list[str], publish: list[str] | None) -> dict[str, Any]:
    """An entry of the server's ``--auth-tokens`` file."""
    entry: dict[str, Any] = {"user": sub, "rooms": rooms}
    if publish is not None:
        entry["publish"] = publish
    return entry


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def add_api_key(path: str, key: str, entry: dict[str, Any]) -> None:
    """Add ``key`` to the API-key file at ``path`` (created if missing), atomically."""
    document: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, "rb") as file:
            document = json.loads(file.read() or b"{}")
        if not isinstance(document, dict):
            raise TokenError(f"{path}: not a JSON object of API keys")
    document[key] = entry
    write_private(path, json.dumps(document, indent=2).encode() + b"\n")


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by its owner only, replacing it at once."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".relay-token-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def new_key_pair(kind: str) -> tuple[bytes, bytes]:
    """A fresh private key (PKCS#8 PEM) and its public key (SPKI PEM)."""
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def public_key_path(private_path: str) -> str:
    stem, extension = os.path.splitext(private_path)
    return f"{stem}.pub{extension or '.pem'}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="relay-token",
        description="Mint a JWT or an API key for a Relay server, or make the keys to sign them.",
        epilog="Examples:\n"
               "  relay-token --new-secret secret.key\n"
               "  relay-token --key secret.key --sub alice --rooms 'team-*' --ttl 1h\n"
               "  relay-token --new-key ed25519 --key signing.pem\n"
               "  relay-token --api-key --sub carol --rooms lobby --tokens-file tokens.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--api-key", action="store_true",
                      help="mint an API key for --auth-tokens instead of a JWT")
    mode.add_argument("--new-secret", metavar="FILE",
                      help="write a new random HS256 secret to FILE and exit")
    mode.add_argument("--new-key", choices=KEY_TYPES,
                      help="write a new private key to --key and its public key next to it, and exit")
    parser.add_argument("--key", metavar="FILE",
                        help="signing key: an HS256 secret file or a PEM private key")
    parser.add_argument("--public-key", metavar="FILE",
                        help="with --new-key, where the public key goes [default: KEY.pub.pem]")
    parser.add_argument("--sub", help="the user id the token gives")
    parser.add_argument("--rooms", nargs="+", action="extend", default=None, metavar="PATTERN",
                        help="room patterns the user may join ('team-*', 'user.{sub}.*'; repeatable)")
    parser.add_argument("--publish", nargs="+", action="extend", default=None, metavar="PATTERN",
                        help="room patterns the user may publish to [default: the --rooms]")
    parser.add_argument("--no-publish", action="store_true", help="the user may publish nowhere")
    parser.add_argument("--direct", action="store_true",
                        help="the user may send direct messages to other users (the direct extension)")
    parser.add_argument("--ttl", type=parse_duration, default=parse_duration(DEFAULT_TTL),
                        help=f"lifetime of a JWT: 90s, 15m, 1h, 7d [default: {DEFAULT_TTL}]")
    parser.add_argument("--audience", help="the JWT's aud claim (the server's --jwt-audience)")
    parser.add_argument("--issuer", help="the JWT's iss claim (the server's --jwt-issuer)")
    parser.add_argument("--tokens-file", metavar="FILE",
                        help="with --api-key, add the key to this --auth-tokens file (created if missing)")
    options = parser.parse_args(argv)
    if options.new_secret is None and options.new_key is None:
        if not options.sub:
            parser.error("--sub is required")
        if not options.api_key and not options.key:
            parser.error("--key is required to sign a JWT (relay-token --new-secret FILE makes one)")
    if options.new_key is not None and not options.key:
        parser.error("--new-key needs --key, where the private key goes")
    if options.no_publish and options.publish:
        parser.error("--no-publish and --publish exclude each other")
    return options


def run(options: argparse.Namespace) -> str:
    """Carry out what ``options`` ask; returns what to print."""
    if options.new_secret is not None:
        write_private(options.new_secret, secrets.token_urlsafe(NEW_SECRET_BYTES).encode() + b"\n")
        return f"wrote a new HS256 secret to {options.new_secret}"
    if options.new_key is not None:
        private, public = new_key_pair(options.new_key)
        public_path = options.public_key or public_key_path(options.key)
        write_private(options.key, private)
        with open(public_path, "wb") as file:
            file.write(public)
        return f"wrote the private key to {options.key} and the public key to {public_path}"
    rooms = options.rooms or []
    publish = [] if options.no_publish else options.publish
    if options.api_key:
        key, entry = new_api_key(), api_key_entry(options.sub, rooms, publish)
        if options.direct:
            entry["direct"] = True
        if options.tokens_file is None:
            return json.dumps({key: entry}, indent=2)
        add_api_key(options.tokens_file, key, entry)
        return key
    claims = claims_for(options.sub, rooms, publish, options.ttl, time.time(),
                        options.audience, options.issuer)
    if options.direct:
        claims["direct"] = True
    return mint_jwt(options.key, claims)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``relay-token``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(run(options))
    except (OSError, TokenError, ValueError) as problem:
        sys.stderr.write(f"relay-token: {problem}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
