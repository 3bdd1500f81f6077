"""The offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))`` and ``LLM.chat(messages, ...)``.

All prompts of one ``generate`` call go through the continuous batcher together; results come back in prompt order.
``model`` is a checkpoint directory or a built-in name (``k2ray-demo``, ``k2ray-tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.engine.engine import LLMEngine
from k2ray.engine.request import RequestOutput
from k2ray.runtime.sampling import SamplingParams
from k2ray.checkpoint.builtin import BUILTIN_MODELS, resolve_model  # names -> directories; imports no Ray

PromptLike = str | Sequence[int]


@dataclass
class ChatOutput:
    """One conversation's result: the engine output and, per completion, the OpenAI assistant message parsed from it
    (``content``, ``reasoning_content``, ``tool_calls``) with its ``finish_reason`` (``tool_calls`` when it called)."""

    output: RequestOutput
    messages: list[dict]
    finish_reasons: list[Optional[str]]


class LLM:
    """A model directory served in-process (``executor="local"``) or by a Ray model group (``executor="ray"``).

    ``engine_kwargs`` are :class:`~k2ray.config.EngineConfig` fields (``max_num_seqs``, ``num_kv_blocks``,
    ``block_size``, ``max_num_batched_tokens``, ``enable_prefix_caching``, ...); extra Ray layout options go in
    ``parallel`` (a :class:`~k2ray.config.ParallelConfig` or a dict of its fields).
    """

    def __init__(
        self,
        model: str | Path,
        dtype: str = "float32",
        executor: str = "local",
        attention_workers: int = 1,
        expert_shards: int = 1,
        parallel: ParallelConfig | dict | None = None,
        **engine_kwargs,
    ):
        model_dir = resolve_model(str(model)) if str(model) in BUILTIN_MODELS else Path(model)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"model: {model_dir} is not a model directory (no config.json)")
        self.model_dir = model_dir
        self.engine_config = EngineConfig(dtype=dtype, **engine_kwargs)
        if isinstance(parallel, ParallelConfig):
            par = parallel.model_copy(update={
                "executor": executor, "attention_workers": attention_workers, "expert_shards": expert_shards,
            })
        else:
            par = ParallelConfig(
                executor=executor, attention_workers=attention_workers, expert_shards=expert_shards, **(parallel or {})
            )
        self.parallel_config = par
        self.engine = LLMEngine.from_model(model_dir, self.engine_config, par)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptLike | Iterable[PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        images: Optional[Sequence[Optional[list]]] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, or a list of token ids; or a list of those). ``params`` is one
        :class:`SamplingParams` for all or a list with one per prompt. Every prompt is validated before anything
        runs, so an invalid one raises without side effects. ``images``: per prompt, the
        :class:`~k2ray.tokenizer.image.ProcessedImage` of each of its ``<|media_pad|>`` placeholders (or None)."""
        plist = _normalize_prompts(prompts)
        if images is not None and len(images) != len(plist):
            raise ValueError(f"images: {len(images)} image lists for {len(plist)} prompts")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            param_list = [params] * len(plist)
        else:
            param_list = list(params)
            if len(param_list) != len(plist):
                raise ValueError(f"params: {len(param_list)} sampling params for {len(plist)} prompts")
        engine = self.engine
        reqs = []
        try:
            for i, (p, sp) in enumerate(zip(plist, param_list)):
                try:
                    reqs.append(engine.prepare_request(p, sp, images=images[i] if images else None))
                except ValueError as e:
                    if len(plist) == 1:
                        raise
                    raise type(e)(f"prompt {i}: {e}") from None
        except BaseException:
            for r in reqs:  # release the reserved ids
                engine.release_prepared(r)
            raise
        for r in reqs:
            engine.add_prepared(r)
        final: dict[str, RequestOutput] = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for r in reqs:
                if r.request_id not in final:
                    engine.abort_request(r.request_id)
            raise
        return [final[r.request_id] for r in reqs]

    def chat(
        self,
        conversations: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | None = None,
        tools: Optional[list[dict]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[ChatOutput]:
        """Render each conversation (OpenAI messages) with the model's chat template, generate, and parse the
        reasoning and tool calls as the Serve API does. One conversation or a list of them. Image parts
        (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``) go through the model's image
        encoder (Kimi K2.5)."""
        from k2ray.tokenizer.chat import ChatTemplate
        from k2ray.tokenizer.parsers import openai_finish_reason, parse_output

        convs = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        template = ChatTemplate.from_dir(self.model_dir, self.tokenizer)
        prompts = [template.apply(c, tools, **(chat_template_kwargs or {})) for c in convs]
        images = [self._load_images(cp.images) for cp in prompts] if any(cp.images for cp in prompts) else None
        params = params or SamplingParams()
        # the parser needs the markers in the text; it hides them itself
        params = params.model_copy(update={"skip_special_tokens": False})
        thinks = template.thinks
        results = []
        for cp, out in zip(prompts, self.generate([cp.token_ids for cp in prompts], params, images=images)):
            msgs, reasons = [], []
            for o in out.outputs:
                parsed = parse_output(o.text, thinking=thinks and cp.thinking, tools=bool(tools),
                                      tool_call_offset=cp.tool_call_offset,
                                      hidden_tokens=tuple(self.tokenizer.special_tokens))
                msg = parsed.to_message()
                msgs.append(msg)
                reasons.append(openai_finish_reason(o.finish_reason, bool(msg.get("tool_calls"))))
            results.append(ChatOutput(out, msgs, reasons))
        return results

    def _load_images(self, parts) -> list:
        """Decode and preprocess the image parts of one conversation (``data:`` URLs)."""
        from k2ray.tokenizer.image import ImageError, ImageProcessorConfig, load_image, parse_data_url

        if not parts:
            return []
        if self.engine.args.vision is None:
            raise ValueError(f"{parts[0].where}: this model does not accept images (it has no image encoder)")
        cfg = ImageProcessorConfig.from_dir(self.model_dir)
        out = []
        for part in parts:
            try:
                if not part.url.startswith("data:"):
                    raise ImageError("LLM.chat reads data: URLs only (fetch the image and pass its bytes as one)")
                out.append(load_image(parse_data_url(part.url)[1], cfg))
            except ImageError as e:
                raise ValueError(f"{part.where}: {e}") from None
        return out

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _normalize_prompts(prompts) -> list[PromptLike]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        return []
    if all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple)):
            raise ValueError(f"prompts: item {i} is {type(p).__name__}, expected a string or a list of token ids")
    return [p if isinstance(p, str) else list(p) for p in prompts]
