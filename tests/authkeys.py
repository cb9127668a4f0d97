"""Keys and tokens made per test run, for the authentication tests.

Keys come from ``cryptography``, tokens are signed with PyJWT, and files are
written to a temporary directory the test removes.  Nothing here is a
fixture from disk: every run uses keys no other run has seen.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.python.filepath import FilePath
from twisted.trial import unittest

SECRET = secrets.token_urlsafe(48).encode()
OTHER_SECRET = secrets.token_urlsafe(48).encode()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
# What each private key signs with, as the server infers from its public key.
ALGORITHMS = {id(RSA_KEY): "RS256", id(OTHER_RSA_KEY): "RS256", id(EC_KEY): "ES256",
              id(ED25519_KEY): "EdDSA"}


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(private_key: Any) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def claims(sub: str = "alice", rooms: list[str] | None = None, ttl: float = 3600,
           now: float | None = None, **extra: Any) -> dict[str, Any]:
    """Claims of a token for ``sub``, valid for ``ttl`` seconds from ``now``."""
    now = 1_000_000.0 if now is None else now
    body: dict[str, Any] = {"sub": sub, "rooms": ["team-*"] if rooms is None else rooms,
                            "exp": int(now + ttl)}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def mint(body: dict[str, Any], key: Any = SECRET, algorithm: str | None = None) -> str:
    """A JWT of ``body``; the algorithm follows from the key unless given."""
    if algorithm is None:
        algorithm = "HS256" if isinstance(key, bytes) else ALGORITHMS[id(key)]
    return jwt.encode(body, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_signed_with(secret: bytes, body: dict[str, Any]) -> str:
    """An HS256 JWT signed by hand with ``secret``: PyJWT refuses to sign
    with a PEM key as HMAC secret, which is exactly the forgery to test."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def unsigned(body: dict[str, Any]) -> str:
    """A JWT with ``alg: none`` and no signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(body).encode())}."


class KeyFiles:
    """Key and token files in a temporary directory, removed after the test."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.directory = FilePath(tempfile.mkdtemp(prefix="relay-auth-"))
        case.addCleanup(self.directory.remove)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.directory.child(name)
        path.setContent(data.encode() if isinstance(data, str) else data)
        return path.path

    def secret(self, secret: bytes = SECRET) -> str:
        return self.write("secret.key", secret + b"\n")

    def public_key(self, private_key: Any, name: str = "public.pem") -> str:
        return self.write(name, public_pem(private_key))

    def api_keys(self, document: Any, name: str = "tokens.json") -> str:
        return self.write(name, json.dumps(document))

    def replace(self, path: str, data: bytes | str) -> None:
        """Rewrite ``path`` as an editor would: a new file renamed over it."""
        temporary = path + ".new"
        with open(temporary, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
