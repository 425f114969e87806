"""The audit key: the one secret that canary secrets and ids derive from, never logged.

Why a key and not just the seed: the seed is in the recipe, and the recipe is logged to MLflow as params (it has
to be: a run must say how it was made). When secrets derived from the seed alone, anyone who could read the
experiment regenerated every canary byte for byte with ``audit inject``; and ids were unsalted hashes of the
secret, so a 10^6 digit space fell to enumeration of the id in seconds. Now:

- secrets, roles and exposure references are drawn from :class:`audit.core.rng.SeededStream` keyed with HMAC-SHA256
  under this key (``seed`` still selects the draw, so recipe + seed + key give byte-identical canaries);
- canary ids are HMAC-SHA256 under the key, so an id checks a guess only for whoever holds the key;
- what is logged about the key is its id, ``HMAC(key, "canary-audit key id")[:16]``: it tells two keys apart
  (a run refuses to resume under another key) and reveals nothing about the key or any secret.

Where the key comes from, first match wins (:func:`resolve_key`):
``$CANARY_AUDIT_KEY`` (64 hex digits, for CI secrets) > ``$CANARY_AUDIT_KEY_FILE`` > the recipe's
``canaries.key_file`` > the per-user file ``$XDG_CONFIG_HOME/canary-audit/key`` (``~/.config/...``), created on
first use with 32 random bytes, mode 0600 in a 0700 folder. Shared audits (two machines that must draw the same
canaries) share one key file; a team that wants its runs unlinkable gives each audit its own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from audit.core.errors import AuditError

KEY_BYTES = 32
KEY_ENV = "CANARY_AUDIT_KEY"
KEY_FILE_ENV = "CANARY_AUDIT_KEY_FILE"
_ID_MESSAGE = b"canary-audit key id"


@dataclass(frozen=True)
class AuditKey:
    secret: bytes
    """32 bytes; never printed, logged or written outside its key file (``repr`` hides it)."""
    source: str
    """Where it came from: ``env:CANARY_AUDIT_KEY``, ``file:<path>`` (a path, not the key: safe to record)."""

    @property
    def id(self) -> str:
        """A public name for the key: 16 hex digits of HMAC(key, constant). Safe to log."""
        return hmac.new(self.secret, _ID_MESSAGE, hashlib.sha256).hexdigest()[:16]

    def digest(self, *parts: str) -> str:
        """HMAC-SHA256 of ``parts`` (unit-separated) under the key, hex: a keyed content hash."""
        message = "\x1f".join(parts).encode("utf-8")
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:  # dataclass's repr would print the bytes
        return f"AuditKey(id={self.id}, source={self.source})"


def default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "canary-audit" / "key"


def resolve_key(key_file: str | Path | None = None, *, create: bool = True) -> AuditKey:
    """The audit key (see the module docstring for the order); the default file is made on first use."""
    env = os.environ.get(KEY_ENV)
    if env is not None:
        return AuditKey(_parse_hex(env.strip(), where=f"${KEY_ENV}"), source=f"env:{KEY_ENV}")
    chosen = os.environ.get(KEY_FILE_ENV) or key_file
    if chosen:
        path = Path(chosen).expanduser()
        where = f"${KEY_FILE_ENV}" if os.environ.get(KEY_FILE_ENV) else "canaries.key_file"
        if path.is_dir():
            raise AuditError(f"audit key file {path} ({where}) is a directory, not a key file",
                             fix=f"point {where} at the key file itself, or make one with `audit key --new {path / 'key'}`")
        if not path.is_file():
            raise AuditError(f"audit key file {path} ({where}) does not exist",
                             fix=f"create one with `audit key --new {path}`, or unset {where} to use your default key")
        return AuditKey(read_key_file(path), source=f"file:{path}")
    path = default_key_file()
    if not path.exists():
        if not create:
            raise AuditError(f"no audit key at {path}", fix="run `audit key` to create it")
        write_key_file(path)
    return AuditKey(read_key_file(path), source=f"file:{path}")


def write_key_file(path: Path) -> Path:
    """Create ``path`` holding a new random key (64 hex digits), 0600, its folder 0700; never overwrite a key.

    Atomic, because several processes may make the default key at once (parallel first audits, a test matrix): the
    key is written whole to a private temporary file in the same folder, then hard-linked to ``path``. The link
    either puts the complete file there or fails because a key is already there (another process linked its own
    first), and then that key is the one used, so no process ever reads a half-written key or sees an error.
    """
    import tempfile

    _make_key_folder(path.parent)
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".key-", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                pass  # another process linked a whole key first: use theirs
        finally:
            os.unlink(temp)
    except OSError as exc:
        raise AuditError(f"cannot write the audit key file {path} ({exc.strerror or type(exc).__name__})",
                         fix=f"make {path.parent} a folder you can write, or set ${KEY_FILE_ENV} to a key file") from None
    return path


def _make_key_folder(folder: Path) -> None:
    """``folder`` (0700 when made here); a file in its way is one line naming that file."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise AuditError(f"cannot make the audit key folder {folder}: {blocking} is a file, not a folder",
                         fix=f"move {blocking} away, or set ${KEY_FILE_ENV} (or $XDG_CONFIG_HOME) elsewhere") from None
    except OSError as exc:
        raise AuditError(f"cannot make the audit key folder {folder} ({exc.strerror or type(exc).__name__})",
                         fix=f"set ${KEY_FILE_ENV} (or $XDG_CONFIG_HOME) to a place you can write") from None


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read the audit key file {path} ({type(exc).__name__})",
                         fix="check the file's permissions, or make a new key with `audit key --new PATH`") from None
    mode = path.stat().st_mode & 0o077
    if mode:
        raise AuditError(f"audit key file {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)})",
                         fix=f"chmod 600 {path} (anyone who reads it can regenerate every canary secret)")
    return _parse_hex(text, where=str(path))


def _parse_hex(text: str, *, where: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise AuditError(f"the audit key in {where} is not {KEY_BYTES * 2} hex digits",
                         fix="make one with `python -c 'import secrets; print(secrets.token_hex(32))'`")
    return raw
