"""What a policy may know about a request, computed only when a policy asks.

Role: :class:`RequestContext` carries the request's routing inputs (model, routing key, prompt
text, token estimate) and collects the decision's explanation. Inputs are lazy: round-robin never
pays for hashing headers or decoding the prompt; cache_aware decodes the prompt once.

Invariants:
- The body is decoded at most twice: once for ``model``/``user``/``max_tokens`` (every request),
  once more for the prompt text and its message ends (only when a policy asks for them:
  cache_aware).
- A body is decoded only once its nesting is known to be within ``max_json_depth``
  (:func:`json_too_deep`), so no decoder recurses deeper than that (msgspec itself stops with
  RecursionError near the interpreter's recursion limit).
- The routing key comes from the first present header of ``hash_headers``, else the body's
  ``user`` field, else the ``hash_fallback`` (client address or none).
- ``reason``/``fallback`` are plain attribute writes (cheap on every request); ``scores`` are
  filled only when an explanation was asked for (``explain``).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from proxy_workers.routing.body_fields import PROMPT_DECODER, ROUTING_DECODER, PromptFields, RoutingFields
from shm.hashing import key_hash

__all__ = ["ROUTING_DECODER", "PromptFields", "RequestContext", "RoutingFields"]


DEFAULT_OUTPUT_TOKENS = 256
# Session and user keys repeat turn after turn; blake2b costs ~0.65 us, a dict hit ~0.05 us.
KEY_HASH_MEMO = 65536
_KEY_HASHES: dict[bytes, int] = {}
CHARS_PER_TOKEN = 4
# JSON strings (brackets inside them do not nest), and every byte that is not a bracket.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
COUNT_BELOW: Final = 2048  # bodies up to this many bytes have their brackets counted (brackets_over)


def brackets_over(body: bytes, limit: int) -> bool:
    """Whether ``body`` holds more than ``limit`` opening brackets (``[`` and ``{``).

    A short body is counted (``bytes.count``: ~0.6 ns a byte, once per bracket kind, after a call
    of ~1,000 instructions). In a longer one they are found one at a time (``find`` is memchr, a
    fraction of a nanosecond a byte), stopping at ``limit + 1``: a chat body has a few dozen
    brackets in kilobytes of text, where counting took ~10 us on 8 KB."""
    if len(body) <= COUNT_BELOW:
        return body.count(91) + body.count(123) > limit  # [ {
    seen = 0
    for bracket in (b"[", b"{"):
        at = body.find(bracket)
        while at >= 0:
            seen += 1
            if seen > limit:
                return True
            at = body.find(bracket, at + 1)
    return False


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether JSON ``body`` nests arrays and objects more than ``limit`` deep.

    Depth never exceeds the count of opening brackets, so a body with at most ``limit`` of them
    is cleared by :func:`brackets_over` (nearly every request). Otherwise the depth is measured
    on the body's brackets outside strings: linear in the body, and run only for bodies with more
    than ``limit`` brackets."""
    if not brackets_over(body, limit):
        return False
    if b'\\"' in body:
        skeleton = _JSON_STRING.sub(b"", body)  # escaped quotes: strings need the full pattern
    else:
        skeleton = b"".join(body.split(b'"')[::2])  # outside strings: every other piece
    depth = 0
    for byte in skeleton.translate(None, _NOT_BRACKETS):
        if byte == 91 or byte == 123:  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def prompt_parts(fields: PromptFields) -> tuple[str, list[tuple[int, str]]]:
    """The prompt text, and where each message (or prompt item) ends in it.

    The text is each message as ``role:content``, joined by newlines. Ends are byte offsets in
    the text's UTF-8 encoding (what cache_aware hashes), each with its message's role ("" for
    completions prompts); a prefix ending at a message end is what an earlier turn sent whole.
    """
    parts: list[str] = []
    ends: list[tuple[int, str]] = []
    at = -1  # the first part has no newline before it
    if fields.messages is not None:
        for m in fields.messages:
            content = m.content
            if isinstance(content, str):
                part = f"{m.role}:{content}"
            elif content:
                part = m.role + ":" + "".join(p.text or "" for p in content)
            else:
                continue
            parts.append(part)
            at += 1 + (len(part) if part.isascii() else len(part.encode()))
            ends.append((at, m.role))
        return "\n".join(parts), ends
    prompt = fields.prompt
    for part in prompt if isinstance(prompt, list) else [prompt] if prompt else []:
        parts.append(part)
        at += 1 + (len(part) if part.isascii() else len(part.encode()))
        ends.append((at, ""))
    return "\n".join(parts), ends


def parse_hash_headers(setting: str) -> tuple[bytes, ...]:
    """The ``hash_headers`` setting as RequestContext reads it: lower-cased header names, in order."""
    return tuple(h.strip().lower().encode() for h in setting.split(",") if h.strip())


class RequestContext:
    __slots__ = ("_ends", "_hash", "_key", "_prompt", "alias", "body", "client", "dry_run", "explain",
                 "fallback", "fields", "hash_fallback", "hash_headers", "headers", "model", "reason",
                 "router", "router_reason", "scores", "shard")

    def __init__(self, model: str | None, fields: RoutingFields | None, body: bytes,
                 headers: list[tuple[bytes, bytes]], client: bytes,
                 hash_headers: tuple[bytes, ...], hash_fallback: str, explain: bool = False) -> None:
        self.model = model
        self.fields = fields
        self.body = body
        self.headers = headers
        self.client = client
        self.hash_headers = hash_headers
        self.hash_fallback = hash_fallback
        self.explain = explain
        self.reason = ""
        self.fallback = False
        self.scores: dict[str, Any] | None = {} if explain else None
        self.router = ""
        self.router_reason = ""
        self.dry_run = False  # POST /route/explain: decide, but remember nothing
        self.shard: str | None = None
        self.alias: str | None = None
        self._key: str | bool | None = False  # False: not computed yet
        self._hash: int | None = None
        self._prompt: str | None = None  # with _ends, set by prompt() (not here: every request)

    def routing_key(self) -> str | None:
        """The affinity key of this request, or None when it has none."""
        if self._key is False:
            self._key = self._find_key()
        return self._key  # type: ignore[return-value]

    def _find_key(self) -> str | None:
        for wanted in self.hash_headers:
            for name, value in self.headers:
                if name == wanted and value:
                    return value.decode("latin-1")
        if self.fields is not None and self.fields.user:
            return self.fields.user
        if self.hash_fallback == "client_ip":
            return self.client.decode()
        return None

    def key_hash(self) -> int | None:
        """64-bit hash of the model and routing key (None without a key)."""
        if self._hash is None:
            key = self.routing_key()
            if key is not None:
                data = (self.model or "").encode() + b"\0" + key.encode()
                h = _KEY_HASHES.get(data)
                if h is None:
                    if len(_KEY_HASHES) >= KEY_HASH_MEMO:
                        _KEY_HASHES.clear()
                    h = _KEY_HASHES[data] = key_hash(data)
                self._hash = h
        return self._hash

    def prompt(self) -> str:
        if self._prompt is None:
            try:
                self._prompt, self._ends = prompt_parts(PROMPT_DECODER.decode(self.body)) \
                    if self.body else ("", [])
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._prompt, self._ends = "", []
        return self._prompt

    def prompt_ends(self) -> list[tuple[int, str]]:
        """(byte offset, role) where each message of ``prompt()`` ends (see :func:`prompt_parts`)."""
        self.prompt()
        return self._ends

    def estimated_tokens(self) -> int:
        """Prompt plus output tokens, estimated without a tokenizer (for quota budgets)."""
        fields = self.fields
        out = (fields.max_completion_tokens or fields.max_tokens) if fields else None
        return len(self.body) // CHARS_PER_TOKEN + (out or DEFAULT_OUTPUT_TOKENS)

    def note(self, reason: str, fallback: bool = False, **scores: Any) -> None:
        self.reason = reason
        if fallback:
            self.fallback = True
        if self.scores is not None and scores:
            self.scores.update(scores)
