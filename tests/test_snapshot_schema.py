"""The snapshot's schema version is the compatibility rule, and readers enforce it.

Role: prove on a real shared-memory segment, written by the real :class:`SnapshotWriter`, that a
:class:`SnapshotReader` refuses a snapshot whose ``schema`` is not its own ``SCHEMA_VERSION``
(whether or not the rest of the payload still decodes): it keeps the snapshot it has, logs one
error per refused generation naming the version found and the version expected, does not decode
that generation again on later requests, and takes the next compatible generation.

Every segment created here is closed and unlinked by the fixture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from shm.schema import SCHEMA_VERSION, Snapshot, Worker, encode_snapshot, schema_of
from shm.segment import Segment, new_instance_id, segment_name
from shm.snapshot import SnapshotReader, SnapshotWriter, segment_size

OTHER_VERSION = SCHEMA_VERSION + 1
LOGGER = "shm.snapshot"


@pytest.fixture
def shm_pair() -> Iterator[tuple[SnapshotWriter, SnapshotReader]]:
    seg = Segment.create(segment_name(new_instance_id(), "snap"), segment_size(64 * 1024))
    writer = SnapshotWriter(seg, os.getpid())
    reader = SnapshotReader(seg)
    try:
        yield writer, reader
    finally:
        reader.close()
        writer.close()
        seg.close()
        seg.unlink()


def good(gen: int) -> Snapshot:
    return Snapshot(generation=gen, workers=(Worker(slot=0, url=f"http://w{gen}.test:8000"),),
                    models={"m": (0,)})


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]


def crafted(fields: dict[str, Any]) -> bytes:
    """A payload encoded by hand: what a coordinator of another version could publish."""
    return msgspec.msgpack.encode(fields)


def test_schema_is_the_first_field_of_every_snapshot() -> None:
    # The invariant that lets any version's reader find it (shm.schema's docstring).
    assert msgspec.structs.fields(Snapshot)[0].name == "schema"
    decoded = msgspec.msgpack.decode(encode_snapshot(good(1)))
    assert next(iter(decoded)) == "schema" and decoded["schema"] == SCHEMA_VERSION


def test_other_schema_version_is_refused_once_and_the_good_snapshot_kept(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    assert writer.publish(good(1)) == 1
    first = reader.current()
    assert first is not None and first.generation == 1
    assert not refusals(caplog)

    # Same shape, other version: it would decode, but its fields may mean something else.
    assert writer.publish(Snapshot(schema=OTHER_VERSION, generation=2)) == 2
    for _ in range(50):  # the per-request calls: the generation is tried once, then skipped
        assert reader.current() is first
        assert not reader.moved()
    assert reader.generation == 1

    [record] = refusals(caplog)
    message = record.getMessage()
    assert "generation 2" in message
    assert f"schema version is {OTHER_VERSION}" in message
    assert f"expects {SCHEMA_VERSION}" in message
    assert "previous snapshot (generation 1) stays in use" in message
    assert reader.refusal == message

    assert writer.publish(good(3)) == 3
    assert reader.moved()
    third = reader.current()
    assert third is not None and third.generation == 3 and third == good(3)
    assert reader.refusal == ""
    assert len(refusals(caplog)) == 1


def test_incompatible_fields_do_not_hide_the_version(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    """A newer coordinator that changed field types (and even moved ``schema``) is still named by
    its version, not reported as garbage."""
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    writer.publish(good(1))
    first = reader.current()
    payload = crafted({"generation": 2, "workers": "now a string", "settings": 7,
                       "schema": OTHER_VERSION})
    assert schema_of(payload) == OTHER_VERSION
    assert writer.publish_bytes(payload) == 2
    for _ in range(5):
        assert reader.current() is first
    [record] = refusals(caplog)
    assert f"schema version is {OTHER_VERSION}, this reader expects {SCHEMA_VERSION}" in record.getMessage()

    writer.publish(good(3))
    assert reader.current() == good(3)


def test_each_refused_generation_is_logged_once(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    writer.publish(good(1))
    first = reader.current()
    for gen in (2, 3):
        writer.publish(Snapshot(schema=OTHER_VERSION, generation=gen))
        for _ in range(5):
            assert reader.current() is first
    messages = [r.getMessage() for r in refusals(caplog)]
    assert len(messages) == 2
    assert "generation 2" in messages[0] and "generation 3" in messages[1]


def test_right_version_that_does_not_decode_says_so(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    writer.publish(good(1))
    first = reader.current()
    writer.publish_bytes(crafted({"schema": SCHEMA_VERSION, "generation": 2, "workers": 5}))
    assert reader.current() is first and reader.current() is first
    [record] = refusals(caplog)
    assert f"schema version is {SCHEMA_VERSION} as expected, but it does not decode" in record.getMessage()


def test_payload_without_a_version_is_refused(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    writer.publish(good(1))
    first = reader.current()
    writer.publish_bytes(b"\xc1 not msgpack")
    assert reader.current() is first and reader.current() is first
    [record] = refusals(caplog)
    assert "declares no schema version" in record.getMessage()


def test_refused_first_snapshot_leaves_none(
    shm_pair: tuple[SnapshotWriter, SnapshotReader], caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy started against a coordinator of another version has nothing to route with; the
    reader says so rather than decoding the same generation on every request."""
    writer, reader = shm_pair
    caplog.set_level(logging.ERROR, logger=LOGGER)
    writer.publish(Snapshot(schema=OTHER_VERSION, generation=1))
    assert reader.current() is None and reader.current() is None
    [record] = refusals(caplog)
    assert "no snapshot is in use yet" in record.getMessage()
    writer.publish(good(2))
    assert reader.current() == good(2)


def test_schema_of_reads_only_the_version() -> None:
    assert schema_of(encode_snapshot(good(1))) == SCHEMA_VERSION
    assert schema_of(crafted({"schema": 9, "workers": {"a": [1, 2]}})) == 9
    assert schema_of(crafted({"workers": []})) is None
    assert schema_of(crafted([1, 2, 3])) is None
    assert schema_of(crafted({"schema": "one"})) is None
    assert schema_of(b"\xc1") is None


def test_a_models_unset_pd_dialect_stays_apart_from_an_explicit_two_phase() -> None:
    """ModelPolicy.pd_dialect None means "the global setting"; "two_phase" said outright must reach
    the proxies as such, or a global "bootstrap" would override it."""
    from shm.schema import ModelPolicy, snapshot_decoder
    from shm.settings import Settings

    snap = Snapshot(settings=Settings(pd_dialect="bootstrap"),
                    model_policies={"unset": ModelPolicy(), "own": ModelPolicy(pd_dialect="two_phase")})
    decoded = snapshot_decoder().decode(encode_snapshot(snap))
    assert decoded.model_policies["unset"].pd_dialect is None
    assert decoded.model_policies["own"].pd_dialect == "two_phase"
    assert decoded.settings.pd_dialect == "bootstrap" and decoded == snap
