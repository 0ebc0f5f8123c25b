"""The OpenAI-compatible HTTP server: `fapool serve`.

create_app(engine, settings) builds a FastAPI app around an LLMEngine: the AsyncEngine runs
the engine's step loop in its own thread (started and stopped by the app's lifespan), and the
handlers here turn OpenAI requests into engine requests and engine outputs into OpenAI
responses or server-sent events. Every error leaves in OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fapool import __version__
from fapool.engine.arg_utils import EngineArgs
from fapool.engine.async_engine import (
    AsyncEngine,
    EngineDead,
    Overloaded,
    RequestFailed,
    RequestStream,
    ShuttingDown,
)
from fapool.engine.llm_engine import LLMEngine, RequestError
from fapool.entrypoints import openai_protocol as proto
from fapool.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from fapool.entrypoints.openai_serving import ChatRenderer, CompletionRenderer, Renderer
from fapool.outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    model_aliases: tuple[str, ...] = ()  # other names accepted in "model" (e.g. the --model path)
    api_key: str | None = None
    max_waiting: int = 256
    shutdown_timeout_s: float = 30.0
    max_request_bytes: int = 8 << 20  # bodies above get 413 before they are read


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = proto.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, self.status, headers=self.headers)


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class OpenAIServing:
    """Prompt preparation, admission and response building shared by the two endpoints."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        cfg = engine.engine.config
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = cfg.max_model_len
        self.vocab_size = cfg.model.vocab_size
        self.max_prompt_chars = self._max_prompt_chars()

    def _max_prompt_chars(self) -> int | None:
        """A text longer than this cannot fit max_model_len tokens, so it is refused before
        tokenizing: no token spells more characters than the longest vocabulary entry (one
        character per byte in byte-level vocabularies, more for byte-fallback pieces)."""
        if self.tokenizer is None:
            return None
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        longest = max((len(p) for p in pieces if p), default=1)
        return self.max_model_len * longest

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise _bad(
                f"the prompt has {chars} characters, more than {self.max_model_len} tokens (this model's "
                f"maximum context length) can hold; shorten it",
                param=param,
            )

    def check_model(self, model: str | None) -> None:
        if (
            model is not None
            and model != self.settings.model_name
            and model not in self.settings.model_aliases
        ):
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server serves {self.settings.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_supported(self, req: proto.SamplingFields) -> None:
        refused = req.unsupported()
        if refused is not None:
            raise _bad(refused[1], param=refused[0])

    # Prompts ----------------------------------------------------------------------------------
    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        else:
            raise _bad(
                "prompt must be a string, a list of strings, a list of token ids, or a list of "
                "such lists, and not empty",
                param="prompt",
            )
        if self.tokenizer is None:
            raise _bad("this model has no tokenizer: send the prompt as token ids", param="prompt")
        for t in texts:
            self.check_prompt_chars(len(t), "prompt")
        return [self.tokenizer.encode(t, add_special_tokens=True) if t else [] for t in texts]

    def chat_prompt(
        self,
        chat_messages: list[proto.ChatMessage],
        add_generation_prompt: bool = True,
        template_kwargs: dict | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise _bad("this model has no chat template; use /v1/completions", param="messages")
        if not chat_messages:
            raise _bad("messages must not be empty", param="messages")
        messages = [m.as_template_input() for m in chat_messages]
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        extra = dict(template_kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True
        if tools:
            extra["tools"] = tools
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
            )
        except Exception as e:
            raise _bad(f"the chat template could not format these messages: {e}", param="messages") from e
        if hasattr(encoded, "keys") and "input_ids" in encoded:
            encoded = encoded["input_ids"]
        if encoded and isinstance(encoded[0], list):
            encoded = encoded[0]
        return [int(t) for t in encoded]

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """truncate_prompt_tokens: the last `keep` tokens (-1: the model's context)."""
        if keep is None:
            return ids
        keep = self.max_model_len if keep == -1 else keep
        return ids[-keep:]

    def tokenize(self, req: proto.TokenizeRequest) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise _bad("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            return self.chat_prompt(req.messages, req.add_generation_prompt)
        if self.tokenizer is None:
            raise _bad("this model has no tokenizer", param="prompt")
        return list(self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))

    def detokenize(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            raise _bad("this model has no tokenizer", param="tokens")
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise _bad(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="tokens")
        return self.tokenizer.decode(tokens)

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        if not ids:
            raise _bad("the prompt is empty", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise _bad(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise _bad(
                f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                "tokens, leaving no room to generate",
                param=param,
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise _bad(
                f"This model's maximum context length is {limit} tokens; you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in "
                "max_tokens). Lower max_tokens or the prompt.",
                param="max_tokens",
            )

    def sampling_params(self, req: proto.SamplingFields, max_tokens: int | None, logprobs: int | None):
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            msg = str(e)
            field = msg.split("SamplingParams.", 1)[1].split("=", 1)[0] if "SamplingParams." in msg else None
            raise _bad(msg, param=field) from e

    # Admission --------------------------------------------------------------------------------
    async def admit(self, items, arrival: float) -> RequestStream:
        try:
            return await self.engine.add_requests(items, arrival)
        except Overloaded as e:
            self.metrics.reject("overloaded")
            raise APIError(
                429, str(e), type="rate_limit_error", code="server_overloaded", headers={"Retry-After": "1"}
            ) from e
        except RequestError as e:
            self.metrics.reject("invalid")
            raise _bad(str(e)) from e
        except (ShuttingDown, EngineDead) as e:
            self.metrics.reject("unavailable")
            raise APIError(503, str(e), type="service_unavailable", code="unavailable") from e
        except RequestFailed as e:
            raise APIError(500, str(e), type="server_error", code="engine_error") from e

    # Responses --------------------------------------------------------------------------------
    async def respond(self, raw: Request, renderer: Renderer, stream: RequestStream, streaming: bool):
        if streaming:
            return StreamingResponse(self._sse(renderer, stream), media_type="text/event-stream")
        collect = asyncio.ensure_future(self._collect(stream))
        gone = asyncio.ensure_future(_until_disconnected(raw))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                # The client went away: stop generating for it and free its KV blocks.
                return Response(status_code=499)
            finals = collect.result()
        except (RequestFailed, EngineDead) as e:
            raise _failure(e) from e
        finally:
            gone.cancel()
            collect.cancel()
            self.engine.abort(stream)
        return JSONResponse(renderer.full_response(finals))

    @staticmethod
    async def _collect(stream: RequestStream) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(stream.request_ids)
        async for index, out in stream:
            _raise_if_failed(out)
            if out.finished:
                finals[index] = out
        return finals  # type: ignore[return-value]

    async def _sse(self, renderer: Renderer, stream: RequestStream) -> AsyncIterator[str]:
        try:
            for chunk in renderer.first_chunks():
                yield _event(chunk)
            async for index, out in stream:
                _raise_if_failed(out)
                for chunk in renderer.chunks(index, out):
                    yield _event(chunk)
            for chunk in renderer.final_chunks():
                yield _event(chunk)
        except (RequestFailed, EngineDead) as e:
            yield _event({"error": _failure(e).response_body()})
        finally:
            # Normal end: a no-op. Client disconnect (the generator is closed): frees the KV.
            self.engine.abort(stream)
        yield "data: [DONE]\n\n"


def _raise_if_failed(out: RequestOutput) -> None:
    if out.finished and out.error:
        raise RequestFailed(out.error)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Failure(APIError):
    def response_body(self) -> dict:
        return proto.error_body(self.message, self.type, self.param, self.code)["error"]


def _failure(e: Exception) -> _Failure:
    if (isinstance(e, RequestFailed) and e.shutting_down) or isinstance(e, EngineDead):
        return _Failure(503, str(e), type="service_unavailable", code="unavailable")
    return _Failure(500, str(e), type="server_error", code="engine_error")


async def _until_disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


# The app ------------------------------------------------------------------------------------------
OPEN_PATHS = ("/health", "/metrics", "/version")  # no API key, as in vLLM


class RequestGuard:
    """ASGI middleware that answers from the headers, before a byte of the body is read: 401
    without the API key, 413 when Content-Length exceeds the limit. A body sent without a
    length is read up to the limit and no further (413 past it), then handed on."""

    def __init__(self, app, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key is not None and scope["path"] not in OPEN_PATHS:
            header = headers.get(b"authorization", b"").decode("latin-1")
            token = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await self._reply(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        limit = self.settings.max_request_bytes
        length = headers.get(b"content-length")
        too_big = f"the request body exceeds {limit} bytes (the server's --max-request-bytes)"
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._reply(send, 413, too_big, "request_too_large")
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._reply(send, 413, too_big, "request_too_large")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send, status: int, message: str, code: str) -> None:
        payload = json.dumps(proto.error_body(message, "invalid_request_error", code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 413:
            headers.append((b"connection", b"close"))  # the unread body is not drained
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def create_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """A FastAPI app serving `engine`. The app's lifespan starts the engine thread and, at
    shutdown, drains it; until then the caller must not touch the engine."""
    async_engine = AsyncEngine(engine, settings.max_waiting)
    metrics = ServerMetrics(settings.model_name, async_engine.stats)
    async_engine.observer = metrics  # request lifecycle events feed the histograms
    serving = OpenAIServing(async_engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown(settings.shutdown_timeout_s)

    app = FastAPI(title="fapool OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.settings = settings
    _install_error_handlers(app)
    errors = {s: {"model": proto.ErrorResponse} for s in (400, 401, 404, 429, 500, 503)}

    app.add_middleware(RequestGuard, settings=settings)  # the API key and body size, before parsing

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if async_engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": async_engine.dead_reason}, 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> proto.ModelCard:
        return proto.ModelCard(
            id=settings.model_name,
            root=settings.model_name,
            max_model_len=serving.max_model_len,
            vocab_size=serving.vocab_size,
        )

    @app.get("/v1/models", response_model=proto.ModelList, responses=errors)
    async def models() -> proto.ModelList:
        return proto.ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=proto.ModelCard, responses=errors)
    async def model(model_id: str) -> proto.ModelCard:
        serving.check_model(model_id)
        return model_card()

    @app.post("/tokenize", response_model=proto.TokenizeResponse, responses=errors)
    async def tokenize(req: proto.TokenizeRequest) -> proto.TokenizeResponse:
        serving.check_model(req.model)
        ids = await asyncio.to_thread(serving.tokenize, req)
        return proto.TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=proto.DetokenizeResponse, responses=errors)
    async def detokenize(req: proto.DetokenizeRequest) -> proto.DetokenizeResponse:
        serving.check_model(req.model)
        return proto.DetokenizeResponse(prompt=await asyncio.to_thread(serving.detokenize, req.tokens))

    @app.post("/v1/completions", response_model=proto.CompletionResponse, responses=errors)
    async def completions(req: proto.CompletionRequest, raw: Request):
        arrival = time.monotonic()
        serving.check_model(req.model)
        serving.check_supported(req)
        prompts = await asyncio.to_thread(serving.completion_prompts, req.prompt)
        prompts = [serving.truncate(ids, req.truncate_prompt_tokens) for ids in prompts]
        for ids in prompts:
            serving.check_prompt(ids, req.max_tokens, "prompt")
        params = serving.sampling_params(req, req.max_tokens, req.logprobs)
        rid = proto.new_id("cmpl")
        items = [(f"{rid}-{i}", ids, params) for i, ids in enumerate(prompts)]
        stream = await serving.admit(items, arrival)
        renderer = CompletionRenderer(rid, settings.model_name, req, prompts, serving.tokenizer)
        return await serving.respond(raw, renderer, stream, req.stream)

    @app.post("/v1/chat/completions", response_model=proto.ChatCompletionResponse, responses=errors)
    async def chat_completions(req: proto.ChatCompletionRequest, raw: Request):
        arrival = time.monotonic()
        serving.check_model(req.model)
        serving.check_supported(req)
        ids = await asyncio.to_thread(
            serving.chat_prompt,
            req.messages,
            req.add_generation_prompt,
            req.chat_template_kwargs,
            req.continue_final_message,
            req.tool_dicts if req.effective_tool_choice != "none" else None,
        )
        ids = serving.truncate(ids, req.truncate_prompt_tokens)
        serving.check_prompt(ids, req.max_new_tokens, "messages")
        params = serving.sampling_params(req, req.max_new_tokens, req.num_logprobs)
        rid = proto.new_id("chatcmpl")
        stream = await serving.admit([(rid, ids, params)], arrival)
        renderer = ChatRenderer(rid, settings.model_name, req, [ids], serving.tokenizer)
        return await serving.respond(raw, renderer, stream, req.stream)

    return app


def _is_union_tag(part) -> bool:
    """pydantic names the union member in an error's loc ("str", "list[constrained-int]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        by_field: dict[str, list[str]] = {}
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ())[1:] if not _is_union_tag(x))
            by_field.setdefault(loc, []).append(str(err.get("msg", "invalid")))
        parts = []
        for loc, msgs in list(by_field.items())[:3]:
            what = (
                msgs[0]
                if len(msgs) == 1
                else "matches none of the accepted types (" + "; ".join(msgs[:4]) + ")"
            )
            parts.append(f"{loc or 'body'}: {what}")
        param = next(iter(by_field), "") or None
        message = "; ".join(parts) or "the request body is not valid"
        return JSONResponse(proto.error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(proto.error_body(str(e.detail), kind), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(proto.error_body(f"internal server error: {e!r}", "server_error"), 500)


# Running it ----------------------------------------------------------------------------------------
class GracefulServer(uvicorn.Server):
    """uvicorn.Server that, on exit, first tells the engine to drain (finish what it can within
    shutdown_timeout_s, then fail the rest cleanly) so streams end with an error event rather
    than a cut connection; meanwhile it keeps listening and answers new requests 503 (a load
    balancer sees a refusal, not a refused connection). Exits 0 after a handled SIGINT/SIGTERM."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        settings: ServerSettings = app.state.settings
        engine = app.state.engine
        engine.begin_shutdown(settings.shutdown_timeout_s)
        deadline = time.monotonic() + settings.shutdown_timeout_s + 1.0
        while engine.num_in_flight and engine.is_running and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()  # handled: do not re-raise it after serve()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so port 0 (OS-chosen) can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? choose --port)") from e
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, log_level: str = "warning") -> GracefulServer:
    settings: ServerSettings = app.state.settings
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 5,
    )
    return GracefulServer(config)


class BackgroundServer:
    """The app under uvicorn in a thread of this process, on host:port (0: OS-chosen).
    Used by the tests and usable as a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="fapool-uvicorn", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def default_model_name(model: str | None) -> str:
    from fapool.models.loader import resolve_model

    src = resolve_model(model)
    if src.format == "preset":
        return model or src.path
    name = os.path.basename(src.path.rstrip("/"))
    return name.removesuffix(".gguf")


def run_server(ns: argparse.Namespace) -> int:
    from fapool.entrypoints.llm import build_engine

    args = EngineArgs.from_cli(ns)
    api_key = ns.api_key or os.environ.get("FAPOOL_API_KEY") or None
    name = ns.served_model_name or default_model_name(args.model)
    aliases = tuple(a for a in (args.model,) if a and a != name)
    settings = ServerSettings(name, aliases, api_key, ns.max_waiting, ns.shutdown_timeout, ns.max_request_bytes)
    sock = bind_socket(ns.host, ns.port)  # fail fast on a taken port, before loading the model
    engine = build_engine(args)
    app = create_app(engine, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fapool: serving {name!r} on http://{shown}:{port} (OpenAI API under /v1)", flush=True)
    server = make_server(app, log_level="info" if ns.verbose else "warning")
    try:
        server.run(sockets=[sock])
    finally:
        stop = getattr(engine, "shutdown", None)  # attention-pool worker processes, if any
        if stop is not None:
            stop()
    # A supervisor's view: 0 a clean drain, 1 a forced exit (a second signal cut the drain).
    return 1 if server.force_exit else 0


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000, help="0: a free port chosen by the OS (printed)")
    g.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set FAPOOL_API_KEY)"
    )
    g.add_argument("--served-model-name", default=None, help="the name clients pass as 'model'")
    g.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="admitted-but-unscheduled requests beyond which new ones get 429",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=ServerSettings.max_request_bytes,
        help="request bodies larger than this get 413 before they are read (default: %(default)s)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish at shutdown before they are failed",
    )
    p.set_defaults(func=run_server)
