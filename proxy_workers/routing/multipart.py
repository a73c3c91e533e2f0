"""The ``model`` field of a multipart/form-data body, found without copying the body.

Role: ``/v1/audio/transcriptions``, ``/v1/audio/translations`` and file uploads send
``multipart/form-data``; :func:`proxy_workers.routing.decision.prepare` routes them by their
``model`` form field. The body is forwarded untouched, with the client's Content-Type (and so its
boundary); only an alias rewrites the field's value (:func:`replace_model`).

Invariants (bounds; the body itself is already within ``max_body_size``):
- Called only for a body that did not decode as JSON and whose Content-Type is
  ``multipart/form-data``: the JSON path never pays for it.
- The boundary comes from the Content-Type's ``boundary`` parameter, 1-70 characters
  (RFC 2046 5.1.1), quoted or not. The body must start with the first delimiter (no preamble)
  and end with the close delimiter (an epilogue after it is ignored).
- The whole body is checked, part by part, with ``bytes.find`` (linear, in C): at most
  :data:`MAX_PARTS` parts, each part's header block at most :data:`MAX_PART_HEAD` bytes,
  the ``model`` value at most :data:`MAX_MODEL` bytes of UTF-8. A part's content is never copied.
- Anything else is a 400 naming what is wrong (reason ``bad_multipart``); a well-formed body
  without a ``model`` part is a 400 with ``param`` "model".
"""

from __future__ import annotations

import re

from proxy_workers.errors import BadRequest

MAX_PARTS = 1000
MAX_PART_HEAD = 16384
MAX_MODEL = 1024
_BOUNDARY = re.compile(rb';\s*boundary=(?:"([^"]{1,70})"|([^\s;",]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb';\s*name="([^"]*)"|;\s*name=([^\s;]+)', re.IGNORECASE)


def content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's Content-Type value (b"" without one); header names are lower-case."""
    for name, value in headers:
        if name == b"content-type":
            return value
    return b""


def is_multipart(headers: list[tuple[bytes, bytes]]) -> bool:
    return content_type(headers).lstrip()[:19].lower() == b"multipart/form-data"


def _bad(what: str) -> BadRequest:
    return BadRequest(f"malformed multipart/form-data body: {what}", reason="bad_multipart")


def model_span(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[str, int, int]:
    """(model, start, end): the ``model`` field's value and its offsets in ``body``; raises 400."""
    found = _BOUNDARY.search(content_type(headers))
    if found is None:
        raise _bad("the Content-Type has no valid boundary parameter (1-70 characters)")
    boundary = found.group(1) or found.group(2)
    dash = b"--" + boundary
    if not body.startswith(dash):
        raise _bad("the body does not start with the boundary delimiter")
    delimiter = b"\r\n" + dash
    pos = len(dash)  # just past a delimiter
    span: tuple[int, int] | None = None
    for _ in range(MAX_PARTS + 1):
        after = body[pos:pos + 2]
        if after == b"--":  # the close delimiter
            if span is None:
                raise BadRequest("multipart/form-data request has no 'model' field", param="model",
                                 reason="bad_multipart")
            start, end = span
            try:
                model = body[start:end].decode()
            except UnicodeDecodeError:
                raise BadRequest("the multipart 'model' field is not UTF-8", param="model",
                                 reason="bad_multipart") from None
            if not model.strip():
                raise BadRequest("the multipart 'model' field is empty", param="model",
                                 reason="bad_multipart")
            return model.strip(), start, end
        # transport padding (RFC 2046) after the boundary is allowed: spaces and tabs
        eol = body.find(b"\r\n", pos, pos + 2 + 256)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise _bad("a boundary delimiter is not followed by CRLF or '--'")
        head_start = eol + 2
        head_end = body.find(b"\r\n\r\n", head_start - 2, head_start + MAX_PART_HEAD)
        if head_end < 0:
            raise _bad(f"a part's headers do not end (within {MAX_PART_HEAD} bytes) with an empty line")
        content = head_end + 4
        nxt = body.find(delimiter, content)
        if nxt < 0:
            raise _bad("the body ends before the closing boundary delimiter")
        if span is None and _is_model_part(body[head_start:head_end]):
            if nxt - content > MAX_MODEL:
                raise BadRequest(f"the multipart 'model' field is longer than {MAX_MODEL} bytes",
                                 param="model", reason="bad_multipart")
            span = (content, nxt)
        pos = nxt + len(delimiter)
    raise _bad(f"more than {MAX_PARTS} parts")


def _is_model_part(head: bytes) -> bool:
    """Whether a part's header block says ``Content-Disposition: form-data; name="model"``."""
    for line in head.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-disposition":
            found = _NAME.search(value)
            return found is not None and (found.group(1) or found.group(2)) == b"model"
    return False


def replace_model(headers: list[tuple[bytes, bytes]], body: bytes, model: str) -> bytes:
    """``body`` with its ``model`` field's value replaced (an alias resolved to its target)."""
    _, start, end = model_span(headers, body)
    return body[:start] + model.encode() + body[end:]
