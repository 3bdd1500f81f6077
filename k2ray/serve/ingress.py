"""OpenAIIngress: the Serve deployment in front of the model groups. Endpoint glue only: read and check a request
(:mod:`k2ray.serve.openai.http`), plan it (:mod:`~k2ray.serve.openai.chat`, :mod:`~k2ray.serve.openai.completions`;
Anthropic's Messages API through :mod:`k2ray.serve.anthropic.translate` onto the chat planner),
start it on a model group (:mod:`k2ray.serve.router_client`) and answer through an accumulator
(:mod:`k2ray.serve.responses`); the Responses API (``/v1/responses``: :mod:`~k2ray.serve.openai.responses_api` onto the
chat planner, :mod:`~k2ray.serve.openai.responses_events` around the chat accumulator, stored responses in
:mod:`k2ray.serve.response_store`); plus ``/health``, the model list, the tokenizer endpoints and the group's layout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2ray import logs
from k2ray.serve import access_log, health, redact, replica
from k2ray.serve.admission import AdmissionMiddleware, GroupWatch
from k2ray.serve.anthropic import errors as anthropic_errors
from k2ray.serve.anthropic import protocol as A
from k2ray.serve.anthropic import translate
from k2ray.serve.anthropic.accumulate import MessagesAccumulator
from k2ray.serve.config import ServeArgs
from k2ray.serve.model_view import ModelView, load_model_view
from k2ray.serve.openai import chat, completions
from k2ray.serve.openai import responses_api as RA
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.accumulate import ChatAccumulator, CompletionAccumulator
from k2ray.serve.openai.errors import APIError, bad_request
from k2ray.serve.openai.http import json_body, require_api_key
from k2ray.serve.openai.responses_events import ResponsesAccumulator
from k2ray.serve.response_store import ActorStoreClient, LocalStoreClient
from k2ray.serve.responses import Responder, answers_errors, answers_errors_as
from k2ray.serve.router_client import ModelGroups, RouterClient, open_all
from k2ray.serve.wire import GenerateRequest


async def _off_loop(fn, *args):
    """Planning (template rendering, tokenization) runs in a worker thread, never on the event loop: a request
    with a huge prompt, thousands of messages or tools must not stall the other streams."""
    return await asyncio.to_thread(fn, *args)


class OpenAIIngress:
    """FastAPI ingress (``@serve.ingress`` is applied in :mod:`k2ray.serve.app`). ``router``: the K2Router deployment
    handle, or any :class:`~k2ray.serve.router_client.ModelGroups` (tests). Stored responses go to the application's
    shared store actor inside Serve, to an in-process store outside it (tests)."""

    def __init__(self, router, args: dict | ServeArgs):
        from ray.serve.handle import DeploymentHandle

        logs.configure()
        self.groups: ModelGroups = RouterClient(router) if isinstance(router, DeploymentHandle) else router
        self.args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
        self.model_name = self.args.model_name
        self.chat_options = chat.ChatOptions(self.args.enable_auto_tool_choice, self.args.enable_reasoning,
                                             self.args.default_chat_template_kwargs, self.args.image_limits())
        self.responder = Responder(self.model_name)
        self.watch = GroupWatch()  # the ready model groups, for admission
        self.view: Optional[ModelView] = None
        self._view_lock = asyncio.Lock()
        self.replica = replica.identity()  # None outside Serve
        a = self.args
        self.response_store = (
            ActorStoreClient(self.replica.app_name, self.replica.namespace, a.responses_store_max,
                             a.responses_store_ttl_s)
            if self.replica is not None else LocalStoreClient(a.responses_store_max, a.responses_store_ttl_s))

    __serve_build_asgi_app__ = lambda self: self.build_asgi_app()  # noqa: E731 - Serve builds it in the replica

    def build_asgi_app(self) -> FastAPI:
        """A FastAPI app whose routes call this instance (usable without Serve too, e.g. with a TestClient)."""

        @contextlib.asynccontextmanager
        async def lifespan(app):
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(health.announce_when_ready(self.groups, self.model_name)),
                     loop.create_task(self.watch.poll(self.groups))]
            yield
            for t in tasks:
                t.cancel()

        api = FastAPI(title="k2ray", description="OpenAI-compatible API for Kimi K2 on Ray", docs_url=None,
                      redoc_url=None, openapi_url=None, lifespan=lifespan)
        api.state.api_keys = [k.encode() for k in self.args.resolved_api_keys()]  # ConfigError: replica won't start
        api.state.max_request_bytes = self.args.max_request_bytes

        # Errors raised before an endpoint runs answer in the shape of the path's API (Anthropic's on /v1/messages*).
        @api.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError):  # raised by the dependencies (key, body)
            resp = anthropic_errors.response_for_path(request.url.path, exc)
            self.responder.count_error(resp.status_code)
            return resp

        @api.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            err = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code)
            return anthropic_errors.response_for_path(request.url.path, err)

        keyed = [Depends(require_api_key)]
        api.add_api_route("/health", self.health, methods=["GET"])
        for path, fn, method in [
            ("/v1/models", self.models, "GET"), ("/v1/models/{model_id:path}", self.model, "GET"),
            ("/v1/chat/completions", self.chat_completions, "POST"), ("/v1/completions", self.completions, "POST"),
            ("/v1/messages", self.messages, "POST"), ("/v1/messages/count_tokens", self.count_tokens, "POST"),
            ("/tokenize", self.tokenize, "POST"), ("/detokenize", self.detokenize, "POST"),
            ("/v1/responses", self.create_response, "POST"),
            ("/v1/responses/{response_id}", self.retrieve_response, "GET"),
            ("/v1/responses/{response_id}", self.delete_response, "DELETE"),
            ("/v1/k2ray/layout", self.layout, "GET"), ("/v1/k2ray/stats", self.stats, "GET"),
            ("/v1/k2ray/rebalance", self.rebalance, "POST"), ("/v1/k2ray/resize", self.resize, "POST"),
        ]:
            api.add_api_route(path, fn, methods=[method], dependencies=keyed)
        per_group = self.args.group_capacity
        api.add_middleware(AdmissionMiddleware, watch=self.watch, per_group=per_group)
        if self.replica is not None:
            api.add_middleware(replica.ReplicaHeaderMiddleware, replica_id=self.replica.replica_id)
        api.add_middleware(access_log.AccessLogMiddleware)  # outermost: refusals are logged too
        return api

    async def _model(self, name: Optional[str]) -> ModelView:
        """Checks the request's ``model`` and returns the model's view (fetched from a group on first use)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{self.model_name}')",
                           "invalid_request_error", "model", "model_not_found")
        if self.view is None:
            async with self._view_lock:
                if self.view is None:
                    self.view = await load_model_view(self.groups, self.args)
        return self.view

    # -- health, model list, layout -------------------------------------------------------------------------------
    async def health(self) -> Response:  # no key needed: load balancers and probes call it
        return await health.health(self.groups)

    def _card(self) -> P.ModelCard:
        info = self.view.info if self.view else {}
        return P.ModelCard(id=self.model_name, root=self.args.model, max_model_len=info.get("max_model_len"))

    @answers_errors
    async def models(self) -> Response:
        with contextlib.suppress(APIError):  # listed while starting too
            await self._model(None)
        return JSONResponse(P.ModelList(data=[self._card()]).model_dump())

    @answers_errors
    async def model(self, model_id: str) -> Response:
        try:
            await self._model(model_id)
        except APIError as e:
            if e.status == 404:
                raise
        return JSONResponse(self._card().model_dump())

    @answers_errors
    async def layout(self, request: Request) -> Response:
        """Where the answering model group's actors and experts live (no addresses or pids for a remote client of a
        server without keys: :mod:`k2ray.serve.redact`)."""
        lay = await self.groups.layout()
        return JSONResponse(lay if redact.full_view(request) else redact.layout(lay))

    @answers_errors
    async def stats(self, request: Request) -> Response:
        """Engine counters of the answering model group (running, waiting, KV blocks, aborted, ...)."""
        st = await self.groups.stats()
        return JSONResponse(st if redact.full_view(request) else redact.stats(st))

    @answers_errors
    async def rebalance(self, request: Request) -> Response:
        """Rebalance the answering model group's experts now (EPLB); answers the predicted balancedness before and
        after. An admin action: with keys off, only a local client may (:func:`k2ray.serve.redact.full_view`)."""
        if not redact.full_view(request):
            raise APIError(403, "rebalancing needs an API key (or a local client when no keys are configured)",
                           "permission_error", None, "forbidden")
        return JSONResponse(await self.groups.rebalance())

    @answers_errors
    async def resize(self, request: Request, req: P.ResizeRequest = Depends(json_body(P.ResizeRequest))) -> Response:
        """Resize the answering model group's attention and expert pools while it serves, within
        ``parallel.elastic``'s ranges; answers at once (the switch follows once the new workers are loaded). An
        admin action, like the rebalance."""
        if not redact.full_view(request):
            raise APIError(403, "resizing needs an API key (or a local client when no keys are configured)",
                           "permission_error", None, "forbidden")
        out = await self.groups.resize(req.attention_workers, req.expert_shards)
        if out.get("error_param"):
            raise APIError(400, out["reason"], "invalid_request_error", out["error_param"], "invalid_value")
        return JSONResponse(out)

    # -- tokenizer ------------------------------------------------------------------------------------------------
    @answers_errors
    async def tokenize(self, req: P.TokenizeRequest = Depends(json_body(P.TokenizeRequest))) -> Response:
        view = await self._model(req.model)
        if req.prompt is not None:
            ids = await _off_loop(view.tokenizer.encode, req.prompt)
        else:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
            ids = (await _off_loop(chat.render_chat, view.template, req.messages, tools, req.add_generation_prompt,
                                   req.chat_template_kwargs, self.chat_options, view.limits)).token_ids
        return JSONResponse({"count": len(ids), "max_model_len": view.limits.max_model_len, "tokens": ids})

    @answers_errors
    async def detokenize(self, req: P.DetokenizeRequest = Depends(json_body(P.DetokenizeRequest))) -> Response:
        tok = (await self._model(req.model)).tokenizer
        bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {tok.vocab_size})", "tokens")
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    # -- generation -----------------------------------------------------------------------------------------------
    @answers_errors
    async def chat_completions(self, req: P.ChatCompletionRequest = Depends(json_body(P.ChatCompletionRequest))
                               ) -> Response:
        t0 = time.monotonic()
        view = await self._model(req.model)
        plan = await _off_loop(chat.plan_chat, req, view.template, view.tokenizer, view.limits, self.chat_options,
                               view.thinks, view.image_config)
        rid = P.random_id("chatcmpl")
        opened = await open_all(self.groups, [GenerateRequest(rid, plan.prompt_token_ids, plan.sampling,
                                                              list(plan.images))])
        acc = ChatAccumulator(plan, req.n, rid, self.model_name, int(time.time()), view.tokenizer)
        return await self.responder.answer(acc, opened, t0, req.stream, req.stream_options)

    @answers_errors
    async def completions(self, req: P.CompletionRequest = Depends(json_body(P.CompletionRequest))) -> Response:
        t0 = time.monotonic()
        view = await self._model(req.model)
        plan = await _off_loop(completions.plan_completions, req, view.tokenizer, view.limits)
        cid = P.random_id("cmpl")
        rids = [cid] if len(plan.prompts) == 1 else [f"{cid}-{j}" for j in range(len(plan.prompts))]
        opened = await open_all(self.groups, [GenerateRequest(r, p.token_ids, p.sampling)
                                              for r, p in zip(rids, plan.prompts)])
        acc = CompletionAccumulator(plan, cid, self.model_name, int(time.time()), view.tokenizer)
        return await self.responder.answer(acc, opened, t0, req.stream, req.stream_options)

    # -- the Anthropic Messages API: translated onto the chat planner and accumulator ----------------------------------
    @answers_errors_as(anthropic_errors.response)
    async def messages(self, req: A.MessagesRequest = Depends(json_body(A.MessagesRequest))) -> Response:
        t0 = time.monotonic()
        view = await self._model(req.model)
        plan = await _off_loop(translate.plan_messages, req, view.template, view.tokenizer, view.limits,
                               self.chat_options, view.thinks, view.image_config)
        mid = A.random_id("msg")
        opened = await open_all(self.groups, [GenerateRequest(mid, plan.prompt_token_ids, plan.sampling,
                                                              list(plan.images))])
        acc = MessagesAccumulator(plan, mid, self.model_name, view.tokenizer, req.stop_sequences)
        return await self.responder.answer(acc, opened, t0, req.stream, None)

    @answers_errors_as(anthropic_errors.response)
    async def count_tokens(self, req: A.CountTokensRequest = Depends(json_body(A.CountTokensRequest))) -> Response:
        view = await self._model(req.model)
        plan = await _off_loop(translate.plan_messages, req, view.template, view.tokenizer, view.limits,
                               self.chat_options, view.thinks, view.image_config)
        return JSONResponse(A.TokenCount(input_tokens=plan.num_prompt_tokens).model_dump())

    # -- the Responses API ----------------------------------------------------------------------------------------
    @answers_errors
    async def create_response(self, req: RA.ResponsesRequest = Depends(json_body(RA.ResponsesRequest))) -> Response:
        t0 = time.monotonic()
        RA.check_request(req)
        view = await self._model(req.model)
        previous = None
        if req.previous_response_id is not None:
            previous = await self.response_store.get(req.previous_response_id)
            if previous is None:
                raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                               "invalid_request_error", "previous_response_id", "previous_response_not_found")
        turn = await _off_loop(RA.plan_response, req, previous, view.template, view.tokenizer, view.limits,
                               self.chat_options, view.thinks, view.image_config)
        rid = RA.new_id("resp")
        opened = await open_all(self.groups, [GenerateRequest(rid, turn.plan.prompt_token_ids, turn.plan.sampling,
                                                              list(turn.plan.images))])
        chat_acc = ChatAccumulator(turn.plan, 1, rid, self.model_name, turn.created_at, view.tokenizer)
        acc = ResponsesAccumulator(chat_acc, turn, rid, self.model_name)

        async def store():
            if acc.status in ("completed", "incomplete"):
                await self.response_store.put(rid, acc.record())

        return await self.responder.answer(acc, opened, t0, req.stream, None, finalize=store if req.stored else None)

    async def _stored(self, response_id: str) -> dict:
        record = await self.response_store.get(response_id)
        if record is None:
            raise APIError(404, f"No response found with id '{response_id}'.", "invalid_request_error",
                           "response_id", "not_found")
        return record

    @answers_errors
    async def retrieve_response(self, response_id: str) -> Response:
        return JSONResponse((await self._stored(response_id))["response"])

    @answers_errors
    async def delete_response(self, response_id: str) -> Response:
        if not await self.response_store.delete(response_id):
            raise APIError(404, f"No response found with id '{response_id}'.", "invalid_request_error",
                           "response_id", "not_found")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
