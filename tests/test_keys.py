"""The audit key: made once per user with 0600, overridable for CI, never shown; keyed streams and ids."""

from __future__ import annotations

import stat

import pytest

from audit.errors import AuditError
from audit.keys import KEY_ENV, KEY_FILE_ENV, AuditKey, resolve_key, write_key_file
from audit.rng import SeededStream


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    return tmp_path


def test_the_default_key_is_created_once_private_and_then_reused(home):
    first = resolve_key()
    path = home / "config" / "canary-audit" / "key"
    assert first.source == f"file:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert resolve_key().secret == first.secret and len(first.secret) == 32


def test_the_environment_wins_over_files_and_a_bad_key_is_one_line(home, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert resolve_key(key_file="/nonexistent").secret == bytes.fromhex("ab" * 32)
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(AuditError, match=r"\$CANARY_AUDIT_KEY is not 64 hex digits"):
        resolve_key()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuditError, match="audit key file /nonexistent \\(canaries.key_file\\) does not exist"):
        resolve_key(key_file="/nonexistent")


def test_a_key_file_others_can_read_is_refused(home):
    path = write_key_file(home / "shared.key")
    path.chmod(0o644)
    with pytest.raises(AuditError, match="is readable by others .* chmod 600"):
        resolve_key(key_file=path)
    path.chmod(0o600)
    assert resolve_key(key_file=path).source == f"file:{path}"


def test_write_key_file_never_overwrites_a_key(home):
    path = write_key_file(home / "k")
    before = path.read_text()
    write_key_file(path)
    assert path.read_text() == before


def test_the_key_id_names_the_key_without_revealing_it():
    a, b = AuditKey(b"\x01" * 32, source="test"), AuditKey(b"\x02" * 32, source="test")
    assert a.id != b.id and len(a.id) == 16 and a.id == AuditKey(b"\x01" * 32, source="other").id
    assert (b"\x01" * 32).hex() not in repr(a) and "01010101" not in repr(a) and a.id in repr(a)
    assert a.digest("x", "y") != b.digest("x", "y") and a.digest("x", "y") != a.digest("xy")  # parts are separated


def test_a_keyed_stream_is_deterministic_per_key_and_unrelated_to_the_plain_one():
    def draw(key):
        s = SeededStream(7, "canaries:digits:v1:pool", key=key)
        return [s.below(10**6) for _ in range(20)]

    assert draw(b"k" * 32) == draw(b"k" * 32)
    assert draw(b"k" * 32) != draw(b"j" * 32)
    assert draw(None) == draw(None) and draw(None) != draw(b"k" * 32)
