"""SGLang's and vLLM's native endpoints, multipart bodies, and configured models without a worker.

A real router (``shardgate serve``) in front of two real mock workers, m1 on one and m2 on the
other, and two configured models whose workers are not there: ``down`` (its only worker does not
listen) and ``half`` (a PD model whose prefill and decode workers do not listen). Which worker
answered is read from the mock's ``X-Mock-Worker`` header and its ``/mock/stats`` (last path,
headers, the raw body's sha256).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardgate import launch
from tests.conftest import assert_openai_error, free_port, get_json, http, wait_for, worker_row

BOUNDARY = "----shardgate7MA4YWxkTrZu0gW"
TOKEN = "native-endpoints-admin-token"


class Fleet:
    def __init__(self, router: launch.Launched, w1: launch.Launched, w2: launch.Launched,
                 dead: str) -> None:
        self.router, self.w1, self.w2, self.dead = router, w1, w2, dead
        self.url = router.url
        self.admin = ""  # the coordinator's admin API
        self.decode = ""  # the URL of half's decode worker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    w1 = launch.mock_worker(["m1"])
    w2 = launch.mock_worker(["m2"])
    dead = f"http://127.0.0.1:{free_port()}"
    doc = {"health_interval": 0.3, "health_fall": 1, "aliases": {"whisper": {"m2": 1}},
           "workers": [{"url": w1.url, "model": "m1"}, {"url": w2.url, "model": "m2"},
                       {"url": dead, "model": "down"},
                       {"url": f"http://127.0.0.1:{free_port()}", "model": "half", "type": "prefill"},
                       {"url": f"http://127.0.0.1:{free_port()}", "model": "half", "type": "decode"}]}
    path: Path = tmp_path_factory.mktemp("native") / "fleet.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    admin_port = free_port()
    router = launch.router([], "--port", str(free_port()), "--proxies", "1", "--admin-port",
                           str(admin_port), config=str(path), env={"SHARDGATE_ADMIN_TOKEN": TOKEN})
    try:
        f = Fleet(router, w1, w2, dead)
        f.admin = f"http://127.0.0.1:{admin_port}"
        f.decode = doc["workers"][-1]["url"]
        wait_for(lambda: not worker_row(router, dead)["healthy"], what="the dead worker marked down")
        yield f
    finally:
        for proc in (router, w1, w2):
            proc.stop()


def name(worker: launch.Launched) -> str:
    return worker.url.split("//", 1)[1]


def stats(worker: launch.Launched) -> dict[str, Any]:
    return get_json(worker.url + "/mock/stats")


def post(f: Fleet, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = http("POST", f.url + path, body)
    return status, headers, json.loads(raw) if raw else None


@pytest.mark.parametrize(("path", "model", "body", "check"), [
    ("/generate", "m2", {"text": "hello there"}, lambda d: d["text"] and d["meta_info"]["completion_tokens"]),
    ("/generate", "m1", {"text": "hello there"}, lambda d: d["meta_info"]["prompt_tokens"] == 2),
    ("/tokenize", "m1", {"prompt": "a b c"}, lambda d: d["count"] == 3 and len(d["tokens"]) == 3),
    ("/detokenize", "m2", {"tokens": [1, 2]}, lambda d: d["prompt"] == "t1 t2"),
    ("/rerank", "m2", {"query": "q", "documents": ["x", "y"]}, lambda d: len(d["results"]) == 2),
    ("/v1/rerank", "m1", {"query": "q", "documents": ["x"]}, lambda d: d["results"][0]["index"] == 0),
])
def test_a_native_endpoint_with_a_model_reaches_that_models_worker(fleet: Fleet, path: str, model: str,
                                                                    body: dict, check: Any) -> None:
    status, headers, doc = post(fleet, path, {"model": model, **body})
    assert status == 200, doc
    worker = fleet.w1 if model == "m1" else fleet.w2
    assert headers["x-mock-worker"] == name(worker)
    assert check(doc), doc
    assert stats(worker)["last_path"] == path


def test_a_native_endpoint_without_a_model_takes_the_default_route(fleet: Fleet) -> None:
    served = set()
    for _ in range(4):  # round-robin over the healthy workers
        status, headers, doc = post(fleet, "/generate", {"text": "hi", "sampling_params": {}})
        assert status == 200 and doc["text"], doc
        served.add(headers["x-mock-worker"])
    assert served == {name(fleet.w1), name(fleet.w2)}


@pytest.mark.parametrize(("path", "key"), [("/version", "version"), ("/get_model_info", "model_path"),
                                            ("/get_server_info", "version"), ("/health_generate", None)])
def test_a_get_about_a_worker_reaches_a_healthy_worker(fleet: Fleet, path: str, key: str | None) -> None:
    status, headers, raw = http("GET", fleet.url + path)
    assert status == 200, raw
    worker = {name(fleet.w1): fleet.w1, name(fleet.w2): fleet.w2}[headers["x-mock-worker"]]
    assert stats(worker)["last_path"] == path
    if key is not None:
        assert json.loads(raw)[key]


@pytest.mark.parametrize(("method", "path"), [("GET", "/generate"), ("POST", "/version"),
                                              ("DELETE", "/tokenize")])
def test_a_native_endpoint_refuses_other_methods_with_405(fleet: Fleet, method: str, path: str) -> None:
    status, _, raw = http(method, fleet.url + path, {} if method == "POST" else None)
    assert status == 405
    err = assert_openai_error(raw)
    assert path in err["message"] and "only" in err["message"]


# -- multipart ---------------------------------------------------------------------------------


def form(fields: dict[str, str], audio: bytes, boundary: str = BOUNDARY) -> bytes:
    out = b""
    for key, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n"
                f"{value}\r\n").encode()
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# Audio bytes that look like JSON brackets, CRLFs and dashes: nothing in them may be taken for syntax.
AUDIO = bytes(range(256)) * 8 + b"\r\n--\r\n{[{[" * 50 + b'name="model"\r\n\r\nm1'


@pytest.mark.parametrize(("path", "model"), [("/v1/audio/transcriptions", "m2"),
                                             ("/v1/audio/translations", "m1")])
def test_a_multipart_request_reaches_its_models_worker_byte_for_byte(fleet: Fleet, path: str,
                                                                     model: str) -> None:
    body = form({"response_format": "json", "model": model, "language": "en"}, AUDIO)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    status, headers, raw = http("POST", fleet.url + path, body, {"content-type": content_type})
    assert status == 200, raw
    worker = fleet.w1 if model == "m1" else fleet.w2
    assert headers["x-mock-worker"] == name(worker)
    assert json.loads(raw)["text"] == f"mock transcription of {len(AUDIO)} bytes"
    seen = stats(worker)
    assert seen["last_path"] == path and seen["last_headers"]["content-type"] == content_type
    assert (seen["last_body_len"], seen["last_body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_an_alias_in_a_multipart_body_is_rewritten_to_its_target_and_nothing_else(fleet: Fleet) -> None:
    body = form({"model": "whisper", "language": "en"}, AUDIO)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    status, headers, raw = http("POST", fleet.url + "/v1/audio/transcriptions", body,
                                {"content-type": content_type})
    assert status == 200, raw
    assert headers["x-mock-worker"] == name(fleet.w2)
    sent = body.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nm2\r\n", 1)
    seen = stats(fleet.w2)
    assert (seen["last_body_len"], seen["last_body_sha256"]) == (len(sent), hashlib.sha256(sent).hexdigest())


def test_a_multipart_body_for_an_unknown_model_is_404(fleet: Fleet) -> None:
    status, _, raw = http("POST", fleet.url + "/v1/audio/transcriptions", form({"model": "nope"}, b"RIFF"),
                          {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 404, raw
    assert assert_openai_error(raw)["param"] == "model"


def test_a_quoted_boundary_and_many_brackets_route_too(fleet: Fleet) -> None:
    body = form({"model": "m2"}, b"[" * 5000, boundary="b=q")
    status, headers, raw = http("POST", fleet.url + "/v1/audio/transcriptions", body,
                                {"content-type": 'multipart/form-data; boundary="b=q"'})
    assert status == 200, raw
    assert headers["x-mock-worker"] == name(fleet.w2)


@pytest.mark.parametrize(("content_type", "body", "says"), [
    (f"multipart/form-data; boundary={BOUNDARY}", form({"language": "en"}, b"RIFF"), "no 'model' field"),
    (f"multipart/form-data; boundary={BOUNDARY}", form({"model": " "}, b"RIFF"), "'model' field is empty"),
    ("multipart/form-data", form({"model": "m1"}, b"RIFF"), "no valid boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}", form({"model": "m1"}, b"RIFF")[:-30],
     "before the closing boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}", b"junk" + form({"model": "m1"}, b"RIFF"),
     "does not start with the boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}",
     f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\nm1".encode(), "empty line"),
])
def test_a_multipart_body_without_a_model_or_malformed_gets_400(fleet: Fleet, content_type: str,
                                                                body: bytes, says: str) -> None:
    before = stats(fleet.w1)["requests"] + stats(fleet.w2)["requests"]
    status, _, raw = http("POST", fleet.url + "/v1/audio/transcriptions", body,
                          {"content-type": content_type})
    assert status == 400, raw
    err = assert_openai_error(raw)
    assert says in err["message"], err
    if "'model' field" in says:
        assert err["param"] == "model"
    assert stats(fleet.w1)["requests"] + stats(fleet.w2)["requests"] == before


# -- configured models without a worker ------------------------------------------------------------


def test_a_configured_model_whose_only_worker_is_down_gets_503_with_the_reason(fleet: Fleet) -> None:
    for path in ("/v1/chat/completions", "/generate"):
        status, _, raw = http("POST", fleet.url + path,
                              {"model": "down", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503, raw
        err = assert_openai_error(raw)
        assert "'down'" in err["message"] and "none healthy" in err["message"], err


def test_a_pd_model_without_a_healthy_pair_gets_503_with_the_reason(fleet: Fleet) -> None:
    wait_for(lambda: not any(w["healthy"] for w in get_json(fleet.url + "/workers")["workers"]
                             if "half" in w["models"]), what="the PD workers marked down")
    status, _, raw = http("POST", fleet.url + "/v1/chat/completions",
                          {"model": "half", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503, raw
    err = assert_openai_error(raw)
    assert "'half'" in err["message"] and "healthy" in err["message"], err


def test_an_unknown_model_is_still_404(fleet: Fleet) -> None:
    status, _, raw = http("POST", fleet.url + "/generate", {"model": "nope", "text": "hi"})
    assert status == 404, raw
    assert "does not exist" in assert_openai_error(raw)["message"]


def test_a_pd_model_that_lost_its_decode_side_gets_503_not_404(fleet: Fleet) -> None:
    """Last in this module: it changes the fleet (the decode worker leaves through the admin API)."""
    status, _, raw = http("POST", fleet.admin + "/admin/workers/remove", {"url": fleet.decode},
                          {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, raw
    ask = {"model": "half", "messages": [{"role": "user", "content": "hi"}]}

    def answer() -> tuple[int, dict[str, Any]] | None:
        status, _, raw = http("POST", fleet.url + "/v1/chat/completions", ask)
        err = assert_openai_error(raw)
        return (status, err) if "cannot be served" in err["message"] else None

    status, err = wait_for(answer, what="the snapshot without the decode worker")
    assert status == 503
    assert "'half' is configured" in err["message"] and "1 http prefill" in err["message"], err
