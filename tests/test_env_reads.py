"""Environment variables as dfpgen reads them (dfpgen.env): every change visible at once."""
import os

import pytest

from dfpgen import env
from dfpgen.threads import num_threads


def test_raw_sees_every_change_of_os_environ(monkeypatch):
    name = "DFPGEN_TEST_ENV_READ"
    monkeypatch.delenv(name, raising=False)
    assert env.raw(name) is None
    monkeypatch.setenv(name, "  7 ")
    assert env.raw(name) == "7"
    monkeypatch.setenv(name, "   ")
    assert env.raw(name) is None            # blank means unset
    monkeypatch.setenv(name, "\u00e9t\u00e9")
    assert env.raw(name) == "\u00e9t\u00e9"  # non-ASCII values decode as os.environ does
    os.environ.pop(name)
    assert env.raw(name) is None
    monkeypatch.setenv("DFPGEN_NUM_THREADS", "3")
    assert num_threads() == 3


def test_raw_follows_a_replaced_os_environ(monkeypatch):
    # os.environ rebound to another mapping: read that one, not the mapping seen at import
    monkeypatch.setattr(os, "environ", {"DFPGEN_TEST_ENV_READ": "5"})
    assert env.raw("DFPGEN_TEST_ENV_READ") == "5"
    assert env.integer("DFPGEN_TEST_ENV_READ", 0) == 5


def test_a_bad_value_is_still_a_one_line_error(monkeypatch):
    monkeypatch.setenv("DFPGEN_NUM_THREADS", "many")
    with pytest.raises(env.DfpError, match="DFPGEN_NUM_THREADS"):
        num_threads()
