"""API keys, as both sides handle them: client keys (digests) and workers' upstream keys (references).

Role: the one place that knows the formats. The coordinator turns the ``api_key`` setting and the
``api_key_file`` into :class:`shm.schema.ClientKey` entries (name + SHA-256 digest) and checks
workers' upstream key references at load time; each proxy resolves a worker's reference
(``env:NAME`` or ``file:PATH``) itself, from its own environment or the file, when it takes a
snapshot (:mod:`proxy_workers.serving.auth`).

Invariants:
- A client key crosses into shared memory only as its SHA-256 digest; an upstream key never
  crosses at all (only its reference does).
- Nothing here logs or formats a key into a message; errors name the file and line, or the
  variable, never the value.
- A usable key is one visible-ASCII token (no space, no control character): it goes into an HTTP
  header line as it is, so a CR or LF must never reach that line.
"""

from __future__ import annotations

import hashlib
import os
import re

from shm.schema import ClientKey

_TOKEN = re.compile(r"^[\x21-\x7e]+$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
SETTING_KEY_NAME = "api_key"  # the name the ``api_key`` setting's key goes by in logs


class KeySourceError(ValueError):
    """A key source that cannot be used; ``str()`` names where, never the key."""


def digest(key: bytes) -> str:
    """The hex SHA-256 of a key: what snapshots carry and what proxies compare."""
    return hashlib.sha256(key).hexdigest()


def usable(key: str) -> bool:
    return bool(_TOKEN.match(key))


def parse_key_lines(text: str, where: str) -> list[ClientKey]:
    """The keys of an ``api_key_file``: ``KEY``, ``NAME:KEY`` or ``NAME:sha256:HEX`` per line.

    Blank lines and lines starting with ``#`` are skipped. A key without a name is named
    ``key-`` + the first 8 hex digits of its digest (stable across edits of the file, and not the
    key). Raises :class:`KeySourceError` naming the line (never its content) on a malformed one.
    """
    keys: list[ClientKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        if not sep:  # a bare key
            if not usable(line):
                raise KeySourceError(f"{where} line {number}: a key must be printable ASCII without spaces")
            hexdigest = digest(line.encode())
            keys.append(ClientKey(name=f"key-{hexdigest[:8]}", sha256=hexdigest))
            continue
        if not name or not usable(name):
            raise KeySourceError(f"{where} line {number}: a key's name must be printable ASCII "
                                 "without spaces")
        kind, sep, hexdigest = rest.partition(":")
        if sep and kind == "sha256":
            if not _HEX64.match(hexdigest):
                raise KeySourceError(f"{where} line {number}: sha256: must be followed by 64 hex digits")
            keys.append(ClientKey(name=name, sha256=hexdigest.lower()))
            continue
        if not usable(rest):
            raise KeySourceError(f"{where} line {number}: a key must be printable ASCII without spaces")
        keys.append(ClientKey(name=name, sha256=digest(rest.encode())))
    return keys


def client_keys(api_key: str, api_key_file: str) -> tuple[ClientKey, ...]:
    """Every client key the settings name, as digests; empty when keys are off.

    Raises :class:`KeySourceError` when a source is set but unusable (unreadable or empty file, a key
    with spaces): a key file emptied by mistake must not silently open the router.
    """
    keys: list[ClientKey] = []
    if api_key:
        if not usable(api_key):
            raise KeySourceError("api_key: a key must be printable ASCII without spaces")
        keys.append(ClientKey(name=SETTING_KEY_NAME, sha256=digest(api_key.encode())))
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeySourceError(f"api_key_file {api_key_file}: cannot read: "
                            f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        found = parse_key_lines(text, f"api_key_file {api_key_file}")
        if not found:
            raise KeySourceError(f"api_key_file {api_key_file}: holds no key (empty the setting to "
                                 "turn keys off)")
        keys.extend(found)
    seen: dict[str, str] = {}
    for k in keys:
        other = seen.setdefault(k.sha256, k.name)
        if other != k.name:  # one key under two names: which name would it go by?
            raise KeySourceError(f"client keys '{other}' and '{k.name}' are the same key")
    return tuple(keys)


def upstream_ref(api_key_env: str | None, api_key_file: str | None) -> str:
    """A worker entry's upstream key fields as the one reference a snapshot carries."""
    if api_key_env and api_key_file:
        raise KeySourceError("give api_key_env or api_key_file, not both")
    if api_key_env:
        return "env:" + api_key_env
    if api_key_file:
        return "file:" + api_key_file
    return ""


def resolve(ref: str) -> str:
    """The upstream key a reference names: the variable's value, or the file's first line.

    Raises :class:`KeySourceError` when it is missing, empty or not a usable token.
    """
    kind, _, target = ref.partition(":")
    if kind == "env":
        key = os.environ.get(target, "").strip()
        where = f"environment variable {target}"
    elif kind == "file":
        try:
            with open(target, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeySourceError(f"api_key_file {target}: cannot read: "
                            f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        where = f"api_key_file {target}"
    else:
        raise KeySourceError(f"unknown key reference kind '{kind}'")
    if not key:
        raise KeySourceError(f"{where} is empty or not set")
    if not usable(key):
        raise KeySourceError(f"{where}: a key must be printable ASCII without spaces")
    return key
