from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_CHAT: _ClassVar[Kind]
    KIND_COMPLETION: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
KIND_CHAT: Kind
KIND_COMPLETION: Kind

class ChatMessage(_message.Message):
    __slots__ = ("content", "role")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: str | None = ..., content: str | None = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("frequency_penalty", "max_tokens", "presence_penalty", "seed", "stop", "temperature", "top_p")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    def __init__(self, max_tokens: int | None = ..., temperature: float | None = ..., top_p: float | None = ..., stop: _Iterable[str] | None = ..., seed: int | None = ..., presence_penalty: float | None = ..., frequency_penalty: float | None = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("kind", "kv_transfer_params", "messages", "model", "prompt", "request_id", "sampling", "user")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    kind: Kind
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    user: str
    kv_transfer_params: bytes
    def __init__(self, request_id: str | None = ..., model: str | None = ..., kind: Kind | str | None = ..., messages: _Iterable[ChatMessage | _Mapping] | None = ..., prompt: _Iterable[str] | None = ..., sampling: SamplingParams | _Mapping | None = ..., user: str | None = ..., kv_transfer_params: bytes | None = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("completion_tokens", "prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: int | None = ..., completion_tokens: int | None = ..., total_tokens: int | None = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: str | None = ...) -> None: ...

class Complete(_message.Message):
    __slots__ = ("finish_reason", "kv_transfer_params", "usage")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    usage: Usage
    kv_transfer_params: bytes
    def __init__(self, finish_reason: str | None = ..., usage: Usage | _Mapping | None = ..., kv_transfer_params: bytes | None = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "complete")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    complete: Complete
    def __init__(self, chunk: Chunk | _Mapping | None = ..., complete: Complete | _Mapping | None = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("reason", "request_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: str | None = ..., reason: str | None = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: bool | None = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("models", "name", "role")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    role: str
    name: str
    def __init__(self, models: _Iterable[str] | None = ..., role: str | None = ..., name: str | None = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Load(_message.Message):
    __slots__ = ("kv_usage", "running", "waiting")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_usage: float
    def __init__(self, running: int | None = ..., waiting: int | None = ..., kv_usage: float | None = ...) -> None: ...

class Json(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: str | None = ...) -> None: ...
