"""OpenAIIngress: the HTTP face of k2ray (a FastAPI app inside a Ray Serve deployment; CPU only, autoscaled).

Per request it authenticates, validates, applies the chat template, tokenizes, hands token ids to a K2Router replica
through a streaming deployment handle, turns what comes back into OpenAI responses — parsing reasoning and tool calls
from text decoded with special tokens — and streams server-sent events. Errors are OpenAI error bodies; an unexpected
exception is logged here and answered with a 500 that carries no traceback.

The ingress holds no checkpoint: the tokenizer and chat-template files come from a router replica on first use, so
ingress replicas can run on CPU-only nodes. Endpoints are documented in docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2ray import logs, metrics
from k2ray.serve.config import ServeArgs
from k2ray.serve import access_log
from k2ray.serve import protocol as P
from k2ray.tokenizer.parsers import openai_finish_reason

log = logging.getLogger("k2ray.serve.ingress")

_BIG_TEXT = 32 * 1024  # prompts larger than this are rendered/tokenized off the event loop
HEALTH_TIMEOUT_S = 0.5  # /health never waits longer for the router (probes often time out after 1 s)
OPEN_ATTEMPTS = 4  # tries to start a request while model groups are not ready (see OpenAIIngress._open)
_TOOL_SECTION_BEGIN = "<|tool_calls_section_begin|>"
_TOOL_CALL_BEGIN = "<|tool_call_begin|>"
_TOOL_ARG_BEGIN = "<|tool_call_argument_begin|>"


# -- errors ------------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def from_item(cls, err: dict) -> "APIError":
        return cls(int(err.get("status", 500)), str(err.get("message", "error")), err.get("type") or "internal_error",
                   err.get("param"), err.get("code"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "list[str]", "list[int]"}


def _loc(loc: tuple) -> str:
    """``('tools', 0, 'function', 'name')`` -> ``tools[0].function.name`` (pydantic's union-member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier() or not part.islower()):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _param_of(message: str) -> Optional[str]:
    head, sep, _ = message.partition(":")
    head = head.strip()
    return head if sep and head and all(c.isalnum() or c in "_.[]" for c in head) else None


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    if first.get("type") == "json_invalid":
        return _bad(f"request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
    loc = _loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return _bad(f"{loc}: {msg}", loc)
    if not loc and first.get("type") == "model_type":
        return _bad("request body must be a JSON object", None, "invalid_json")
    return _bad(msg, _param_of(msg))



def _handle_error(e: BaseException) -> APIError:
    """Map an exception from a deployment-handle call to an APIError (never a traceback)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, APIError):
        return e
    if isinstance(e, BackPressureError):
        return APIError(503, f"server overloaded: {e}", "service_unavailable", None, "overloaded")
    if isinstance(e, DeploymentUnavailableError):
        return APIError(503, "the model is not available right now; retry shortly", "service_unavailable",
                        None, "model_unavailable")
    try:
        from ray.exceptions import RayActorError

        if isinstance(e, RayActorError):
            return APIError(503, "the model group serving this request died; retry shortly", "service_unavailable",
                            None, "model_group_failed")
    except ImportError:  # pragma: no cover
        pass
    log.error("unexpected error", exc_info=(type(e), e, e.__traceback__))
    return APIError(500, "internal server error", "internal_error", None, "internal_error")


# -- per-choice state --------------------------------------------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    parser: Any = None  # StreamingOutputParser (chat)
    text: list[str] = field(default_factory=list)  # completions
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token: [[tok, lp], ...]
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    num_tokens: int = 0


def _serve_url() -> str:
    """Where Serve's HTTP proxy listens (from the Serve controller), e.g. ``http://localhost:8000``."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
        host = "localhost" if cfg.host in ("0.0.0.0", "::", "127.0.0.1") else cfg.host
        return f"http://{host}:{cfg.port}{(cfg.root_path or '').rstrip('/')}"
    except Exception:  # an older or newer Serve: the line still says what is ready
        return "the Serve HTTP proxy"


def _health_503(status: str, message: str, group: Optional[str] = None) -> JSONResponse:
    """A not-ready /health answer: the state first (``{"status": "starting", ...}``), the OpenAI error shape beside it."""
    err = APIError(503, message, "service_unavailable", None, "model_unavailable").body()
    return JSONResponse({"status": status, "group": group, **err}, status_code=503)


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def _maybe_thread(big: bool, fn, *args, **kwargs):
    if big:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _guard(fn):
    """Every endpoint: APIError -> its response; anything else -> logged, 500 without details; errors counted."""

    @functools.wraps(fn)
    async def wrapper(self, request: Request):
        try:
            return await fn(self, request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = _handle_error(e)
            self._count_error(err.status)
            return err.response()

    return wrapper


class OpenAIIngress:
    """FastAPI ingress (``@serve.ingress(app)`` is applied in :mod:`k2ray.serve.app`)."""

    def __init__(self, router, args: dict | ServeArgs):
        self.router = router
        logs.configure()
        self.args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
        self.model_name = self.args.model_name
        self._keys = [k.encode() for k in self.args.api_keys]
        self._ready_lock = asyncio.Lock()
        self.tokenizer = None
        self.template = None
        self.info: dict = {}
        self._special_names: tuple[str, ...] = ()
        self._max_token_bytes = 1
        self._tmpdir: Optional[tempfile.TemporaryDirectory] = None
        self._template_thinks = True
        m = self.model_name
        self._ttft = metrics.TTFT.labels(model=m)
        self._itl = metrics.ITL.labels(model=m)
        self._e2e = metrics.E2E_LATENCY.labels(model=m)

    # -- the ASGI app (built in the replica: ``serve.ingress()`` late-binds it) ---------------------------------------
    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.build_asgi_app()

    def build_asgi_app(self) -> FastAPI:
        """A FastAPI app whose routes call this instance (usable without Serve too, e.g. with a TestClient)."""
        @contextlib.asynccontextmanager
        async def lifespan(app):
            announce = asyncio.get_running_loop().create_task(self._announce_when_ready())
            yield
            announce.cancel()

        api = FastAPI(title="k2ray", description="OpenAI-compatible API for Kimi K2 on Ray", docs_url=None,
                      redoc_url=None, openapi_url=None, lifespan=lifespan)

        @api.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError):
            return exc.response()

        @api.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code).response()

        @api.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - last resort
            return _handle_error(exc).response()

        routes = [
            ("/health", self.health, ["GET"]),
            ("/v1/models", self.models, ["GET"]),
            ("/v1/models/{model_id:path}", self.model, ["GET"]),
            ("/v1/chat/completions", self.chat_completions, ["POST"]),
            ("/v1/completions", self.completions, ["POST"]),
            ("/tokenize", self.tokenize, ["POST"]),
            ("/detokenize", self.detokenize, ["POST"]),
            ("/v1/k2ray/layout", self.layout, ["GET"]),
            ("/v1/k2ray/stats", self.stats, ["GET"]),
        ]
        for path, fn, methods in routes:
            api.add_api_route(path, fn, methods=methods)
        api.add_middleware(access_log.AccessLogMiddleware)
        return api

    async def _announce_when_ready(self) -> None:
        """Log once, when a model group first answers ready, the URL the API is served on."""
        while True:
            try:
                st = await asyncio.wait_for(self.router.status.remote(), timeout=5)
                if st.get("state") == "ready":
                    break
            except Exception:
                pass
            await asyncio.sleep(1.0)
        url = await asyncio.to_thread(_serve_url)
        log.info("serving %s: OpenAI API at %s/v1 (model group %s ready)", self.model_name, url, st.get("group"))

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _count_error(self, status: int) -> None:
        try:
            metrics.REQUEST_ERRORS_TOTAL.inc(model=self.model_name, status=str(status))
        except Exception:  # pragma: no cover
            pass

    def _count_finished(self, reason: Optional[str]) -> None:
        try:
            metrics.REQUESTS_TOTAL.inc(model=self.model_name, finish_reason=reason or "unknown")
        except Exception:  # pragma: no cover
            pass

    def _auth(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not key or not any(hmac.compare_digest(key.encode(), k) for k in self._keys):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", None, "invalid_api_key")

    async def _read(self, request: Request, model_cls):
        limit = self.args.max_request_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise APIError(413, f"request body of {cl} bytes exceeds the limit of {limit} bytes",
                           "invalid_request_error", None, "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", "invalid_request_error",
                               None, "request_too_large")
        if not body:
            raise _bad("request body is empty; expected a JSON object", None, "invalid_json")
        try:
            return model_cls.model_validate_json(bytes(body), strict=True)
        except ValidationError as e:
            raise _validation_error(e) from None

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{self.model_name}')",
                           "invalid_request_error", "model", "model_not_found")

    async def _ensure_ready(self) -> None:
        if self.tokenizer is not None:
            return
        async with self._ready_lock:
            if self.tokenizer is not None:
                return
            from k2ray.tokenizer import ChatTemplate, KimiTokenizer

            try:
                files = await self.router.tokenizer_files.remote()
                info = await self.router.info.remote()
            except Exception as e:
                log.warning("model not ready: %s", e)
                raise APIError(503, "the model is still starting; retry shortly", "service_unavailable", None,
                               "model_unavailable") from None
            tmp = tempfile.TemporaryDirectory(prefix="k2ray-tokenizer-")
            for name, data in files.items():
                with open(os.path.join(tmp.name, name), "wb") as fh:
                    fh.write(data)
            tok = KimiTokenizer.from_dir(tmp.name)
            try:
                self.template = ChatTemplate.from_dir(tmp.name, tok)
            except FileNotFoundError:
                self.template = None
            self._tmpdir = tmp
            # Reasoning is split off only for thinking models (whose template knows <think>; not K2-Instruct).
            self._template_thinks = self.template is not None and self.template.thinks
            self.info = info
            self._special_names = tuple(tok.special_tokens)
            self._max_token_bytes = max(1, max(len(tok.id_to_bytes(i)) for i in range(tok.n_base_tokens)))
            self.tokenizer = tok

    @property
    def max_model_len(self) -> int:
        return int(self.info.get("max_model_len", 1 << 62))

    def _check_prompt_text(self, text: str, param: str) -> None:
        """Reject a prompt that is certainly too long before spending time to tokenize it."""
        if len(text) < self.max_model_len:  # never more tokens than characters
            return
        lower = len(text.encode("utf-8")) // self._max_token_bytes
        if lower >= self.max_model_len:
            raise _bad(f"{param}: the prompt has at least {lower} tokens, over the context length of "
                       f"{self.max_model_len} tokens", param, "context_length_exceeded")

    def _max_tokens(self, requested: Optional[int], n_prompt: int, param: str) -> int:
        limit = self.max_model_len
        if n_prompt >= limit:
            raise _bad(f"{param}: the prompt has {n_prompt} tokens, which leaves no room to generate within the "
                       f"context length of {limit} tokens", param, "context_length_exceeded")
        room = limit - n_prompt
        if requested is None:
            d = self.args.default_max_tokens
            return room if d is None else min(d, room)
        if requested >= 1 and requested > room:
            raise _bad(f"max_tokens: {requested} completion tokens + {n_prompt} prompt tokens exceed the context "
                       f"length of {limit} tokens", "max_tokens", "context_length_exceeded")
        return requested

    def _check_fits(self, sequences: int, param: str) -> None:
        """A request whose sequences (prompts x n) exceed what one model group can ever hold is a 400, not a 503:
        retrying it would never help."""
        capacity = self.args.engine.max_num_seqs + self.args.max_queued_requests
        if sequences > capacity:
            raise _bad(f"{param}: the request needs {sequences} sequences (prompts x n), more than one model group "
                       f"holds (max_num_seqs + max_queued_requests = {capacity})", param)

    def _logit_bias(self, bias: Optional[dict[str, float]]) -> dict[int, float]:
        """OpenAI's ``{"token id": bias}`` -> ``{id: bias}``, ids checked against the tokenizer."""
        out = {}
        vocab = self.tokenizer.vocab_size
        for key, value in (bias or {}).items():
            try:
                tid = int(key)
            except ValueError:
                raise _bad(f"logit_bias: key {key!r} is not a token id", "logit_bias") from None
            if not 0 <= tid < vocab:
                raise _bad(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab})", "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise _bad(f"logit_bias: bias {value} of token {tid} is outside [-100, 100]", "logit_bias")
            out[tid] = float(value)
        return out

    def _sampling(self, req, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int],
                  skip_special: bool) -> dict:
        stop = req.stop
        return {
            "n": req.n,
            "max_tokens": max_tokens,
            "min_tokens": req.min_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_k": -1 if req.top_k is None else req.top_k,
            "min_p": 0.0 if req.min_p is None else req.min_p,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
            "seed": req.seed,
            "stop": [] if stop is None else ([stop] if isinstance(stop, str) else list(stop)),
            "stop_token_ids": list(req.stop_token_ids or []),
            "ignore_eos": req.ignore_eos,
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "skip_special_tokens": skip_special,
            "logit_bias": self._logit_bias(req.logit_bias),
        }

    def _token_str(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def _chat_logprob(self, pairs: list, k: int) -> dict:
        tok, lp = pairs[0]
        s = self._token_str(tok)
        entry = {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if k:
            top = sorted(pairs, key=lambda p: -p[1])[:k]
            entry["top_logprobs"] = [
                {"token": (t := self._token_str(i)), "logprob": v, "bytes": list(t.encode("utf-8"))} for i, v in top
            ]
        return entry

    async def _open(self, req: dict):
        """Start a request on a router replica; returns ``(stream, first_item)``; an error item raises APIError.

        A model group that is not ready (recovering, starting) or whose router died has not started the request, so
        it is sent again, up to ``OPEN_ATTEMPTS`` times in all: with several groups, Serve's replica choice then
        usually reaches one that serves (one group's recovery does not fail the requests the others could take)."""
        from ray.exceptions import RayActorError

        for attempt in range(OPEN_ATTEMPTS):
            last = attempt == OPEN_ATTEMPTS - 1
            gen = self.router.options(stream=True).generate.remote(req)
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "internal server error", "internal_error", None, "internal_error") from None
            except RayActorError:
                gen.cancel()
                if last:
                    raise
                continue
            except BaseException:
                gen.cancel()
                raise
            if "error" in first:
                gen.cancel()
                if first["error"].get("code") == "model_unavailable" and not last:
                    continue
                raise APIError.from_item(first["error"])
            access_log.note_prompt(first.get("num_prompt_tokens", len(req["prompt_token_ids"])))
            return gen, first

    @staticmethod
    async def _items(gen, first: dict) -> AsyncIterator[dict]:
        yield first
        async for item in gen:
            yield item

    def _observe(self, t0: float, state: dict, item: dict, timing: bool = True) -> None:
        """TTFT/ITL metrics (``timing``: for the first prompt of a batch only) and the access line's counts."""
        now = time.monotonic()
        n_new = sum(len(o["token_ids"]) for o in item.get("outputs", ()))
        access_log.note_tokens(n_new)
        if n_new and timing:
            last = state.get("last")
            if last is None:
                self._ttft.observe(now - t0)
            else:
                self._itl.observe(now - last)
            state["last"] = now

    # -- endpoints: health, models, layout -----------------------------------------------------------------------------
    async def health(self) -> Response:
        """200 once a model group serves; otherwise 503 with ``status`` starting / recovering / dead / unreachable.
        Answers within ``HEALTH_TIMEOUT_S``: a router replica still being created cannot answer, which means
        starting (a replica that has died is reported by Ray at once, as unreachable)."""
        try:
            st = await asyncio.wait_for(self.router.status.remote(), timeout=HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _health_503("starting", "no model group answers yet: the router replica is starting")
        except Exception as e:
            return _health_503("unreachable", f"model group unreachable: {type(e).__name__}")
        if st.get("state") != "ready":
            detail = f"model group {st.get('group')} is {st.get('state')}"
            return _health_503(st.get("state") or "unavailable", detail + (f": {st['error']}" if st.get("error") else ""),
                               group=st.get("group"))
        return JSONResponse({"status": "ok", "group": st.get("group")})

    @_guard
    async def models(self, request: Request) -> Response:
        self._auth(request)
        with contextlib.suppress(APIError):
            await self._ensure_ready()
        card = P.ModelCard(id=self.model_name, root=self.args.model, max_model_len=self.info.get("max_model_len"))
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    async def model(self, request: Request, model_id: str) -> Response:
        try:
            self._auth(request)
            self._check_model(model_id)
            with contextlib.suppress(APIError):
                await self._ensure_ready()
        except APIError as e:
            self._count_error(e.status)
            return e.response()
        card = P.ModelCard(id=self.model_name, root=self.args.model, max_model_len=self.info.get("max_model_len"))
        return JSONResponse(card.model_dump())

    @_guard
    async def layout(self, request: Request) -> Response:
        """Where the answering model group's actors and experts live."""
        self._auth(request)
        return JSONResponse(await self.router.layout.remote())

    @_guard
    async def stats(self, request: Request) -> Response:
        """Engine counters of the answering model group (running, waiting, KV blocks, aborted, ...)."""
        self._auth(request)
        return JSONResponse(await self.router.stats.remote())

    # -- tokenizer endpoints ------------------------------------------------------------------------------------------
    @_guard
    async def tokenize(self, request: Request) -> Response:
        self._auth(request)
        req = await self._read(request, P.TokenizeRequest)
        self._check_model(req.model)
        await self._ensure_ready()
        if req.prompt is not None:
            ids = await _maybe_thread(len(req.prompt) > _BIG_TEXT, self.tokenizer.encode, req.prompt)
        else:
            ids = (await self._render_chat(req.messages, [t.model_dump(exclude_none=True) for t in req.tools or []]
                                           or None, req.add_generation_prompt, req.chat_template_kwargs)).token_ids
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    @_guard
    async def detokenize(self, request: Request) -> Response:
        self._auth(request)
        req = await self._read(request, P.DetokenizeRequest)
        self._check_model(req.model)
        await self._ensure_ready()
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise _bad(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    # -- chat ---------------------------------------------------------------------------------------------------------
    async def _render_chat(self, messages, tools, add_generation_prompt: bool, template_kwargs: Optional[dict]):
        from k2ray.tokenizer import ChatTemplateError

        if self.template is None:
            raise _bad("messages: this model has no chat template; use /v1/completions", "messages")
        kwargs = {**self.args.default_chat_template_kwargs, **(template_kwargs or {})}
        for reserved in ("messages", "tools", "add_generation_prompt"):
            kwargs.pop(reserved, None)
        big = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) > _BIG_TEXT
        if big:
            self._check_prompt_text("".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)),
                                    "messages")
        try:
            return await _maybe_thread(big, self.template.apply, messages, tools=tools,
                                       add_generation_prompt=add_generation_prompt, **kwargs)
        except ChatTemplateError as e:
            msg = str(e)
            param = "messages" if msg.startswith("messages") else ("tools" if msg.startswith("tools") else None)
            raise _bad(msg, param) from None

    @_guard
    async def chat_completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        self._auth(request)
        req: P.ChatCompletionRequest = await self._read(request, P.ChatCompletionRequest)
        self._check_model(req.model)
        await self._ensure_ready()
        tok = self.tokenizer

        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        names = [t["function"]["name"] for t in tools or []]
        named = None
        if isinstance(choice, P.NamedToolChoice):
            named = choice.function.name
            if named not in names:
                raise _bad(f"tool_choice: function {named!r} is not among the declared tools {names}", "tool_choice")
        elif choice == "required" and not tools:
            raise _bad("tool_choice: 'required' needs at least one tool in tools", "tool_choice")
        elif choice == "auto" and tools and not self.args.enable_auto_tool_choice:
            raise _bad("tool_choice: 'auto' is disabled on this server (enable_auto_tool_choice: false)",
                       "tool_choice")
        if req.n < 1:
            raise _bad(f"n: must be at least 1 (got {req.n})", "n")
        self._check_fits(req.n, "n")
        guided_field = self.info.get("guided_field")  # engine support for grammar-constrained decoding
        rf = req.response_format
        if rf is not None and rf.type != "text" and (not guided_field or rf.type not in ("json_object",
                                                                                          "json_schema")):
            raise _bad(f"response_format: type {rf.type!r} is not supported", "response_format")

        cp = await self._render_chat(req.messages, None if choice == "none" else tools, req.add_generation_prompt,
                                     req.chat_template_kwargs)
        thinking = self.args.enable_reasoning and self._template_thinks and cp.thinking
        parse_tools = choice != "none"
        guided = None
        prefill = ""
        strict = any(t["function"].get("strict") for t in tools or [])
        if guided_field and tools and (named is not None or choice == "required" or (choice == "auto" and strict)):
            # The engine constrains the tool-call section to the declared functions and their argument schemas.
            guided = {"tools": tools, "tool_choice": {"name": named} if named is not None else choice,
                      "thinking": thinking, "parallel_tool_calls": req.parallel_tool_calls is not False,
                      "call_index": cp.tool_call_offset}
        elif named is not None:
            # No grammar: open the call for the model; its text is parsed and degrades to content if no valid call.
            prefill = f"{_TOOL_SECTION_BEGIN}{_TOOL_CALL_BEGIN}functions.{named}:{cp.tool_call_offset}{_TOOL_ARG_BEGIN}"
        elif choice == "required":
            prefill = f"{_TOOL_SECTION_BEGIN}{_TOOL_CALL_BEGIN}functions."
        if guided is None and rf is not None and rf.type == "json_object":
            guided = {"json_object": True, "thinking": thinking}
        elif guided is None and rf is not None and rf.type == "json_schema":
            schema = (getattr(rf, "json_schema", None) or {})
            schema = schema.get("schema") if isinstance(schema, dict) else None
            if not isinstance(schema, dict):
                raise _bad("response_format.json_schema.schema: expected a JSON schema object",
                           "response_format.json_schema.schema")
            # A thinking model reasons first (reasoning_content); the constraint applies to what follows </think>.
            guided = {"json_schema": schema, "thinking": thinking}
        ids = list(cp.token_ids)
        if prefill:
            ids += tok.encode_with_specials(tok.split_special(prefill))

        max_tokens = self._max_tokens(req.requested_max_tokens, len(ids), "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        sampling = self._sampling(req, max_tokens, k, None, skip_special=False)
        if guided is not None:
            sampling[guided_field] = guided
        rid = P.random_id("chatcmpl")
        gen, first = await self._open({"request_id": rid, "prompt_token_ids": ids, "sampling": sampling})
        hidden = self._special_names if req.skip_special_tokens else ()

        from k2ray.tokenizer.parsers import StreamingOutputParser

        choices = []
        for i in range(req.n):
            parser = StreamingOutputParser(thinking=thinking, tools=parse_tools,
                                           tool_call_offset=cp.tool_call_offset, hidden_tokens=hidden)
            if prefill:
                parser.feed(prefill)
            choices.append(_Choice(i, parser))
        headers = {"x-request-id": rid, "x-k2ray-group": str(first.get("group", ""))}
        ctx = dict(rid=rid, t0=t0, n_prompt=len(ids), cached=first.get("num_cached_tokens", 0), k=k,
                   thinking=thinking, created=int(time.time()))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(gen, first, choices, ctx, include_usage),
                                     media_type="text/event-stream", headers=headers)
        return await self._chat_full(gen, first, choices, ctx, headers)

    def _chat_deltas(self, ch: _Choice, out: dict, k: Optional[int]) -> tuple[list[dict], list]:
        ch.num_tokens += len(out["token_ids"])
        deltas = ch.parser.feed(out["text"])
        if out["finish_reason"] is not None:
            deltas += ch.parser.finish()
            ch.finish_reason = openai_finish_reason(out["finish_reason"], bool(ch.parser.result.tool_calls))
            ch.stop_reason = out["stop_reason"]
        lps = []
        if k is not None and out["logprobs"]:
            lps = [self._chat_logprob(p, k) for p in out["logprobs"]]
        return deltas, lps

    async def _chat_full(self, gen, first, choices: list[_Choice], ctx: dict, headers: dict) -> Response:
        state: dict = {}
        try:
            async for item in self._items(gen, first):
                if "error" in item:
                    raise APIError.from_item(item["error"])
                self._observe(ctx["t0"], state, item)
                for out in item["outputs"]:
                    ch = choices[out["index"]]
                    _, lps = self._chat_deltas(ch, out, ctx["k"])
                    ch.logprobs.extend(lps)
        except BaseException:
            gen.cancel()
            raise
        self._e2e.observe(time.monotonic() - ctx["t0"])
        resp_choices = []
        for ch in choices:
            r = ch.parser.result
            calls = [P.ToolCall(id=c["id"], function=P.FunctionCall(**c["function"])) for c in r.tool_calls]
            msg = P.ChatMessage(content=(r.content if (r.content or not calls) else None),
                                reasoning_content=(r.reasoning_content if ctx["thinking"] else None), tool_calls=calls)
            lp = P.ChoiceLogprobs(content=[P.TokenLogprob(**e) for e in ch.logprobs]) if ctx["k"] is not None else None
            resp_choices.append(P.ChatCompletionChoice(index=ch.index, message=msg, logprobs=lp,
                                                       finish_reason=ch.finish_reason, stop_reason=ch.stop_reason))
        n_out = sum(ch.num_tokens for ch in choices)
        usage = P.UsageInfo(prompt_tokens=ctx["n_prompt"], completion_tokens=n_out,
                            total_tokens=ctx["n_prompt"] + n_out,
                            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=ctx["cached"]))
        resp = P.ChatCompletionResponse(id=ctx["rid"], created=ctx["created"], model=self.model_name,
                                        choices=resp_choices, usage=usage)
        self._count_finished(choices[0].finish_reason)
        return JSONResponse(resp.model_dump(), headers=headers)

    async def _chat_stream(self, gen, first, choices: list[_Choice], ctx: dict, include_usage: bool):
        base = {"id": ctx["rid"], "object": "chat.completion.chunk", "created": ctx["created"],
                "model": self.model_name}

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> str:
            c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            if stop_reason is not None:
                c["stop_reason"] = stop_reason
            return _sse({**base, "choices": [c], **({"usage": None} if include_usage else {})})

        done = False
        state: dict = {}
        try:
            for ch in choices:
                yield chunk(ch.index, {"role": "assistant", "content": ""})
            async for item in self._items(gen, first):
                if "error" in item:
                    err = APIError.from_item(item["error"])
                    self._count_error(err.status)
                    yield _sse(err.body())
                    break
                self._observe(ctx["t0"], state, item)
                for out in item["outputs"]:
                    ch = choices[out["index"]]
                    deltas, lps = self._chat_deltas(ch, out, ctx["k"])
                    lp_obj = {"content": lps} if lps else None
                    for d in deltas:
                        yield chunk(ch.index, d, lp_obj)
                        lp_obj = None
                    if lp_obj is not None:  # tokens whose text is still held back
                        yield chunk(ch.index, {}, lp_obj)
                    if ch.finish_reason is not None:
                        yield chunk(ch.index, {}, None, ch.finish_reason, ch.stop_reason)
            else:
                self._e2e.observe(time.monotonic() - ctx["t0"])
                self._count_finished(choices[0].finish_reason)
            if include_usage:
                n_out = sum(ch.num_tokens for ch in choices)
                usage = {"prompt_tokens": ctx["n_prompt"], "completion_tokens": n_out,
                         "total_tokens": ctx["n_prompt"] + n_out,
                         "prompt_tokens_details": {"cached_tokens": ctx["cached"]}}
                yield _sse({**base, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            done = True
        except Exception as e:  # never a traceback on the wire
            err = _handle_error(e)
            self._count_error(err.status)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # client went away: abort the request in the engine
                gen.cancel()
                self._count_finished("abort")

    # -- completions --------------------------------------------------------------------------------------------------
    @_guard
    async def completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        self._auth(request)
        req: P.CompletionRequest = await self._read(request, P.CompletionRequest)
        self._check_model(req.model)
        await self._ensure_ready()
        tok = self.tokenizer
        prompts = req.prompt
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts:
            raise _bad("prompt: must not be empty", "prompt")
        if req.n < 1:
            raise _bad(f"n: must be at least 1 (got {req.n})", "n")
        vocab = tok.vocab_size
        prompt_ids, prompt_texts = [], []
        for j, p in enumerate(prompts):
            if isinstance(p, str):
                self._check_prompt_text(p, "prompt")
                ids = await _maybe_thread(len(p) > _BIG_TEXT, tok.encode, p)
                text = p
            else:
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:
                    raise _bad(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
                ids, text = list(p), (tok.decode(p) if req.echo else "")
            if not ids:
                raise _bad("prompt: must not be empty", "prompt")
            prompt_ids.append(ids)
            prompt_texts.append(text)
        self._check_fits(len(prompt_ids) * req.n, "n" if len(prompt_ids) == 1 else "prompt")
        max_tokens = [self._max_tokens(req.max_tokens, len(ids), "prompt") for ids in prompt_ids]
        k = req.logprobs
        want_prompt_lp = k if (req.echo and k is not None) else None
        cid = P.random_id("cmpl")
        sampling = self._sampling(req, max_tokens[0], k, want_prompt_lp, req.skip_special_tokens)
        opened = []
        try:
            for j, ids in enumerate(prompt_ids):
                sampling = {**sampling, "max_tokens": max_tokens[j]}
                rid = cid if len(prompt_ids) == 1 else f"{cid}-{j}"
                opened.append(await self._open({"request_id": rid, "prompt_token_ids": ids, "sampling": sampling}))
        except BaseException:
            for g, _ in opened:
                g.cancel()
            raise
        ctx = dict(rid=cid, t0=t0, k=k, echo=req.echo, n=req.n, skip_special=req.skip_special_tokens,
                   created=int(time.time()), prompt_ids=prompt_ids, prompt_texts=prompt_texts,
                   cached=sum(f.get("num_cached_tokens", 0) for _, f in opened))
        headers = {"x-request-id": cid, "x-k2ray-group": str(opened[0][1].get("group", ""))}
        choices = [_Choice(j * req.n + i) for j in range(len(prompt_ids)) for i in range(req.n)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(opened, choices, ctx, include_usage),
                                     media_type="text/event-stream", headers=headers)
        return await self._completion_full(opened, choices, ctx, headers)

    def _prompt_logprobs(self, ids: list[int], plp: Optional[list]) -> tuple[list[str], list, list, list[int]]:
        toks = [self._token_str(t) for t in ids]
        widths = [len(s) for s in toks]  # the echoed prompt shows special tokens as written
        lps: list = [None]
        tops: list = [None]
        for j in range(1, len(ids)):
            pairs = plp[j] if plp and j < len(plp) and plp[j] is not None else None
            if pairs is None:
                lps.append(None)
                tops.append(None)
                continue
            d = dict(pairs)
            lps.append(d.get(ids[j]))
            tops.append({self._token_str(t): v for t, v in pairs})
        return toks, lps, tops, widths

    @staticmethod
    def _merge_logprobs(dst: P.CompletionLogprobs, toks: list[str], lps: list, tops: list, widths: list[int],
                        offset: int) -> int:
        for s, lp, top, w in zip(toks, lps, tops, widths):
            dst.tokens.append(s)
            dst.token_logprobs.append(lp)
            dst.top_logprobs.append(top)
            dst.text_offset.append(offset)
            offset += w
        return offset

    def _gen_logprobs(self, out: dict, skip_special: bool) -> tuple[list[str], list, list, list[int]]:
        toks, lps, tops, widths = [], [], [], []
        tok = self.tokenizer
        for t, pairs in zip(out["token_ids"], out["logprobs"] or []):
            s = self._token_str(t)
            toks.append(s)
            lps.append(pairs[0][1])
            tops.append({self._token_str(i): v for i, v in pairs})
            widths.append(0 if skip_special and tok.is_special(t) else len(s))
        return toks, lps, tops, widths

    async def _merged(self, opened) -> AsyncIterator[tuple[int, dict]]:
        """Items of every prompt's stream as they come: ``(prompt index, item)``."""
        if len(opened) == 1:
            gen, first = opened[0]
            async for item in self._items(gen, first):
                yield 0, item
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(j, gen, first):
            try:
                async for item in self._items(gen, first):
                    await queue.put((j, item))
            except BaseException as e:
                await queue.put((j, e))
            finally:
                await queue.put((j, None))

        tasks = [asyncio.ensure_future(pump(j, g, f)) for j, (g, f) in enumerate(opened)]
        left = len(tasks)
        try:
            while left:
                j, item = await queue.get()
                if item is None:
                    left -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield j, item
        finally:
            for t in tasks:
                t.cancel()

    async def _completion_full(self, opened, choices: list[_Choice], ctx: dict, headers: dict) -> Response:
        n, k = ctx["n"], ctx["k"]
        lp_objs = {ch.index: P.CompletionLogprobs() for ch in choices} if k is not None else {}
        prompt_lp: dict[int, Any] = {}
        state: dict = {}
        try:
            async for j, item in self._merged(opened):
                if "error" in item:
                    raise APIError.from_item(item["error"])
                self._observe(ctx["t0"], state, item, timing=j == 0)
                if "prompt_logprobs" in item:
                    prompt_lp[j] = item["prompt_logprobs"]
                for out in item["outputs"]:
                    ch = choices[j * n + out["index"]]
                    ch.text.append(out["text"])
                    ch.num_tokens += len(out["token_ids"])
                    if k is not None and out["logprobs"]:
                        ch.logprobs.append(out)
                    if out["finish_reason"] is not None:
                        ch.finish_reason, ch.stop_reason = out["finish_reason"], out["stop_reason"]
        except BaseException:
            for g, _ in opened:
                g.cancel()
            raise
        self._e2e.observe(time.monotonic() - ctx["t0"])
        resp_choices = []
        for ch in choices:
            j = ch.index // n
            text = "".join(ch.text)
            lp = None
            if k is not None:
                lp = lp_objs[ch.index]
                off = 0
                if ctx["echo"]:
                    off = self._merge_logprobs(lp, *self._prompt_logprobs(ctx["prompt_ids"][j], prompt_lp.get(j)), 0)
                for out in ch.logprobs:
                    off = self._merge_logprobs(lp, *self._gen_logprobs(out, ctx["skip_special"]), off)
            if ctx["echo"]:
                text = ctx["prompt_texts"][j] + text
            resp_choices.append(P.CompletionChoice(index=ch.index, text=text, logprobs=lp,
                                                   finish_reason=ch.finish_reason, stop_reason=ch.stop_reason))
        n_prompt = sum(len(ids) for ids in ctx["prompt_ids"])
        n_out = sum(ch.num_tokens for ch in choices)
        usage = P.UsageInfo(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=ctx["cached"]))
        resp = P.CompletionResponse(id=ctx["rid"], created=ctx["created"], model=self.model_name,
                                    choices=resp_choices, usage=usage)
        self._count_finished(choices[0].finish_reason)
        return JSONResponse(resp.model_dump(), headers=headers)

    async def _completion_stream(self, opened, choices: list[_Choice], ctx: dict, include_usage: bool):
        n, k = ctx["n"], ctx["k"]
        base = {"id": ctx["rid"], "object": "text_completion", "created": ctx["created"], "model": self.model_name}
        offsets = {ch.index: 0 for ch in choices}
        echoed: set[int] = set()

        def chunk(index, text, logprobs=None, finish_reason=None, stop_reason=None) -> str:
            c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            if stop_reason is not None:
                c["stop_reason"] = stop_reason
            return _sse({**base, "choices": [c], **({"usage": None} if include_usage else {})})

        done = False
        state: dict = {}
        try:
            async for j, item in self._merged(opened):
                if "error" in item:
                    err = APIError.from_item(item["error"])
                    self._count_error(err.status)
                    yield _sse(err.body())
                    break
                self._observe(ctx["t0"], state, item, timing=j == 0)
                if ctx["echo"]:
                    for i in range(n):
                        idx = j * n + i
                        if idx in echoed:
                            continue
                        echoed.add(idx)
                        lp = None
                        if k is not None:
                            lpo = P.CompletionLogprobs()
                            offsets[idx] = self._merge_logprobs(
                                lpo, *self._prompt_logprobs(ctx["prompt_ids"][j], item.get("prompt_logprobs")), 0)
                            lp = lpo.model_dump()
                        yield chunk(idx, ctx["prompt_texts"][j], lp)
                for out in item["outputs"]:
                    ch = choices[j * n + out["index"]]
                    ch.num_tokens += len(out["token_ids"])
                    lp = None
                    if k is not None and out["logprobs"]:
                        lpo = P.CompletionLogprobs()
                        offsets[ch.index] = self._merge_logprobs(
                            lpo, *self._gen_logprobs(out, ctx["skip_special"]), offsets[ch.index])
                        lp = lpo.model_dump()
                    if out["text"] or lp is not None:
                        yield chunk(ch.index, out["text"], lp)
                    if out["finish_reason"] is not None:
                        ch.finish_reason, ch.stop_reason = out["finish_reason"], out["stop_reason"]
                        yield chunk(ch.index, "", None, ch.finish_reason, ch.stop_reason)
            else:
                self._e2e.observe(time.monotonic() - ctx["t0"])
                self._count_finished(choices[0].finish_reason)
            if include_usage:
                n_prompt = sum(len(ids) for ids in ctx["prompt_ids"])
                n_out = sum(ch.num_tokens for ch in choices)
                yield _sse({**base, "choices": [], "usage": {
                    "prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                    "prompt_tokens_details": {"cached_tokens": ctx["cached"]}}})
            yield "data: [DONE]\n\n"
            done = True
        except Exception as e:
            err = _handle_error(e)
            self._count_error(err.status)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                for g, _ in opened:
                    g.cancel()
                self._count_finished("abort")

    def __del__(self):  # pragma: no cover
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
