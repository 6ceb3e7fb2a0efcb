"""OpenAI-compatible HTTP API over the same GenerationService as gRPC (FastAPI).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health

Bodies follow OpenAI's: `messages` / `prompt`, `max_tokens` (or `max_completion_tokens`),
`temperature`, `top_p`, `seed`, `stop` (string or list), `n` (1 only), `stream` with
`stream_options.include_usage`; `top_k` and the speculative options of the gRPC request are
extension fields: `rule`, `delta`, `drafters`, `draft_length`, `tree` (and vLLM's
`stop_token_ids`). Every response carries the
request's speculative-decoding metrics in vLLM's vocabulary (`speculative_decoding`), and says
when the rule is lossy.

Each body becomes a `GenerateRequest` and goes through `GenerationService.generate_stream`, so
validation, limits, metrics and the decode loop are the gRPC API's own. Errors use OpenAI's error
object (`error.message`, `error.type`, `error.param`, `error.code`): 400 for bad input (the param
names the body field), 401 for a missing or wrong API key (checked before the body is read),
429 over the concurrency limit, 503 when the verifier is gone, 504 past a deadline, 500 otherwise
(an incident id, never a trace). A stream whose client disconnects is cancelled, which ends its
request and frees its session.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..v1 import generation_pb2 as gen_pb
from .auth import APIKeys
from .service import GenerationService, ServiceError

_FINISH = {
    gen_pb.FINISH_REASON_LENGTH: "length",
    gen_pb.FINISH_REASON_STOP: "stop",
    gen_pb.FINISH_REASON_STOP_SEQUENCE: "stop",
}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# gRPC request fields (as validation names them) -> the body field a client sent
_PARAM_FOR_FIELD = {
    "max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "rule_params.delta": "delta",
    "tree.branching": "tree",
    "text": "prompt",
    "token_ids": "prompt",
    "chat": "messages",
}


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # unknown fields are ignored as OpenAI's own server does (clients send e.g. `user`)
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # speculative decoding (extension fields; the gRPC request's own)
    rule: str | None = None
    delta: float | None = None
    drafters: list[str] | None = None
    draft_length: int | None = None
    tree: list[int] | None = None
    stop_token_ids: list[int] | None = None  # as vLLM's extension: ids that end generation besides eos


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[int]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", "invalid_request_error", param)


def _from_service_error(e: ServiceError) -> APIError:
    status, type_ = _HTTP_STATUS.get(e.code, (500, "server_error"))
    param = None
    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, _ = e.message.partition(":")
        if sep and " " not in field.strip():
            param = _PARAM_FOR_FIELD.get(field.strip(), field.strip())
    message = e.message
    if param and not message.startswith(param):
        message = f"{param}: {message.partition(':')[2].strip()}"
    return APIError(status, message, type_, param, e.code.name.lower())


def _text_content(content: str | list[dict[str, Any]], index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"messages[{index}].content", "only text content parts are supported")
        parts.append(part["text"])
    return "".join(parts)


def to_generate_request(body: _Body, tokenizer, chat: bool) -> gen_pb.GenerateRequest:
    """The gRPC request an OpenAI body means (extension fields included)."""
    if body.n != 1:
        raise _bad("n", f"only n = 1 is supported, got {body.n}")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise _bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    req = gen_pb.GenerateRequest(rule=body.rule or "", drafters=list(body.drafters or []))
    if chat:
        assert isinstance(body, ChatCompletionBody)
        messages = [{"role": m.role, "content": _text_content(m.content, i)} for i, m in enumerate(body.messages)]
        if len(messages) == 1 and messages[0]["role"] == "user":
            req.text, req.chat = messages[0]["content"], True  # exactly the gRPC API's chat request
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise _bad("messages", "the served model's tokenizer has no chat template")
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001 - a template that refuses these roles
                raise _bad("messages", f"the chat template refused them ({e})") from None
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            req.token_ids.ids.extend(int(t) for t in ids)
    else:
        assert isinstance(body, CompletionBody)
        if isinstance(body.prompt, str):
            req.text = body.prompt
        else:
            req.token_ids.ids.extend(body.prompt)
    limit = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if limit is not None:
        req.max_new_tokens = limit
    for field, value in (("temperature", body.temperature), ("top_p", body.top_p), ("top_k", body.top_k)):
        if value is not None:
            setattr(req.sampling, field, value)
    if body.delta is not None:
        req.rule_params.delta = body.delta
    if body.draft_length is not None:
        req.draft_length = body.draft_length
    if body.tree:
        req.tree.branching.extend(body.tree)
    if body.seed is not None:
        req.seed = body.seed
    if body.stop is not None:
        req.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.stop_token_ids:
        req.stop_token_ids.extend(body.stop_token_ids)
    return req


def speculative_metrics(stats: gen_pb.GenerationStats) -> dict[str, Any]:
    """Per-request spec-decode metrics in vLLM's names."""
    rounds = max(stats.rounds, 1)
    return {
        "rule": stats.rule,
        "lossy": stats.lossy,
        "num_drafts": stats.rounds,
        "num_draft_tokens": stats.drafted,
        "num_accepted_tokens": stats.accepted,
        "num_accepted_tokens_per_pos": list(stats.accepted_per_position),
        "mean_acceptance_length": 1.0 + stats.accepted / rounds,
        "draft_acceptance_rate": stats.acceptance_rate,
        "drafters": {name: {"drafted": d.drafted, "accepted": d.accepted} for name, d in stats.drafters.items()},
    }


def _usage(stats: gen_pb.GenerationStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


# ---------------------------------------------------------------- the app


def build_openai_app(
    get_service: Callable[[], GenerationService],
    model_name: str | None = None,
    keys: APIKeys | Callable[[], APIKeys] | None = None,
) -> FastAPI:
    """The HTTP app. `get_service()` returns the running GenerationService and `keys` may be a
    callable too: a Ray replica builds both after the app object exists (serve/deployments.py).
    `model_name` defaults to the service's model name."""
    get_keys = keys if callable(keys) else (lambda: keys or APIKeys())
    app = FastAPI(title="specserve", docs_url=None, redoc_url=None, openapi_url=None)

    def served_name() -> str:
        return model_name or get_service().model.name or "specserve"

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # before the body is read or parsed; /health stays open for probes
        path = request.url.path
        if "/v1/" in path and not get_keys().check(request.headers.get("authorization")):
            return APIError(401, "missing or invalid API key (Authorization: Bearer KEY)",
                            "authentication_error", None, "invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ""
        for part in first.get("loc", ()):
            if part == "body":
                continue
            param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
        param = param or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else "request body: not valid JSON for this endpoint"
        return APIError(400, message, "invalid_request_error", param).response()

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name(), "object": "model", "created": 0, "owned_by": "specserve"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        return await _complete(get_service(), body, chat=True, model_name=served_name())

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await _complete(get_service(), body, chat=False, model_name=served_name())

    return app


async def _complete(service: GenerationService, body: _Body, chat: bool, model_name: str):
    request = to_generate_request(body, service.tokenizer, chat)
    kind = "chat.completion" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = body.model or model_name
    stream = service.generate_stream(request)
    try:
        first = await anext(stream)  # validation happens here: bad input is a 400, not a broken stream
    except ServiceError as e:
        raise _from_service_error(e) from None
    except StopAsyncIteration:  # pragma: no cover - the service always ends with a stats chunk
        raise APIError(500, "internal error: empty generation", "server_error") from None

    if not body.stream:
        text, last = first.text, first
        try:
            async for chunk in stream:
                text += chunk.text
                last = chunk
        except ServiceError as e:
            raise _from_service_error(e) from None
        finish = _FINISH.get(last.finish_reason, "length")
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {
            "id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
            "usage": _usage(last.stats), "speculative_decoding": speculative_metrics(last.stats),
        }

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        _sse(stream, first, rid, kind + ".chunk" if chat else kind, created, model, chat, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(stream, first, rid, obj, created, model, chat, include_usage) -> AsyncIterator[bytes]:
    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta_text:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    try:
        if chat:
            yield event(chunk(None, None, role=True))
        item = first
        while True:
            if item.HasField("stats"):
                if item.text:
                    yield event(chunk(item.text, None))
                final = chunk(None, _FINISH.get(item.finish_reason, "length"))
                final["speculative_decoding"] = speculative_metrics(item.stats)
                yield event(final)
                if include_usage:
                    yield event({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                 "usage": _usage(item.stats)})
                break
            if item.text:
                yield event(chunk(item.text, None))
            item = await anext(stream)
    except ServiceError as e:  # after the headers: the error travels as an event
        err = _from_service_error(e)
        yield event({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
    finally:
        await stream.aclose()  # a client that went away cancels the request and frees its session
    yield b"data: [DONE]\n\n"
