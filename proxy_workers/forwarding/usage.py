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

TAIL = 4096
_PROMPT = b'"prompt_tokens"'
_COMPLETION = b'"completion_tokens"'


def usage_tokens(last: bytes, before: bytes = b"") -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the usage at the end of an answer, or None."""
    text = last
    at = text.rfind(_COMPLETION)
    if at < 0:
        if not before:
            return None
        text = before[-TAIL:] + last  # the usage object straddles two reads
        at = text.rfind(_COMPLETION)
        if at < 0:
            return None
    completion = _number(text, at + len(_COMPLETION))
    if completion < 0:
        return None
    at = text.rfind(_PROMPT)
    prompt = _number(text, at + len(_PROMPT)) if at >= 0 else 0
    return max(prompt, 0), completion


def _number(text: bytes, at: int) -> int:
    """The integer after ``: `` at ``at`` (-1 if none): a few C-level finds, no regex (per request)."""
    colon = text.find(b":", at, at + 8)
    if colon < 0:
        return -1
    end = text.find(b",", colon)
    brace = text.find(b"}", colon)
    if end < 0 or 0 <= brace < end:
        end = brace
    try:
        return int(text[colon + 1:end])  # int() takes the spaces around the digits
    except ValueError:
        return -1


def stream_tokens(events: int) -> int:
    """Output tokens of an SSE stream without a usage chunk: its ``data:`` events less the finish
    event and ``[DONE]`` (engines send one content chunk per token; a separate role chunk, as vLLM
    sends, makes this one too many: an estimate, documented in docs/metrics.md)."""
    return events - 2 if events > 2 else 0
