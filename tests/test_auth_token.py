"""relay-token: what it mints, the server accepts."""

from __future__ import annotations

import json
import os
import stat
import sys
import time

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from relay.server.auth import ApiKeyFile, Authenticator, JwtVerifier, Unauthorized
from relay.tools import token as relay_token
from tests.authkeys import RSA_KEY, KeyFiles, private_pem
from tests.test_service import REPO, source_env


def run(*argv: str) -> str:
    return relay_token.run(relay_token.parse_args(list(argv)))


class RelayTokenTests(unittest.TestCase):
    def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.dir = self.files.directory.path

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def test_a_new_secret_signs_tokens_the_server_verifies(self) -> None:
        secret = self.path("secret.key")
        run("--new-secret", secret)
        self.assertEqual(stat.S_IMODE(os.stat(secret).st_mode), 0o600)
        token = run("--key", secret, "--sub", "alice", "--rooms", "team-*", "user.{sub}.*",
                    "--publish", "team-ops", "--ttl", "15m")
        grant = JwtVerifier(secret, leeway=0).verify(token, time.time())
        self.assertEqual(grant.user_id, "alice")
        self.assertTrue(grant.may_join("user.alice.inbox"))
        self.assertFalse(grant.may_publish("team-a"))
        self.assertTrue(grant.may_publish("team-ops"))
        self.assertLess(abs(grant.expires_at - (time.time() + 900)), 5)

    def test_every_key_type_makes_a_pair_the_server_uses(self) -> None:
        for kind, algorithm in (("rsa", "RS256"), ("ec", "ES256"), ("ed25519", "EdDSA")):
            private = self.path(f"{kind}.pem")
            run("--new-key", kind, "--key", private)
            verifier = JwtVerifier(self.path(f"{kind}.pub.pem"), leeway=0)
            self.assertEqual(verifier.algorithms, [algorithm])
            token = run("--key", private, "--sub", "bob", "--rooms", "lobby")
            self.assertEqual(verifier.verify(token, time.time()).user_id, "bob")
            # The server refuses the private key itself.
            self.assertRaises(Exception, JwtVerifier, private)

    def test_audience_issuer_and_read_only_tokens(self) -> None:
        key = self.files.write("rsa.pem", private_pem(RSA_KEY))
        public = self.files.public_key(RSA_KEY)
        token = run("--key", key, "--sub", "alice", "--rooms", "lobby", "--no-publish",
                    "--audience", "relay", "--issuer", "https://auth.example")
        verifier = JwtVerifier(public, audience="relay", issuer="https://auth.example", leeway=0)
        grant = verifier.verify(token, time.time())
        self.assertTrue(grant.may_join("lobby"))
        self.assertFalse(grant.may_publish("lobby"))
        with self.assertRaises(Unauthorized):
            JwtVerifier(public, audience="other", leeway=0).verify(token, time.time())

    def test_api_keys_go_into_the_tokens_file(self) -> None:
        tokens = self.path("tokens.json")
        carol = run("--api-key", "--sub", "carol", "--rooms", "lobby", "--tokens-file", tokens)
        dave = run("--api-key", "--sub", "dave", "--rooms", "team-*", "--tokens-file", tokens)
        self.assertTrue(carol.startswith(relay_token.API_KEY_PREFIX))
        self.assertEqual(stat.S_IMODE(os.stat(tokens).st_mode), 0o600)
        authenticator = Authenticator(ApiKeyFile(tokens))
        self.assertEqual(authenticator.authenticate(carol, 0).user_id, "carol")
        self.assertEqual(authenticator.authenticate(dave, 0).user_id, "dave")

    def test_an_api_key_alone_is_printed_as_a_tokens_file(self) -> None:
        document = json.loads(run("--api-key", "--sub", "carol", "--rooms", "lobby"))
        ((key, entry),) = document.items()
        self.assertEqual(entry, {"user": "carol", "rooms": ["lobby"]})
        tokens = self.files.api_keys(document)
        self.assertEqual(Authenticator(ApiKeyFile(tokens)).authenticate(key, 0).user_id, "carol")

    def test_direct_grants_direct_messages_in_jwts_and_api_keys(self) -> None:
        secret = self.path("secret.key")
        run("--new-secret", secret)
        verifier = JwtVerifier(secret, leeway=0)
        granted = run("--key", secret, "--sub", "alice", "--rooms", "lobby", "--direct")
        plain = run("--key", secret, "--sub", "bob", "--rooms", "lobby")
        self.assertTrue(verifier.verify(granted, time.time()).direct)
        self.assertFalse(verifier.verify(plain, time.time()).direct)
        tokens = self.path("tokens.json")
        key = run("--api-key", "--sub", "carol", "--rooms", "lobby", "--direct", "--tokens-file", tokens)
        self.assertTrue(Authenticator(ApiKeyFile(tokens)).authenticate(key, 0).direct)

    def test_durations(self) -> None:
        self.assertEqual([relay_token.parse_duration(d) for d in ("90", "90s", "15m", "1h", "2d", "1.5h")],
                         [90, 90, 900, 3600, 172800, 5400])

    async def test_the_console_script_mints_a_token(self) -> None:
        secret = self.path("secret.key")
        run("--new-secret", secret)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "relay.tools.token", "--key", secret, "--sub", "alice", "--rooms", "team-*",
             "--ttl", "1h"],
            env=source_env(), path=str(REPO), reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        token = out.decode().strip()
        self.assertEqual(JwtVerifier(secret, leeway=0).verify(token, time.time()).user_id, "alice")

    async def test_mistakes_are_explained(self) -> None:
        short = self.files.write("short.key", b"too short")
        for argv, why in (
            (["--sub", "alice"], b"--key is required"),
            (["--key", short, "--sub", "alice"], b"at least 32 bytes"),
            (["--key", self.path("missing"), "--sub", "alice"], b"No such file"),
            (["--key", short], b"--sub is required"),
            (["--ttl", "soon", "--sub", "a", "--key", short], b"not a duration"),
        ):
            out, err, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "relay.tools.token", *argv], env=source_env(), path=str(REPO),
                reactor=reactor,
            )
            self.assertNotEqual(code, 0, argv)
            self.assertIn(why, err, argv)
