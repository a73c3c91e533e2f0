"""RFC 9112 request rules the client protocol applies on top of llhttp's, and their refusals.

Role: the checks :class:`proxy_workers.serving.protocol.ClientProtocol` makes that llhttp does
not: the request target's path, the Host field count, and the head budget (the refusal for a
request line or fields over ``max_head_size``/``max_header_count``). The protocol calls them only
when a cheap test says a rule may be broken (a path not seen clean before, a head that may be over
budget, Host not exactly once), so a plain request pays a set lookup here.

Invariants:
- Paths are refused, not normalised: a ``.`` or ``..`` segment, or a percent-encoded dot, slash,
  backslash or NUL (``%2e %2f %5c %00``, any case) in the path gets 400 before any prefix check.
  Normalising would make the router and the worker disagree about what was asked (one decodes
  ``%2f``, the other not) and no OpenAI-compatible path needs any of them.
- Host (RFC 9112 3.2): more than one Host field is refused for any version; none is refused for
  HTTP/1.1. Its value is never used (workers get their own authority).
- One head budget per request: the request target and every field (name + value + 4 bytes of
  separators), trailer fields included, whatever the reads (where it is checked:
  :mod:`proxy_workers.serving.reading`).
"""

from __future__ import annotations

import re

from proxy_workers.errors import BadRequest, HeadersTooLarge, UriTooLong

_BAD_PATH = re.compile(rb"(?:^|/)\.\.?(?:/|$)|%(?:2[eEfF]|5[cC]|00)")


# Paths already found free of dot segments and encoded separators: a client uses a handful, and a
# set lookup is cheaper than scanning each one (``b"%" in path`` even raises and clears a TypeError
# inside CPython). Bounded: short paths only, cleared when full; never rebound (callers import it).
CLEAN_PATHS: set[bytes] = set()
CLEAN_PATHS_MAX = 1024


def check_path(path: bytes) -> None:
    """Raise 400 for a dot segment or an encoded dot, slash, backslash or NUL in ``path``; else
    remember it as clean. Callers skip paths already in CLEAN_PATHS."""
    if (path.find(b"%") >= 0 or path.find(b"/.") >= 0) and _BAD_PATH.search(path):
        raise BadRequest("the request path may not contain dot segments ('.', '..') or "
                         "percent-encoded dots, slashes, backslashes or NULs", reason="bad_path")
    if len(path) <= 256:  # the set holds at most CLEAN_PATHS_MAX x 256 bytes
        if len(CLEAN_PATHS) >= CLEAN_PATHS_MAX:
            CLEAN_PATHS.clear()
        CLEAN_PATHS.add(path)


def host_error(hosts: int, http11: bool) -> BadRequest | None:
    """The refusal for a request with ``hosts`` Host fields, if it breaks RFC 9112 3.2."""
    if hosts > 1:
        return BadRequest("a request must not carry more than one Host field", reason="bad_host")
    if hosts == 0 and http11:
        return BadRequest("an HTTP/1.1 request must carry a Host field", reason="bad_host")
    return None


def target_too_long(limit: int) -> UriTooLong:
    return UriTooLong(f"request target exceeds max_head_size={limit} bytes", reason="uri_too_long")


def head_too_large(limit: int) -> HeadersTooLarge:
    return HeadersTooLarge(f"request head exceeds max_head_size={limit} bytes")


def too_many_fields(limit: int) -> HeadersTooLarge:
    return HeadersTooLarge(f"request has more than max_header_count={limit} header fields "
                           "(trailer fields included)", reason="too_many_fields")
