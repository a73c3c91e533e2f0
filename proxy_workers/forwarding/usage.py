"""Token counts of an answer, read from the ``usage`` the worker returned: never re-tokenised.

Role: :func:`usage_tokens` finds ``prompt_tokens`` and ``completion_tokens`` at the end of an
answer (the last piece(s) of its body, as read): a whole JSON answer's ``usage`` object, or a
stream's usage chunk (sent when the client asked ``stream_options.include_usage``; the router
never adds the option). A stream without one is counted by its events instead
(:func:`stream_tokens`).

Invariants: looks only at the tail the caller kept (the last two reads, at most ``TAIL`` bytes of
the one before the last), once per request; finds the *last* occurrence (the usage object ends
an answer; JSON escapes quotes inside strings, so generated text cannot fake the field).
"""

from __future__ import annotations

from typing import Final

import msgspec

TAIL: Final = 4096
_USAGE: Final = b'"usage":'


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


_decode: Final = msgspec.json.Decoder(_Usage).decode


def usage_tokens(last: bytes, before: bytes = b"") -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the usage at the end of an answer, or None.

    Three C calls on the common path (find the last ``"usage":``, its closing brace, decode the
    object with msgspec): this runs once per request."""
    text = last
    at = text.rfind(_USAGE)
    if at < 0:
        if not before:
            return None
        text = before[-TAIL:] + last  # the usage object straddles two reads
        at = text.rfind(_USAGE)
        if at < 0:
            return None
    end = text.find(b"}", at)
    if end < 0:
        return None
    try:
        usage = _decode(text[at + 8:end + 1])
    except (msgspec.DecodeError, msgspec.ValidationError):  # "usage": null, or not an object
        return None
    return usage.prompt_tokens, usage.completion_tokens


def stream_tokens(events: int) -> int:
    """Output tokens of an SSE stream without a usage chunk: its ``data:`` events less the finish
    event and ``[DONE]`` (engines send one content chunk per token; a separate role chunk, as vLLM
    sends, makes this one too many: an estimate, documented in docs/metrics.md)."""
    return events - 2 if events > 2 else 0
