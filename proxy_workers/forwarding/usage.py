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

import re

TAIL = 4096
_NUMBER = re.compile(rb"\s*:\s*(\d+)")
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
    done = _NUMBER.match(text, at + len(_COMPLETION))
    if done is None:
        return None
    start = text.rfind(_PROMPT)
    prompt = _NUMBER.match(text, start + len(_PROMPT)) if start >= 0 else None
    return (int(prompt.group(1)) if prompt is not None else 0), int(done.group(1))


def stream_tokens(events: int) -> int:
    """Output tokens of an SSE stream without a usage chunk: its ``data:`` events less the finish
    event and ``[DONE]`` (engines send one content chunk per token; a separate role chunk, as vLLM
    sends, makes this one too many: an estimate, documented in docs/metrics.md)."""
    return events - 2 if events > 2 else 0
