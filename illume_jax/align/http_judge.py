"""The external judge: any OpenAI-compatible chat endpoint (the paper used GPT-4o), by URL.

Each sample is one `POST {url}/chat/completions` with the judge prompt of `assessment.py`
(system `JUDGE_SYSTEM`, user `JUDGE_USER` + the image as a base64 PNG data URL); the reply's
content must parse as an assessment (`parse_assessment`), so every judge is read by one parser.

Failures are retried a bounded number of times (1 + max_retries attempts per sample), then the
sample is skipped and counted: its Verdict has `assessment=None` and `error="<kind>: <detail>"`,
never a score. Kinds: `timeout`, `connection`, `http <status>`, `bad_response` (not the
chat-completions JSON), `unparsable` (content is not an assessment). Retried: timeout, connection,
HTTP 429 and 5xx (a numeric Retry-After is honoured up to `retry_after_cap_s`, else exponential
backoff from `backoff_s`), bad_response, unparsable. Other 4xx (401 bad key, 400 ...) are final.

The API key is read from the environment variable `api_key_env` at request time (unset: no
Authorization header); the judge stores only the variable's name. The key is redacted from every
string it keeps (errors, raw replies) and never logged; logs carry only the URL, model, statuses.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from illume_jax.align.assessment import JUDGE_SYSTEM, JUDGE_USER, AssessmentParseError, parse_assessment
from illume_jax.align.judges import Verdict  # one Verdict for every judge

log = logging.getLogger(__name__)


_KEEP_CHARS = 500  # of a server's error body kept in Verdict.error / raw


class _Failure(Exception):
    def __init__(self, kind: str, detail: str, raw: str = "", retry: bool = True, wait: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.raw, self.retry, self.wait = kind, detail, raw, retry, wait


def png_data_url(image: np.ndarray) -> str:
    """A uint8 [H, W, 3] image as a `data:image/png;base64,...` URL."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class HTTPJudge:
    name = "http"

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 concurrency: int = 4, max_retries: int = 2, temperature: float = 0.0, max_tokens: int = 120,
                 backoff_s: float = 0.5, retry_after_cap_s: float = 10.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"HTTPJudge url {url!r}: must start with http:// or https://")
        if not model:
            raise ValueError("HTTPJudge model: must be a non-empty model name")
        if not api_key_env:
            raise ValueError("HTTPJudge api_key_env: must name an environment variable")
        if not timeout_s > 0:
            raise ValueError(f"HTTPJudge timeout_s={timeout_s}: must be > 0")
        if int(concurrency) != concurrency or concurrency < 1:
            raise ValueError(f"HTTPJudge concurrency={concurrency}: must be an integer >= 1")
        if int(max_retries) != max_retries or max_retries < 0:
            raise ValueError(f"HTTPJudge max_retries={max_retries}: must be an integer >= 0")
        if backoff_s < 0 or retry_after_cap_s < 0:
            raise ValueError(f"HTTPJudge backoff_s={backoff_s}, retry_after_cap_s={retry_after_cap_s}: must be >= 0")
        self.url, self.model, self.api_key_env = url.rstrip("/"), model, api_key_env
        self.endpoint = self.url + "/chat/completions"
        self.timeout_s, self.concurrency, self.max_retries = float(timeout_s), int(concurrency), int(max_retries)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.backoff_s, self.retry_after_cap_s = float(backoff_s), float(retry_after_cap_s)

    def __repr__(self) -> str:
        return (f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout_s}, concurrency={self.concurrency}, max_retries={self.max_retries})")

    def request_body(self, image: np.ndarray, prompt: str) -> dict:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                             {"role": "user", "content": [
                                 {"type": "text", "text": JUDGE_USER.format(prompt=prompt)},
                                 {"type": "image_url", "image_url": {"url": png_data_url(image)}}]}]}

    def judge_many(self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata=None) -> list:
        """One Verdict per (image, prompt), in input order. `metadata` is ignored (other judges use it)."""
        if len(images) != len(prompts):
            raise ValueError(f"HTTPJudge.judge_many: {len(images)} images but {len(prompts)} prompts")
        for i, im in enumerate(images):
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise ValueError(f"HTTPJudge.judge_many: image {i} is {a.dtype}{list(a.shape)}, "
                                 "expected uint8 [H, W, 3]")
        bodies = [json.dumps(self.request_body(np.asarray(im), p)).encode() for im, p in zip(images, prompts)]
        if not bodies:
            return []
        workers = min(self.concurrency, len(bodies))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http-judge") as ex:
            return list(ex.map(self._judge_one, bodies))

    def _judge_one(self, body: bytes) -> Verdict:
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            key = os.environ.get(self.api_key_env) or None
            try:
                content = self._post(body, key)
                return Verdict(assessment=parse_assessment(content), error=None, attempts=attempt,
                               raw=_redact(content, key))
            except AssessmentParseError as e:
                fail = _Failure("unparsable", str(e), raw=content)
            except _Failure as e:
                fail = e
            if not fail.retry or attempt == attempts:
                log.warning("http judge %s (model %s): sample skipped after %d attempt(s): %s",
                            self.endpoint, self.model, attempt, fail.kind)
                return Verdict(assessment=None, error=_redact(f"{fail.kind}: {fail.detail}", key)[:2 * _KEEP_CHARS],
                               attempts=attempt, raw=_redact(fail.raw, key))
            wait = fail.wait if fail.wait is not None else self.backoff_s * 2 ** (attempt - 1)
            log.debug("http judge %s: attempt %d failed (%s); retrying in %.2fs",
                      self.endpoint, attempt, fail.kind, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _post(self, body: bytes, key: str | None) -> str:
        """One request; returns the reply's message content or raises _Failure."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, text = resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            log.debug("http judge %s (model %s): HTTP %d", self.endpoint, self.model, e.code)
            try:
                text = e.read().decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only kept for the record
                text = ""
            text, retry = _redact(text, key)[:_KEEP_CHARS], e.code == 429 or e.code >= 500
            raise _Failure(f"http {e.code}", _redact(f"{e.reason}: {text}", key), raw=text,
                           retry=retry, wait=self._retry_after(e.headers) if retry else None) from None
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, (TimeoutError, socket.timeout))
            raise _Failure("timeout" if timed_out else "connection", _redact(str(e.reason), key)) from None
        except (TimeoutError, socket.timeout):
            raise _Failure("timeout", f"no reply within {self.timeout_s}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Failure("connection", _redact(f"{type(e).__name__}: {e}", key)) from None
        log.debug("http judge %s (model %s): HTTP %d", self.endpoint, self.model, status)
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            text = _redact(text, key)[:_KEEP_CHARS]
            raise _Failure("bad_response", f"not a chat completion ({type(e).__name__}): {text!r}", raw=text) from None
        return content

    def _retry_after(self, headers) -> float | None:
        value = headers.get("Retry-After") if headers is not None else None
        try:
            return min(max(float(value), 0.0), self.retry_after_cap_s)
        except (TypeError, ValueError):
            return None  # absent or an HTTP date: exponential backoff


def _redact(text: str, key: str | None) -> str:
    """`text` with the key (as is, and as repr / JSON would escape it) replaced by [REDACTED]."""
    if not key or not text:
        return text or ""
    for form in {key, repr(key)[1:-1], json.dumps(key)[1:-1]}:
        text = text.replace(form, "[REDACTED]")
    return text


def summary(verdicts: Sequence) -> dict:
    """Counts for the round's report: ok, failed (total and by error kind), attempts over all samples."""
    failed: dict[str, int] = {}
    for v in verdicts:
        if not v.ok:
            kind = (v.error or "unknown").split(":", 1)[0]
            failed[kind] = failed.get(kind, 0) + 1
    return {"total": len(verdicts), "ok": sum(1 for v in verdicts if v.ok), "failed": sum(failed.values()),
            "failed_by_kind": dict(sorted(failed.items())), "attempts": sum(v.attempts for v in verdicts)}
