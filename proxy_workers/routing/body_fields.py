"""The request-body fields routing decodes, as msgspec Structs, and their decoders.

Role: the types behind :mod:`proxy_workers.routing.context`'s decoding. They live apart because
that module is compiled (proxy_workers.compiled) and msgspec builds a decoder from a Struct's
annotations at run time, which a compiled class replaces: a Struct stays interpreted.
"""

from __future__ import annotations

import msgspec


class RoutingFields(msgspec.Struct):
    """The part of a request body every request decodes."""

    model: str | None = None
    user: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_Part] | None = None


class PromptFields(msgspec.Struct):
    """The prompt, for cache_aware: chat ``messages`` or completions ``prompt``."""

    messages: list[_Message] | None = None
    prompt: str | list[str] | None = None


ROUTING_DECODER = msgspec.json.Decoder(RoutingFields)
PROMPT_DECODER = msgspec.json.Decoder(PromptFields)
