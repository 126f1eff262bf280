"""The HTTP judge client against a scripted OpenAI-compatible server on loopback: request format,
order, bounded retries (timeouts, malformed replies, 5xx, 429), no retry on 401, concurrency,
the Authorization header, and that the API key never leaks into verdicts, repr or logs."""
import base64
import collections
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from illume_jax.align.assessment import JUDGE_SYSTEM, JUDGE_USER
from illume_jax.align.http_judge import HTTPJudge, summary

KEY_ENV = "ILLUME_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789abcdefSECRET"


def _reply_for(prompt):
    return f"object yes, count yes, color yes, spatial none. this is {prompt}. overall yes"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][1]["content"][0]["text"][len("Description: "):]
        with srv.lock:
            srv.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            action = srv.script.popleft() if srv.script else srv.default
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        self._in_flight = True
        try:
            self._act(action, prompt)
        except OSError:  # the client gave up (timeout)
            pass
        finally:
            self._leave()

    def _leave(self):
        """Counted out before the response goes: once the client has it, it may send the next
        request, whose handler must not see this one still in flight (a race under load)."""
        if self._in_flight:
            self._in_flight = False
            with self.server.lock:
                self.server.in_flight -= 1

    def _send(self, code, payload, headers=()):
        self._leave()
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chat(self, content):
        self._send(200, {"id": "x", "object": "chat.completion", "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})

    def _act(self, action, prompt):
        kind, *args = action
        echo = self.headers.get("Authorization", "")
        if kind == "ok":  # optional delay first
            time.sleep(args[0] if args else 0)
            self._chat(_reply_for(prompt))
        elif kind == "malformed":
            self._send(200, '{"choices": [ not json ' + echo)
        elif kind == "chatter":  # valid chat JSON, but the content is no assessment
            self._chat("What a lovely picture! " + echo)
        elif kind == "sleep":
            time.sleep(args[0])
            self._chat(_reply_for(prompt))
        elif kind == "status":
            code, headers = args[0], (args[1] if len(args) > 1 else {})
            self._send(code, {"error": {"message": f"status {code}; you sent {echo!r}"}}, headers)
        else:
            raise AssertionError(kind)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.script, srv.default = threading.Lock(), [], collections.deque(), ("ok",)
    srv.in_flight = srv.max_in_flight = 0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8 + i, 6, 3), dtype=np.uint8) for i in range(n)]


def _judge(server, **kw):
    kw = {"model": "judge-model", "api_key_env": KEY_ENV, "timeout_s": 5.0, "backoff_s": 0.0, **kw}
    return HTTPJudge(server.url, **kw)


def test_request_format_and_order(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    images, prompts = _images(6), [f"sample {i}" for i in range(6)]
    judge = _judge(server, concurrency=3, temperature=0.2, max_tokens=77)
    verdicts = judge.judge_many(images, prompts, metadata=[{}] * 6)
    assert [v.ok for v in verdicts] == [True] * 6 and [v.attempts for v in verdicts] == [1] * 6
    assert [v.assessment.rationale for v in verdicts] == [f"this is sample {i}" for i in range(6)]
    assert all(v.error is None and v.raw == _reply_for(p) for v, p in zip(verdicts, prompts))
    assert len(server.requests) == 6
    by_prompt = {}
    for r in server.requests:
        assert r["path"] == "/v1/chat/completions"
        assert "Authorization" not in r["headers"]
        body = r["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.2 and body["max_tokens"] == 77
        system, user = body["messages"]
        assert system == {"role": "system", "content": JUDGE_SYSTEM}
        assert user["role"] == "user" and user["content"][1]["type"] == "image_url"
        text = user["content"][0]
        assert text["type"] == "text"
        url = user["content"][1]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.format == "PNG"
        by_prompt[text["text"]] = np.asarray(png.convert("RGB"))
    for im, p in zip(images, prompts):
        np.testing.assert_array_equal(by_prompt[JUDGE_USER.format(prompt=p)], im)
    assert summary(verdicts) == {"total": 6, "ok": 6, "failed": 0, "failed_by_kind": {}, "attempts": 6}


@pytest.mark.parametrize("first", [("malformed",), ("chatter",), ("status", 500), ("status", 503),
                                   ("status", 429, {"Retry-After": "0"}), ("sleep", 1.0)])
def test_one_failure_then_ok_is_retried(server, first):
    server.script.extend([first, ("ok",)])
    (v,) = _judge(server, concurrency=1, timeout_s=0.3).judge_many(_images(1), ["a red square"])
    assert v.ok and v.attempts == 2 and v.error is None and len(server.requests) == 2


def test_several_failures_then_ok(server):
    server.script.extend([("malformed",), ("status", 502), ("chatter",), ("ok",)])
    (v,) = _judge(server, concurrency=1, max_retries=3).judge_many(_images(1), ["x"])
    assert v.ok and v.attempts == 4 and len(server.requests) == 4


@pytest.mark.parametrize("action,kind", [(("status", 500), "http 500"), (("malformed",), "bad_response"),
                                         (("chatter",), "unparsable"), (("status", 429), "http 429")])
def test_always_failing_is_bounded_then_skipped(server, action, kind):
    server.default = action
    verdicts = _judge(server, concurrency=2, max_retries=2).judge_many(_images(3), ["a", "b", "c"])
    assert len(server.requests) == 3 * 3  # exactly 1 + max_retries per sample
    for v in verdicts:
        assert not v.ok and v.assessment is None and v.attempts == 3
        assert v.error.startswith(kind + ":")
    assert summary(verdicts) == {"total": 3, "ok": 0, "failed": 3, "failed_by_kind": {kind: 3}, "attempts": 9}


@pytest.mark.parametrize("code", [401, 400, 404])
def test_client_errors_are_not_retried(server, code):
    server.default = ("status", code)
    verdicts = _judge(server, max_retries=3).judge_many(_images(2), ["a", "b"])
    assert len(server.requests) == 2
    assert all(not v.ok and v.attempts == 1 and v.error.startswith(f"http {code}:") for v in verdicts)


def test_timeouts_are_retried_then_skipped(server):
    server.default = ("sleep", 1.5)
    server.script.append(("ok",))  # the first sample's first request succeeds
    t0 = time.monotonic()
    verdicts = _judge(server, concurrency=1, timeout_s=0.25, max_retries=1).judge_many(_images(2), ["a", "b"])
    assert time.monotonic() - t0 < 1.5
    assert verdicts[0].ok and verdicts[0].attempts == 1
    assert not verdicts[1].ok and verdicts[1].attempts == 2 and verdicts[1].error.startswith("timeout:")
    assert len(server.requests) == 3
    assert summary(verdicts)["failed_by_kind"] == {"timeout": 1}


def test_connection_refused_is_retried_then_skipped():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.0, timeout_s=2.0)
    (v,) = judge.judge_many(_images(1), ["a"])
    assert not v.ok and v.attempts == 2 and v.error.startswith("connection:")


def test_retry_after_is_honoured_and_capped(server):
    server.script.extend([("status", 429, {"Retry-After": "0.4"}), ("ok",)])
    t0 = time.monotonic()
    (v,) = _judge(server, concurrency=1).judge_many(_images(1), ["a"])
    assert v.ok and v.attempts == 2 and time.monotonic() - t0 >= 0.4
    server.script.extend([("status", 503, {"Retry-After": "120"}), ("ok",)])
    t0 = time.monotonic()
    (v,) = _judge(server, concurrency=1, retry_after_cap_s=0.1).judge_many(_images(1), ["a"])
    assert v.ok and v.attempts == 2 and time.monotonic() - t0 < 3.0


def test_exponential_backoff(server):
    server.default = ("status", 500)
    t0 = time.monotonic()
    (v,) = _judge(server, concurrency=1, max_retries=2, backoff_s=0.1).judge_many(_images(1), ["a"])
    assert not v.ok and v.attempts == 3 and time.monotonic() - t0 >= 0.1 + 0.2


def test_concurrency_is_honoured(server):
    delay, n = 0.3, 8
    server.default = ("ok", delay)
    t0 = time.monotonic()
    verdicts = _judge(server, concurrency=4).judge_many(_images(n), [f"sample {i}" for i in range(n)])
    elapsed = time.monotonic() - t0
    assert all(v.ok for v in verdicts)
    assert [v.assessment.rationale for v in verdicts] == [f"this is sample {i}" for i in range(n)]
    assert server.max_in_flight == 4
    serial = n * delay
    assert serial / 4 <= elapsed < serial / 2  # ~1/4 of the serial time
    server.max_in_flight, server.default = 0, ("ok", 0.05)
    _judge(server, concurrency=1).judge_many(_images(3), ["a", "b", "c"])
    assert server.max_in_flight == 1


def test_authorization_header_from_env_at_request_time(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = _judge(server)
    monkeypatch.setenv(KEY_ENV, SECRET)  # read when the request is made, not at construction
    assert judge.judge_many(_images(1), ["a"])[0].ok
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    monkeypatch.delenv(KEY_ENV)
    assert judge.judge_many(_images(1), ["a"])[0].ok
    assert "Authorization" not in server.requests[-1]["headers"]


def test_key_never_leaks(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    judge = _judge(server, concurrency=1, max_retries=1)
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))
    # every failure echoes the Authorization header it received back in its body
    server.script.extend([("status", 401), ("status", 500), ("status", 500), ("malformed",), ("malformed",),
                          ("chatter",), ("chatter",), ("status", 500), ("ok",)])
    verdicts = judge.judge_many(_images(5), list("abcde"))
    assert [v.ok for v in verdicts] == [False, False, False, False, True]
    assert [v.error.split(":")[0] for v in verdicts[:4]] == ["http 401", "http 500", "bad_response", "unparsable"]
    assert "[REDACTED]" in verdicts[0].error  # the echo was there, and redacted
    assert all("[REDACTED]" in v.raw for v in verdicts[:4])
    for v in verdicts:
        assert SECRET not in (v.error or "") and SECRET not in v.raw and SECRET not in repr(v)
    assert SECRET not in str(summary(verdicts))
    assert caplog.records and SECRET not in caplog.text
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs,arg", [({"url": "127.0.0.1:8000/v1"}, "url"), ({"url": "ftp://x"}, "url"),
                                        ({"concurrency": 0}, "concurrency"), ({"max_retries": -1}, "max_retries"),
                                        ({"timeout_s": 0}, "timeout_s"), ({"model": ""}, "model")])
def test_constructor_validation(kwargs, arg):
    kw = {"url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=arg):
        HTTPJudge(**kw)


def test_input_validation():
    judge = HTTPJudge("https://example.invalid/v1/", "m")
    assert judge.endpoint == "https://example.invalid/v1/chat/completions"
    assert judge.judge_many([], []) == []
    with pytest.raises(ValueError, match="prompts"):
        judge.judge_many(_images(2), ["a"])
    with pytest.raises(ValueError, match="uint8"):
        judge.judge_many([np.zeros((4, 4, 3), np.float32)], ["a"])
