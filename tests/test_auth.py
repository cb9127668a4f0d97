"""relay.server.auth on its own: grants, the API-key file, JWT verification."""

from __future__ import annotations

import json

import tempfile

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.trial import unittest

from relay.server import auth
from relay.server.auth import (
    ApiKeyFile,
    AuthConfigError,
    Authenticator,
    JwtVerifier,
    Unauthorized,
    compile_patterns,
    fingerprint,
    grant_for,
)
from relay.server.tap import Options
from relay.wire import ErrorCode, ProtocolError
from tests.authkeys import (
    EC_KEY,
    ED25519_KEY,
    OTHER_RSA_KEY,
    OTHER_SECRET,
    RSA_KEY,
    KeyFiles,
    claims,
    hs256_signed_with,
    mint,
    private_pem,
    public_pem,
    unsigned,
)
from tests.test_service import TWISTD, source_env

NOW = 1_000_000.0


class PatternTests(unittest.TestCase):
    def test_globs_match_whole_room_names(self) -> None:
        grant = grant_for("alice", ("team-*", "lobby", "room-?"), None, None, "test")
        for room in ("team-a", "team-", "team-a.b/c", "lobby", "room-1"):
            self.assertTrue(grant.may_join(room), room)
        for room in ("lobby2", "my-team-a", "room-12", "Lobby", "TEAM-a"):
            self.assertFalse(grant.may_join(room), room)

    def test_sub_is_replaced_by_the_user_id(self) -> None:
        grant = grant_for("alice", ("user.{sub}.*",), None, None, "test")
        self.assertTrue(grant.may_join("user.alice.inbox"))
        self.assertFalse(grant.may_join("user.bob.inbox"))

    def test_glob_characters_in_the_user_id_match_only_themselves(self) -> None:
        for user, theirs, others in (
            ("*", "user.*.inbox", "user.bob.inbox"),
            ("a?", "user.a?.inbox", "user.ab.inbox"),
            ("[ab]", "user.[ab].inbox", "user.a.inbox"),
        ):
            grant = grant_for(user, ("user.{sub}.inbox",), None, None, "test")
            self.assertTrue(grant.may_join(theirs), user)
            self.assertFalse(grant.may_join(others), user)

    def test_no_rooms_means_no_room(self) -> None:
        grant = grant_for("alice", (), None, None, "test")
        self.assertFalse(grant.may_join("lobby"))
        self.assertFalse(grant.may_publish("lobby"))
        self.assertIsNone(compile_patterns((), "alice"))

    def test_publish_defaults_to_rooms_and_can_be_narrower(self) -> None:
        same = grant_for("alice", ("team-*",), None, None, "test")
        self.assertTrue(same.may_publish("team-a"))
        narrower = grant_for("alice", ("team-*",), ("team-ops",), None, "test")
        self.assertTrue(narrower.may_join("team-a"))
        self.assertFalse(narrower.may_publish("team-a"))
        self.assertTrue(narrower.may_publish("team-ops"))
        read_only = grant_for("alice", ("team-*",), (), None, "test")
        self.assertFalse(read_only.may_publish("team-a"))


class FingerprintTests(unittest.TestCase):
    def test_shows_six_characters_and_a_hash_of_the_rest(self) -> None:
        token = "secret-api-key-0123456789"
        shown = fingerprint(token)
        self.assertTrue(shown.startswith("secret…#"), shown)
        self.assertNotIn(token[6:10], shown)
        self.assertNotEqual(shown, fingerprint(token + "x"))

    def test_control_characters_never_reach_a_log_line(self) -> None:
        self.assertEqual(fingerprint("a\nb\x1b[2J")[:6], "a?b??2")


class ApiKeyFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.key = "alice-key-0123456789abcdef"
        self.path = self.files.api_keys({
            self.key: {"user": "alice", "rooms": ["team-*"], "publish": ["team-ops"]},
            "bob-key-0123456789abcdef": {"user": "bob", "rooms": ["lobby"]},
        })

    def test_a_key_gives_its_entry(self) -> None:
        keys = ApiKeyFile(self.path)
        entry = keys.lookup(self.key)
        self.assertEqual((entry.user_id, entry.rooms, entry.publish), ("alice", ("team-*",), ("team-ops",)))
        self.assertIsNone(keys.lookup("bob-key-0123456789abcdeX"))
        self.assertIsNone(keys.lookup(self.key[:-1]))

    def test_keys_are_held_as_digests_and_compared_in_constant_time(self) -> None:
        keys = ApiKeyFile(self.path)
        compared: list[tuple[bytes, bytes]] = []
        real = auth.hmac.compare_digest

        def recording(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", recording)
        self.assertIsNotNone(keys.lookup(self.key))
        self.assertEqual(len(compared), 1)
        self.assertNotIn(self.key.encode(), compared[0])
        held = repr(vars(keys))
        self.assertNotIn(self.key, held)

    def test_reload_reads_the_new_file(self) -> None:
        keys = ApiKeyFile(self.path)
        self.files.replace(self.path, json.dumps({"carol-key-0123456789": {"user": "carol"}}))
        keys.load()
        self.assertIsNone(keys.lookup(self.key))
        self.assertEqual(keys.lookup("carol-key-0123456789").rooms, ())

    def test_a_bad_file_keeps_the_keys_held_and_says_why_without_quoting_keys(self) -> None:
        keys = ApiKeyFile(self.path)
        for document, why in (
            ("{not json", "not valid JSON"),
            ('["a list"]', "JSON object"),
            (json.dumps({"leaked-key-0123456789": "alice"}), "entry 1"),
            (json.dumps({"leaked-key-0123456789": {"user": ""}}), '"user"'),
            (json.dumps({"leaked-key-0123456789": {"user": "a", "rooms": "team-*"}}), '"rooms"'),
            (json.dumps({"leaked-key-0123456789": {"user": "a", "publish": [1]}}), '"publish"'),
        ):
            self.files.replace(self.path, document)
            with self.assertRaises(AuthConfigError) as raised:
                keys.load()
            self.assertIn(why, str(raised.exception))
            self.assertNotIn("leaked", str(raised.exception))
            self.assertIsNotNone(keys.lookup(self.key), document)

    def test_a_missing_file_is_a_config_error(self) -> None:
        with self.assertRaises(AuthConfigError) as raised:
            ApiKeyFile(self.path + ".missing")
        self.assertIn("cannot read", str(raised.exception))


class JwtKeyTests(unittest.TestCase):
    """The key decides the algorithms; a key that cannot be trusted is refused."""

    def setUp(self) -> None:
        self.files = KeyFiles(self)

    def test_algorithm_follows_from_the_key_type(self) -> None:
        for private, algorithm in ((RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED25519_KEY, "EdDSA")):
            verifier = JwtVerifier(self.files.public_key(private))
            self.assertEqual(verifier.algorithms, [algorithm])
        self.assertEqual(JwtVerifier(self.files.secret()).algorithms, ["HS256"])

    def test_other_curves_get_their_own_algorithm(self) -> None:
        p384 = ec.generate_private_key(ec.SECP384R1())
        self.assertEqual(JwtVerifier(self.files.public_key(p384)).algorithms, ["ES384"])

    def test_unusable_keys_are_refused_with_a_reason(self) -> None:
        small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        secp256k1 = ec.generate_private_key(ec.SECP256K1())
        for data, why in (
            (b"too short\n", "at least 32 bytes"),
            (private_pem(RSA_KEY), "private key"),
            (public_pem(small_rsa), "at least 2048 bits"),
            (public_pem(secp256k1), "curve"),
            (b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", "not a PEM"),
        ):
            path = self.files.write("key.pem", data)
            with self.assertRaises(AuthConfigError) as raised:
                JwtVerifier(path)
            self.assertIn(why, str(raised.exception))

    def test_a_certificate_gives_its_public_key(self) -> None:
        import trustme

        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        path = self.files.write("cert.pem", ca.cert_pem.bytes())
        self.assertEqual(JwtVerifier(path).algorithms, ["RS256"])


class JwtVerificationTests(unittest.TestCase):
    """Every way a token can be wrong is UNAUTHORIZED, saying why in words of ours."""

    def setUp(self) -> None:
        files = KeyFiles(self)
        self.hs256 = JwtVerifier(files.secret(), leeway=0)
        self.rs256 = JwtVerifier(files.public_key(RSA_KEY, "rsa.pem"), leeway=0)
        self.strict = JwtVerifier(files.secret(), audience="relay", issuer="https://auth.example", leeway=0)

    def refused(self, verifier: JwtVerifier, token: str, now: float = NOW) -> str:
        with self.assertRaises(Unauthorized) as raised:
            verifier.verify(token, now)
        self.assertIsInstance(raised.exception, ProtocolError)
        self.assertIs(raised.exception.code, ErrorCode.UNAUTHORIZED)
        return raised.exception.message

    def test_a_good_token_gives_its_grant(self) -> None:
        grant = self.hs256.verify(mint(claims(rooms=["team-*"], publish=["team-ops"])), NOW)
        self.assertEqual(grant.user_id, "alice")
        self.assertTrue(grant.may_join("team-a"))
        self.assertFalse(grant.may_publish("team-a"))
        self.assertEqual(grant.expires_at, NOW + 3600)

    def test_every_asymmetric_key_type_verifies(self) -> None:
        files = KeyFiles(self)
        for private in (RSA_KEY, EC_KEY, ED25519_KEY):
            verifier = JwtVerifier(files.public_key(private, f"{id(private)}.pem"), leeway=0)
            self.assertEqual(verifier.verify(mint(claims(), private), NOW).user_id, "alice")

    def test_alg_none_is_refused(self) -> None:
        self.assertIn("algorithm", self.refused(self.hs256, unsigned(claims())))
        self.assertIn("algorithm", self.refused(self.rs256, unsigned(claims())))

    def test_a_token_signed_with_another_key_is_refused(self) -> None:
        self.assertIn("bad signature", self.refused(self.hs256, mint(claims(), OTHER_SECRET)))
        self.assertIn("bad signature", self.refused(self.rs256, mint(claims(), OTHER_RSA_KEY)))

    def test_hs256_signed_with_the_rsa_public_key_is_refused(self) -> None:
        forged = hs256_signed_with(public_pem(RSA_KEY), claims())
        self.assertIn("algorithm not accepted", self.refused(self.rs256, forged))

    def test_an_asymmetric_token_for_an_hmac_server_is_refused(self) -> None:
        self.assertIn("algorithm not accepted", self.refused(self.hs256, mint(claims(), RSA_KEY)))

    def test_exp_is_required(self) -> None:
        self.assertEqual(self.refused(self.hs256, mint(claims(exp=None))),
                         'invalid token: no "exp" claim')
        self.assertIn('"exp" must be a number', self.refused(self.hs256, mint(claims(exp="soon"))))

    def test_sub_is_required_and_bounded(self) -> None:
        self.assertEqual(self.refused(self.hs256, mint(claims(sub=None))), 'invalid token: no "sub" claim')
        self.assertIn('"sub"', self.refused(self.hs256, mint(claims(sub="x" * 129))))
        self.assertIn('"sub"', self.refused(self.hs256, mint(claims(sub="a\nb"))))

    def test_an_expired_token_is_refused_from_exp_plus_leeway(self) -> None:
        token = mint(claims(ttl=60))
        self.assertEqual(self.hs256.verify(token, NOW + 60).user_id, "alice")
        self.assertEqual(self.refused(self.hs256, token, NOW + 60.5), "token expired")
        lenient = JwtVerifier(KeyFiles(self).secret(), leeway=30)
        self.assertEqual(lenient.verify(token, NOW + 89).expires_at, NOW + 90)
        self.assertEqual(self.refused(lenient, token, NOW + 91), "token expired")

    def test_a_token_not_yet_valid_is_refused(self) -> None:
        self.assertEqual(self.refused(self.hs256, mint(claims(nbf=NOW + 10))), "token not yet valid")

    def test_wrong_audience_or_issuer_is_refused(self) -> None:
        good = claims(aud="relay", iss="https://auth.example")
        self.assertEqual(self.strict.verify(mint(good), NOW).user_id, "alice")
        self.assertIn("wrong audience", self.refused(self.strict, mint({**good, "aud": "other"})))
        self.assertIn("wrong issuer", self.refused(self.strict, mint({**good, "iss": "https://evil"})))
        self.assertIn('no "aud"', self.refused(self.strict, mint(claims(iss="https://auth.example"))))
        self.assertIn('no "iss"', self.refused(self.strict, mint(claims(aud="relay"))))

    def test_garbage_is_refused_without_quoting_it(self) -> None:
        for garbage in ("not a token", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.", "\x00\xff", "..", "e30.e30.e30"):
            message = self.refused(self.hs256, garbage)
            self.assertTrue(message.startswith("invalid token"), message)
            self.assertNotIn(garbage, message)

    def test_malformed_room_claims_are_refused(self) -> None:
        for body in (claims(rooms="team-*"), claims(rooms=[1]), claims(publish={"a": 1}),
                     claims(rooms=["x" * 257]), claims(rooms=["r"] * 257)):
            self.assertIn('"rooms"', self.refused(self.hs256, mint(body)))

    def test_no_rooms_claim_means_no_room(self) -> None:
        body = claims()
        del body["rooms"]
        grant = self.hs256.verify(mint(body), NOW)
        self.assertFalse(grant.may_join("team-a"))


class AuthenticatorTests(unittest.TestCase):
    def setUp(self) -> None:
        files = KeyFiles(self)
        self.api_key = "carol-key-0123456789abcdef"
        self.keys = ApiKeyFile(files.api_keys({self.api_key: {"user": "carol", "rooms": ["lobby"]}}))
        self.jwt = JwtVerifier(files.secret(), leeway=0)

    def test_both_backends_are_tried(self) -> None:
        both = Authenticator(self.keys, self.jwt)
        self.assertEqual(both.authenticate(self.api_key, NOW).user_id, "carol")
        self.assertEqual(both.authenticate(mint(claims()), NOW).user_id, "alice")
        with self.assertRaises(Unauthorized):
            both.authenticate("carol-key-0123456789abcdeX", NOW)

    def test_api_keys_alone_name_an_unknown_key(self) -> None:
        with self.assertRaises(Unauthorized) as raised:
            Authenticator(self.keys).authenticate("nope", NOW)
        self.assertEqual(raised.exception.message, "invalid token: unknown API key")

    def test_a_huge_token_is_refused_before_any_parsing(self) -> None:
        verified: list[str] = []
        self.patch(self.jwt, "verify", lambda token, now: verified.append(token))
        with self.assertRaises(Unauthorized) as raised:
            Authenticator(self.keys, self.jwt).authenticate("a" * 1_000_000, NOW)
        self.assertIn("longer than 8192", raised.exception.message)
        self.assertEqual(verified, [])

    def test_no_token_is_refused_unless_anonymous_access_is_on(self) -> None:
        with self.assertRaises(Unauthorized):
            Authenticator(self.keys).authenticate(None, NOW)
        anonymous = Authenticator(self.keys, anonymous_rooms=["public-*"]).authenticate(None, NOW)
        self.assertIsNone(anonymous.user_id)
        self.assertTrue(anonymous.may_join("public-news"))
        self.assertFalse(anonymous.may_publish("public-news"))
        self.assertFalse(anonymous.may_join("lobby"))

    def test_the_certificate_name_must_be_the_subject(self) -> None:
        authenticator = Authenticator(self.keys, self.jwt)
        self.assertEqual(authenticator.authenticate(mint(claims()), NOW, certified_user_id="alice").user_id,
                         "alice")
        with self.assertRaises(Unauthorized):
            authenticator.authenticate(mint(claims()), NOW, certified_user_id="mallory")

    def test_failures_are_counted_by_reason(self) -> None:
        authenticator = Authenticator(self.keys, self.jwt)
        for token in ("x", "y", None):
            with self.assertRaises(Unauthorized):
                authenticator.authenticate(token, NOW)
        self.assertEqual(authenticator.failures["invalid token: malformed"], 2)
        self.assertEqual(sum(authenticator.failures.values()), 3)


class OptionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.files = KeyFiles(self)

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_no_auth_options_no_authenticator(self) -> None:
        options = self.parse()
        self.assertIsNone(options["authenticator"])
        self.assertEqual(options.config().hello_timeout, 10.0)

    def test_options_build_the_authenticator(self) -> None:
        options = self.parse(
            "--jwt-key", self.files.secret(), "--jwt-audience", "relay", "--jwt-issuer", "iss",
            "--jwt-leeway", "5", "--auth-tokens", self.files.api_keys({}),
            "--allow-anonymous", "--anonymous-rooms", "public-*, news", "--hello-timeout", "2.5",
        )
        authenticator = options["authenticator"]
        self.assertEqual((authenticator.jwt.audience, authenticator.jwt.issuer, authenticator.jwt.leeway),
                         ("relay", "iss", 5.0))
        self.assertTrue(authenticator.anonymous.may_join("news"))
        self.assertEqual(options.config().hello_timeout, 2.5)

    def test_options_that_make_no_sense_are_usage_errors(self) -> None:
        secret = self.files.secret()
        for argv in (
            ["--jwt-audience", "relay"],
            ["--jwt-issuer", "x", "--auth-tokens", self.files.api_keys({})],
            ["--allow-anonymous"],
            ["--jwt-key", secret, "--allow-anonymous"],
            ["--jwt-key", secret, "--anonymous-rooms", "public-*"],
            ["--jwt-key", secret, "--allow-anonymous", "--anonymous-rooms", "user.{sub}"],
            ["--jwt-key", secret, "--jwt-leeway", "-1"],
            ["--jwt-key", self.files.write("short.key", b"short")],
            ["--auth-tokens", self.files.write("bad.json", b"{")],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    async def test_twistd_help_lists_the_auth_options_with_their_defaults(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["relay", "--help"], env=source_env(), path=tempfile.mkdtemp(), reactor=reactor
        )
        self.assertEqual(code, 0, err)
        help_text = b" ".join(out.split())
        for expected in (b"--auth-tokens=", b"--jwt-key=", b"--jwt-audience=", b"--jwt-issuer=",
                         b"--jwt-leeway=", b"[default: 30.0]", b"--hello-timeout=", b"[default: 10.0]",
                         b"--allow-anonymous", b"--anonymous-rooms=", b"Re-read on SIGHUP"):
            self.assertIn(expected, help_text)
