"""The fuzz campaign's short version: the same harness, for seconds, in CI.

The long campaign (10 million inputs and more) and its last figures are in
docs/security.md.  Here atheris runs the harness over a fresh seed corpus
for a bounded number of inputs, and hypothesis feeds it too, so a broken
property fails CI even where atheris is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from relay.tools import fuzz_wire
from tests.test_service import REPO, source_env

streams = st.lists(
    st.one_of(st.sampled_from(fuzz_wire.seed_streams()), st.binary(max_size=64)), max_size=6
).map(b"".join)


class FuzzHarnessTests(unittest.TestCase):
    @settings(max_examples=500, deadline=None)
    @given(split=st.integers(0, 255), stream=streams)
    def test_the_harness_properties_hold_for_generated_streams(self, split: int, stream: bytes) -> None:
        fuzz_wire.test_one_input(bytes([split]) + stream)

    def test_the_harness_catches_a_broken_property(self) -> None:
        self.patch(fuzz_wire, "MAX_MESSAGE", 5)
        with self.assertRaises(AssertionError):
            fuzz_wire.test_one_input(b"\x00" + b"\x00\x00\x00\x02\x01\x05\x00")

    async def test_a_short_coverage_guided_run_finds_nothing(self) -> None:
        if importlib.util.find_spec("atheris") is None:
            raise unittest.SkipTest("atheris is not installed (pip install atheris)")
        corpus = tempfile.mkdtemp(prefix="relay-fuzz-")
        fuzz_wire.write_seed_corpus(corpus)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "relay.tools.fuzz_wire", "-runs=20000", "-max_len=4096", "-seed=1", corpus],
            env=source_env(),
            path=str(REPO),
        )
        self.assertEqual(code, 0, err[-3000:].decode(errors="replace"))
        self.assertIn(b"Done 20000 runs", err)
