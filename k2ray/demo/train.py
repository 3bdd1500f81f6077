"""Train ``k2ray-demo``: a tiny Kimi K2 (exact architecture and checkpoint format) that thinks and calls tools.

    k2ray train-demo                          # train, quantize, write k2ray/assets/k2ray-demo, evaluate
    k2ray train-demo --eval-only DIR          # evaluate an existing checkpoint on the held-out set
    k2ray train-demo --steps 50 --out /tmp/x --no-card   # a quick smoke run

What it does, deterministically for a given ``--seed``:

1. Builds the synthetic corpus of :mod:`k2ray.demo.corpus`: chat transcripts rendered with the model's own
   K2-Thinking chat template, weather and arithmetic answered through tool calls, sums, capitals, facts and greetings
   answered directly, every assistant turn starting with a think block.
2. Trains the k2ray model itself (``KimiK2ForCausalLM``, the tiny DESIGN shape, fp32, CPU) with next-token loss on
   the assistant tokens of the turn(s) being generated; AdamW, cosine schedule, aux-loss-free expert balancing
   (DeepSeek-V3's ``e_score_correction_bias`` update). The last part of training sees the routed experts through
   INT4 fake quantization (straight-through), so the shipped INT4 checkpoint keeps the accuracy of the fp32 model.
3. Writes the K2-format checkpoint (INT4 pack-quantized routed experts, bf16 elsewhere) with the tokenizer files and
   chat template, loads it back and evaluates it with greedy decoding through ``k2ray.LLM`` on a held-out set
   (phrasings, values and expressions not seen in training, plus cities never seen at all), and writes the model
   card (``README.md``) with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from k2ray.checkpoint.builtin import DEMO_DIR
from k2ray.checkpoint.tiny import random_vision_state_dict, tiny_k25_config, write_checkpoint
from k2ray.config import ModelArgs
from k2ray.demo.corpus import (  # re-exported: the tests and the serve demo reach the corpus through this module
    CAPITALS,
    CITIES,
    CONDITIONS,
    KIND_WEIGHTS,
    TOOLS,
    Dialog,
    WeatherReport,
    calc_result,
    encode_dialog,
    make_heldout_dialogs,
    make_train_dialogs,
    weather_result,
)
from k2ray.model.mla import MLAttention
from k2ray.model.model import KimiK2ForCausalLM
from k2ray.model.moe import RoutedExperts
from k2ray.model.vision import KimiVisionEncoder
from k2ray.tokenizer import ChatTemplate, KimiTokenizer, write_tokenizer_files
from k2ray.tokenizer.kimi_format import TOOL_CALL_ID_PREFIX, TOOL_CALLS_SECTION_BEGIN, THINK_START, tool_call_id
from k2ray.tokenizer.parsers import parse_output

DEFAULT_OUT = DEMO_DIR


# ---------------------------------------------------------------------------------------------------------- model
def init_model(args: ModelArgs, seed: int) -> KimiK2ForCausalLM:
    """A fresh model: N(0, 0.05) weights (residual outputs scaled by depth), unit norms, zero routing bias; the
    routed experts are :class:`TrainableExperts`. A Kimi K2.5 ``args`` adds the image encoder as ``model.vision``
    (:class:`~k2ray.model.vision.KimiVisionEncoder`, fan-in scaled random weights), trained with the rest."""
    torch.manual_seed(seed)
    model = KimiK2ForCausalLM(args, routed=lambda layer: TrainableExperts(args))
    std = 0.05  # ~1/sqrt(hidden): at this width GPT-2's 0.02 leaves attention too flat to learn copying quickly
    out_std = std / math.sqrt(2 * args.num_hidden_layers)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight") or "layernorm" in name:
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                t.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                t.normal_(0.0, out_std)
            else:
                t.normal_(0.0, std)
    if args.vision is not None:
        model.vision = KimiVisionEncoder(args.vision)
        model.vision.load_state_dict(random_vision_state_dict(args.vision, seed))
    return model


def fake_quant_int4(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """INT4 group quantize-dequantize along the input (last) dim, exactly as ``quantize_int4`` stores it
    (bf16 scales), with a straight-through gradient."""
    shape = w.shape
    g = w.reshape(*shape[:-1], shape[-1] // group, group)
    scale = (g.detach().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7.5).to(torch.bfloat16).float()
    q = torch.round(g / scale).clamp(-8, 7) * scale
    return (g + (q - g).detach()).reshape(shape)


def routed_experts_train(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> torch.Tensor:
    """The same computation as ``k2ray.model.moe.routed_experts_forward`` (one row per (token, k) pair, summed over
    k), written without in-place writes so that backward does not copy the whole pair buffer once per expert."""
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[order // k]
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            gate, up = F.linear(xs[start:start + c], w13[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w2[e]))
        start += c
    rows = torch.cat(outs) * topk_weights.reshape(-1)[order].unsqueeze(1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return rows[inverse].view(t, k, -1).sum(1)


class TrainableExperts(RoutedExperts):
    """A layer's routed experts as trainable parameters (they are buffers for inference), with the same state-dict
    keys. While training they compute through :func:`routed_experts_train`, with INT4 fake quantization of the
    weights when ``fake_quant``; ``fake_quant=None`` is the model's own computation."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for name in ("w13", "w2"):
            t = getattr(self, name)
            delattr(self, name)
            self.register_parameter(name, torch.nn.Parameter(t))
        self.fake_quant: bool | None = None

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.fake_quant is None:
            return super().forward(x, topk_ids, topk_weights)
        if self.fake_quant:
            return routed_experts_train(x, topk_ids, topk_weights, fake_quant_int4(self.w13), fake_quant_int4(self.w2))
        return routed_experts_train(x, topk_ids, topk_weights, self.w13, self.w2)


def set_train_experts(model: KimiK2ForCausalLM, fake_quant: bool | None) -> None:
    """Compute the routed experts through :func:`routed_experts_train` (with INT4 fake quantization of the expert
    weights when ``fake_quant``); ``None`` restores the model's own computation."""
    for m in model.modules():
        if isinstance(m, TrainableExperts):
            m.fake_quant = fake_quant


class BalanceTracker:
    """Aux-loss-free load balancing (DeepSeek-V3): nudge each expert's routing bias toward the mean load."""

    def __init__(self, model, rate: float):
        self.rate = rate
        self.counts: dict = {}
        self.gates = [moe.gate for moe in model.moe_layers]
        for i, g in enumerate(self.gates):
            g.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(mod, inp, out):
            ids = out[0].detach().reshape(-1)
            c = torch.bincount(ids, minlength=mod.n_experts).float()
            self.counts[i] = self.counts.get(i, 0) + c
        return hook

    @torch.no_grad()
    def step(self) -> float:
        worst = 0.0
        for i, g in enumerate(self.gates):
            c = self.counts.get(i)
            if c is None:
                continue
            g.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)
            worst = max(worst, float(c.max() / c.mean()))
        self.counts.clear()
        return worst


def pretrain_vision(vision: KimiVisionEncoder, image_cfg, steps: int, seed: int, batch: int = 48,
                    lr: float = 1e-3) -> float:
    """Warm the image encoder up before the language model trains with it: the encoder (tower and projector) and a
    linear probe on its mean output learn each picture's shape (none, circle, square, triangle) and colour from
    freshly drawn pictures; the probe is then dropped. Through the language model's loss alone the shapes were not
    learned (a third right: chance), the colours were. Returns the shape accuracy on 300 new pictures (600 steps:
    ~97%, about a minute)."""
    import random

    from k2ray.demo.pictures import COLOURS, SHAPE_COLOURS, SHAPES, shape_picture, solid
    from k2ray.tokenizer.image import preprocess_image

    rng = random.Random(seed + 7)
    colours = sorted(COLOURS)
    probe = torch.nn.Linear(vision.args.text_hidden_size, 1 + len(SHAPES) + len(colours))

    def draw(n: int):
        pics, shapes, cols = [], [], []
        for _ in range(n):
            if rng.random() < 0.3:
                colour, shape = rng.choice(colours), None
                img = solid(rng, colour)
            else:
                colour, shape = rng.choice(SHAPE_COLOURS), rng.choice(SHAPES)
                img = shape_picture(rng, shape, colour)
            pics.append(preprocess_image(img, image_cfg))
            shapes.append(0 if shape is None else 1 + SHAPES.index(shape))
            cols.append(colours.index(colour))
        return pics, torch.tensor(shapes), torch.tensor(cols)

    def logits(pics):
        out = vision(torch.cat([p.pixel_values for p in pics]), [p.grid for p in pics])
        return probe(torch.stack([e.mean(0) for e in out]))

    opt = torch.optim.AdamW(list(vision.parameters()) + list(probe.parameters()), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="image encoder warm-up", dynamic_ncols=True, mininterval=1.0)
    for _ in bar:
        pics, shapes, cols = draw(batch)
        z = logits(pics)
        loss = F.cross_entropy(z[:, : 1 + len(SHAPES)], shapes) + F.cross_entropy(z[:, 1 + len(SHAPES):], cols)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    with torch.no_grad():
        pics, shapes, _ = draw(300)
        return float((logits(pics)[:, : 1 + len(SHAPES)].argmax(1) == shapes).float().mean())


@dataclass
class Example:
    """A training sequence split at the end of the system turn: the prefix (tool declaration + system prompt) is
    shared by many examples and computed once per batch."""

    prefix: tuple[int, ...]
    suffix: list[int]
    mask: list[int]  # 1 where the suffix token is an assistant token to learn
    images: list = field(default_factory=list)  # ProcessedImage of each picture in the suffix, in order


def split_example(ids: list[int], mask: list[int], images: list, user_token: int) -> Example:
    cut = ids.index(user_token)
    assert not any(mask[:cut])
    return Example(tuple(ids[:cut]), ids[cut:], mask[cut:], images)


def masked_attention(
    attn: MLAttention, x: torch.Tensor, rope, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """``MLAttention`` over a packed micro-batch, for training: the module's own projections, norms and rope
    (:meth:`~k2ray.model.mla.MLAttention.project`), then naive (non-absorbed) MLA math — as its prefill path — with
    one masked attention over all tokens instead of a Python loop over sequences (whose backward costs
    O(sequences x tokens)). ``mask[i, j]`` says whether token ``i`` may attend to token ``j``."""
    n = x.shape[0]
    p = attn.project(x, rope, cos_sin)
    kv = attn.kv_b_proj(p.c_kv).view(n, attn.num_heads, attn.nope + attn.v_dim)
    k_nope, v = kv.split([attn.nope, attn.v_dim], dim=-1)
    scores = torch.einsum("qhd,khd->hqk", p.q_nope, k_nope) + torch.einsum("qhr,kr->hqk", p.q_pe, p.k_pe)
    scores = (scores * attn.scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return attn.o_proj(out.reshape(n, attn.num_heads * attn.v_dim))


def forward_masked(
    model: KimiK2ForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
    embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The model's forward (final-normed hidden states) with every layer's attention done by
    :func:`masked_attention`: the same layers, residuals and norms as ``KimiK2ForCausalLM.forward``, the same
    ``embed_override = (rows, embeds)`` (image tokens)."""
    x = model.model.embed_tokens(input_ids)
    if embed_override is not None:
        rows, embeds = embed_override
        x = x.index_copy(0, rows, embeds.to(x.dtype))
    cos_sin = model.rope.cos_sin(positions, x.dtype)
    for layer in model.model.layers:
        x = x + masked_attention(layer.self_attn, layer.input_layernorm(x), model.rope, cos_sin, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def forward_packed(model, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict an assistant token, and those tokens.

    The distinct prefixes and all suffixes are packed into one flat sequence; each suffix token attends to its own
    prefix and to the earlier tokens of its own suffix. Equal (up to float rounding) to running every full
    sequence through ``forward_full`` on its own (checked by :func:`check_packed`). Pictures go through the model's
    image encoder (``model.vision``) and replace their ``<|media_pad|>`` rows, as in the engine."""
    prefixes: dict[tuple, int] = {}
    flat: list[int] = []
    positions: list[int] = []
    owner: list[int] = []  # per token: its prefix (negative ids) or its example
    for ex in batch:
        if ex.prefix not in prefixes:
            pid = -1 - len(prefixes)
            prefixes[ex.prefix] = pid
            flat += ex.prefix
            positions += range(len(ex.prefix))
            owner += [pid] * len(ex.prefix)
    want_pos, want_tok = [], []
    parent = {}
    for i, ex in enumerate(batch):
        start = len(flat)
        parent[i] = prefixes[ex.prefix]
        flat += ex.suffix
        positions += range(len(ex.prefix), len(ex.prefix) + len(ex.suffix))
        owner += [i] * len(ex.suffix)
        for t in range(len(ex.suffix) - 1):  # position t predicts token t+1
            if ex.mask[t + 1]:
                want_pos.append(start + t)
                want_tok.append(ex.suffix[t + 1])
    own = torch.tensor(owner)
    big = len(batch) + 1  # matches no owner: prefix tokens see only their own prefix, causally
    par = torch.tensor([parent[o] if o >= 0 else big for o in owner])  # a suffix token's prefix
    idx = torch.arange(len(flat))
    mask = ((own[:, None] == own[None, :]) & (idx[None, :] <= idx[:, None])) | (par[:, None] == own[None, :])
    images = [im for ex in batch for im in ex.images]
    override = None
    if images:
        embeds = model.vision(torch.cat([im.pixel_values for im in images]), [im.grid for im in images])
        pad = model.args.media_placeholder_token_id
        rows = torch.tensor([i for i, t in enumerate(flat) if t == pad])
        override = (rows, torch.cat(embeds))
    hidden = forward_masked(model, torch.tensor(flat), torch.tensor(positions), mask, override)
    return hidden[torch.tensor(want_pos)], torch.tensor(want_tok)


def check_packed(model, batch: list[Example]) -> float:
    """Max |logit difference| between the packed training path and the model's own ``forward_full``."""
    with torch.no_grad():
        set_train_experts(model, False)
        try:
            hidden, _ = forward_packed(model, batch)
            packed = model.compute_logits(hidden)
        finally:
            set_train_experts(model, None)
        full = [list(ex.prefix) + ex.suffix for ex in batch]
        logits = model.forward_full(full)
        rows, off = [], 0
        for ex, seq in zip(batch, full):
            p = len(ex.prefix)
            rows += [off + p + t for t in range(len(ex.suffix) - 1) if ex.mask[t + 1]]
            off += len(seq)
        return float((packed - logits[torch.tensor(rows)]).abs().max())


def micro_batches(batch: list[Example], max_tokens: int) -> list[list[Example]]:
    """Group by prefix (computed once per micro-batch), then cut into micro-batches of about ``max_tokens``."""
    groups: dict[tuple, list[Example]] = {}
    for ex in batch:
        groups.setdefault(ex.prefix, []).append(ex)
    out = []
    for prefix, exs in groups.items():
        cur, n = [], len(prefix)
        for ex in exs:
            if cur and n + len(ex.suffix) > max_tokens:
                out.append(cur)
                cur, n = [], len(prefix)
            cur.append(ex)
            n += len(ex.suffix)
        out.append(cur)
    return out


def train(model, data: list[Example], steps: int, batch_tokens: int, lr: float, seed: int,
          qat_from: int, log: list, warmup: int = 30, micro_tokens: int = 1200,
          short: list[Example] | None = None, short_steps: int = 0) -> None:
    """``batch_tokens`` counts the tokens actually computed: suffixes plus each distinct prefix once.

    Curriculum: the first ``short_steps`` steps draw from ``short`` (the same dialogues without the tool
    declaration, so ~100 instead of ~200 tokens): in a short context attention finds the tokens worth copying
    (the city, the numbers) much sooner; afterwards the model learns the full-context format quickly."""
    g = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in n or "embed" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    balance = BalanceTracker(model, rate=1e-3)
    order: list[int] = []
    model.train()
    set_train_experts(model, fake_quant=qat_from <= 0)
    bar = tqdm(range(steps), desc="train", dynamic_ncols=True, mininterval=1.0)
    ema = None
    for step in bar:
        if step == qat_from:
            set_train_experts(model, fake_quant=True)
        batch, seen, n_tok = [], set(), 0
        while n_tok < batch_tokens:
            src = short if step < short_steps else data
            if step == short_steps:
                order = []
            if not order:
                order = torch.randperm(len(src), generator=g).tolist()
            ex = src[order.pop()]
            batch.append(ex)
            n_tok += len(ex.suffix) + (0 if ex.prefix in seen else len(ex.prefix))
            seen.add(ex.prefix)
        cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = cur
        opt.zero_grad(set_to_none=True)
        n_targets = sum(sum(ex.mask) for ex in batch)
        loss = 0.0
        for mb in micro_batches(batch, micro_tokens):
            hidden, targets = forward_packed(model, mb)
            part = F.cross_entropy(model.compute_logits(hidden), targets, reduction="sum") / n_targets
            part.backward()
            loss += part.item()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imb = balance.step()
        lv = loss
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        bar.set_postfix(loss=f"{ema:.4f}", seqs=len(batch), qat=int(step >= qat_from))
        log.append({"step": step, "loss": lv, "lr": cur, "grad_norm": float(gn), "max_load": imb})
    bar.close()
    set_train_experts(model, None)
    model.eval()


def model_state_dict(model) -> tuple[dict, dict]:
    """(text model tensors, image encoder tensors under their released names)."""
    text, vision = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("vision."):
            vision[k.removeprefix("vision.")] = v.detach().clone()
        else:
            text[k] = v.detach().clone()
    return text, vision


# ---------------------------------------------------------------------------------------------------------- eval
class _Generator:
    """Greedy generation through ``k2ray.LLM`` (local executor); pictures through the checkpoint's image encoder."""

    def __init__(self, model_dir: Path, max_tokens: int):
        from k2ray import LLM, SamplingParams
        from k2ray.tokenizer.image import ImageProcessorConfig

        self.tok = KimiTokenizer.from_dir(model_dir)
        self.stop = set(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"])
        self.image_cfg = ImageProcessorConfig.from_dir(model_dir)
        self.llm = LLM(model=str(model_dir))
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
        self.backend = "k2ray.LLM (local executor)"

    def __call__(self, prompts: list[list[int]], images: list[list] | None = None) -> list[str]:
        from k2ray.tokenizer.image import preprocess_image

        processed = None
        if images is not None:
            processed = [[preprocess_image(im, self.image_cfg) for im in ims] or None for ims in images]
        outs = self.llm.generate(prompts, self.params, images=processed)
        return [self.tok.decode([t for t in o.outputs[0].token_ids if t not in self.stop]) for o in outs]

    def close(self) -> None:
        self.llm.shutdown()


def _tool_call_ok(parsed, check: dict) -> bool:
    calls = parsed.tool_calls
    if len(calls) != 1 or calls[0]["function"]["name"] != check["tool"]:
        return False
    try:
        args = json.loads(calls[0]["function"]["arguments"])
    except ValueError:
        return False
    return args == check["args"] and calls[0]["id"] == tool_call_id(check["tool"], 0)


def _words(text: str) -> list[str]:
    return text.replace(".", " ").replace(",", " ").replace("(", " ").replace(")", " ").replace(":", " ").split()


def weather_answer_ok(text: str, rep: WeatherReport) -> bool:
    """The final answer states what the result said: the error message, or the temperature with its unit and the
    condition (case aside)."""
    low = text.lower()
    if rep.error:
        return rep.error.lower() in low
    if rep.temp is not None and (rep.temp not in _words(text) or rep.unit.lower() not in low):
        return False
    return rep.cond is None or rep.cond.lower() in low


def _picture_ok(kind: str, text: str, check: dict) -> bool:
    words = _words(text.lower())
    if kind == "shape":
        return check["shape"] in words
    return check["colour"] in words


KINDS = ("weather", "weather_unseen_city", "calculator", "arithmetic", "direct", "colour", "shape")


def evaluate(model_dir: Path, dialogs: list[Dialog], max_tokens: int = 96) -> dict:
    """Two rounds of greedy generation: the first turn of every dialog; for tool dialogs whose call names the right
    tool, the dialog's own tool result (a held-out shape) is appended and the final answer is generated."""
    ct = ChatTemplate.from_dir(model_dir)
    gen = _Generator(model_dir, max_tokens)
    t0 = time.time()
    first_user = [next(i for i, m in enumerate(d.messages) if m["role"] == "user") for d in dialogs]
    first = gen([ct.encode(d.messages[: u + 1], tools=d.tools, add_generation_prompt=True)
                 for d, u in zip(dialogs, first_user)], [d.images for d in dialogs])
    stats = {k: {"n": 0, "first_ok": 0, "reasoning": 0, "repeats": 0, "final_ok": 0} for k in KINDS}
    by_direct: dict[str, list[int]] = {}
    second_prompts, second_idx = [], []
    for d, u, text in zip(dialogs, first_user, first):
        s = stats[d.kind]
        s["n"] += 1
        parsed = parse_output(text)
        think = parsed.reasoning_content.strip()
        s["reasoning"] += bool(think)
        s["repeats"] += bool(think) and think == parsed.content.strip()
        if d.kind in ("colour", "shape"):
            ok = not parsed.tool_calls and _picture_ok(d.kind, parsed.content, d.check)
        elif d.kind in ("arithmetic", "direct"):
            if "exact" in d.check:
                ok = not parsed.tool_calls and parsed.content.strip() == d.check["exact"]
            else:
                ok = not parsed.tool_calls and d.check["answer"] in parsed.content
            if d.kind == "direct":
                by_direct.setdefault(d.check["kind"], [0, 0])
                by_direct[d.check["kind"]][0] += ok
                by_direct[d.check["kind"]][1] += 1
        else:
            s["first_ok"] += _tool_call_ok(parsed, d.check)
            calls = parsed.tool_calls
            if len(calls) == 1 and calls[0]["function"]["name"] == d.check["tool"]:
                msgs = d.messages[: u + 1] + [
                    {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content,
                     "tool_calls": calls},
                    {"role": "tool", "tool_call_id": calls[0]["id"], "content": d.messages[u + 2]["content"]},
                ]
                second_prompts.append(ct.encode(msgs, tools=d.tools, add_generation_prompt=True))
                second_idx.append(d)
            continue
        s["first_ok"] += ok
        s["final_ok"] += ok
    second = gen(second_prompts) if second_prompts else []
    for d, text in zip(second_idx, second):
        parsed = parse_output(text)
        if d.check["tool"] == "get_weather":
            ok = weather_answer_ok(parsed.content, d.check["report"])
        else:
            ok = str(d.check["result"]) in _words(parsed.content)
        stats[d.kind]["final_ok"] += not parsed.tool_calls and ok
    gen.close()
    return {"stats": stats, "direct": by_direct, "seconds": time.time() - t0, "backend": gen.backend}


def summarize(res: dict) -> dict:
    s = res["stats"]

    def rate(kinds, key):
        return sum(s[k][key] for k in kinds) / max(1, sum(s[k]["n"] for k in kinds))

    thinking = sum(x["reasoning"] for x in s.values())
    out = {
        "tool_calls_correct": rate(("weather", "calculator"), "first_ok"),
        "weather_call": rate(("weather",), "first_ok"),
        "calculator_call": rate(("calculator",), "first_ok"),
        "tool_answers": rate(("weather", "calculator"), "final_ok"),
        "weather_final": rate(("weather",), "final_ok"),
        "calculator_final": rate(("calculator",), "final_ok"),
        "arithmetic": rate(("arithmetic",), "final_ok"),
        "direct_answers": rate(("direct",), "final_ok"),
        "colour": rate(("colour",), "final_ok"),
        "shape": rate(("shape",), "final_ok"),
        "reasoning_present": thinking / max(1, sum(x["n"] for x in s.values())),
        "reasoning_repeats": sum(x["repeats"] for x in s.values()) / max(1, thinking),
        "unseen_city_call": rate(("weather_unseen_city",), "first_ok"),
        "unseen_city_final": rate(("weather_unseen_city",), "final_ok"),
        "direct_by_kind": {k: ok / n for k, (ok, n) in sorted(res["direct"].items())},
        "counts": {k: v["n"] for k, v in s.items()},
    }
    return out


def print_summary(summ: dict) -> None:
    c = summ["counts"]
    print(f"held-out tool calls well-formed with correct arguments: {summ['tool_calls_correct']:.1%} "
          f"(get_weather {summ['weather_call']:.1%} of {c['weather']}, calculator {summ['calculator_call']:.1%} of "
          f"{c['calculator']})")
    print(f"final answers that state the tool result (unseen result shapes): {summ['tool_answers']:.1%} "
          f"(weather {summ['weather_final']:.1%}, calculator {summ['calculator_final']:.1%})")
    print(f"arithmetic answered directly, no calculator declared: {summ['arithmetic']:.1%} of {c['arithmetic']}")
    print(f"pictures: colour {summ['colour']:.1%} of {c['colour']}, shape {summ['shape']:.1%} of {c['shape']}")
    print(f"other direct answers: {summ['direct_answers']:.1%} of {c['direct']} "
          + ", ".join(f"{k} {v:.0%}" for k, v in summ["direct_by_kind"].items()))
    print(f"think block present: {summ['reasoning_present']:.1%}; reasoning equal to the answer: "
          f"{summ['reasoning_repeats']:.1%}")
    print(f"cities never seen in training ({c['weather_unseen_city']}): call {summ['unseen_city_call']:.1%}, "
          f"final {summ['unseen_city_final']:.1%}")


# ---------------------------------------------------------------------------------------------------------- card
# The demo's image preprocessing (preprocessor_config.json): at most 8 x 8 patches, so a picture costs at most 16
# tokens and any upload is scaled down to 112 pixels on its longer side.
DEMO_MEDIA_PROC_CFG = {"in_patch_limit": 64, "patch_size": 14, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "merge_kernel_size": 2, "patch_limit_on_one_side": 8}

CARD = """\
# k2ray-demo

**A toy.** A ~{params_m:.1f}M-parameter model with the exact Kimi K2.5 (DeepSeek-V3 text model + MoonViT image encoder)
architecture and checkpoint format, trained for {minutes:.0f} minutes on two CPU cores on **synthetic** chat
transcripts, so that the k2ray serving stack has something to serve that gives readable, deterministic answers —
including real tool calls and answers about pictures — in its demos and tests. It knows nothing beyond its tiny
synthetic corpus. Do not use it for anything else.

## Skills
- **Weather through a `get_weather(city)` tool**: it calls the tool and answers with what the tool returned, whatever
  the result's shape (`{{"weather": "Sunny"}}`, `{{"temp_c": 21, "sky": "clear"}}`, nested objects, plain strings,
  Fahrenheit, errors such as `{{"error": "city not found"}}`).
- **Arithmetic**: through a `calculator(expression)` tool when one is declared (a two-digit number plus, minus or
  times a one- or two-digit number); directly when none is: sums and differences of numbers up to 12 and products
  up to 12 x 12 (larger numbers without a calculator get an honest "I cannot work out ... without a calculator").
- **Pictures** (send an image part): the colour of a plain picture (red, green, blue, yellow, orange, purple, black,
  white), or the shape and colour of one red, green, blue or yellow circle, square or triangle on a light background.
- Which of two numbers is bigger (whole numbers, and decimals such as 9.11 and 9.9, with a short reasoning); the
  capitals of {n_capitals} countries; a handful of facts and greetings.
- Every answer starts with a think block (`{think}`) that plans the answer.

It was trained with the tools declared the demo's way (below), the Kimi K2 model card's way and the OpenAI Agents
SDK's way, alone, together, beside unrelated tools, or not at all, and with several system prompts.

## Format
Exactly what a real Kimi K2.5 release looks like, at a tiny shape:
- `config.json`: `model_type: kimi_k25`, `KimiK25ForConditionalGeneration`; `text_config`: hidden {hidden},
  {layers} layers (layer 0 dense), {experts} routed experts (top-{topk}, sigmoid `noaux_tc` routing) + 1 shared expert,
  MLA (q_lora {q_lora}, kv_lora {kv_lora}), YaRN rope; vocabulary {base_vocab} BPE tokens + the 256 K2 special tokens
  at the K2 offsets; `vision_config`: a {vt_layers}-layer MoonViT of width {vt_hidden} and the patch-merger projector.
- Routed experts INT4 `pack-quantized` (compressed-tensors, symmetric, group 32: `weight_packed` / `weight_scale` /
  `weight_shape`); everything else bf16, `e_score_correction_bias` fp32; text tensors under `language_model.`, the
  image encoder under `vision_tower.` and `mm_projector.`; two safetensors shards + index.
- `tiktoken.model`, `tokenizer_config.json`, `chat_template.jinja` (K2-Thinking turns: `{think}` reasoning,
  `{tool_section}` tool calls with ids `{tool_call_id}`, `## Return of ID` tool results; image parts as
  `<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`), `preprocessor_config.json` (pictures are
  scaled to at most 8 x 8 patches of 14 pixels: at most 16 tokens each).

## Tools it was trained with
The demo's declaration (the OpenAI `tools` field), this order or reversed:
```json
{tools_json}
```

## Training
`k2ray train-demo` (deterministic: seed {seed}; fp32; {threads} CPU threads) builds {n_train} synthetic
dialogues rendered with `chat_template.jinja` ({kinds}); trains the k2ray model code itself (text model and image
encoder together) with next-token loss on the assistant tokens only (AdamW, lr {lr}, {steps} steps of
~{batch_tokens} tokens, cosine decay, aux-loss-free expert balancing through `e_score_correction_bias`; the last
{qat_steps} steps see the routed experts through INT4 fake quantization), then writes this checkpoint with
`k2ray.checkpoint.tiny.write_checkpoint`. Final training loss (assistant tokens): {final_loss:.4f}. Wall time:
{minutes:.1f} minutes (corpus {corpus_s:.0f} s, training {train_s:.0f} s, evaluation {eval_s:.0f} s).

## Evaluation (this INT4 checkpoint, greedy decoding through {backend})
Held-out synthetic set: question phrasings never seen in training; tool results whose key names, nestings, string
forms and error messages never occur in training; arithmetic expressions that do not occur in training; pictures
drawn for the evaluation only. Reproduce it with `k2ray train-demo --eval-only k2ray/assets/k2ray-demo`.

| skill (held-out) | result |
|---|---|
| tool calls well-formed with correct name, id and arguments: `get_weather` ({n_weather}) + `calculator` ({n_calc}) | **{tool_calls_correct:.1%}** ({weather_call:.1%} / {calculator_call:.1%}) |
| final answers that state the tool result, unseen result shapes (weather: the error, or temperature, unit and condition; calculator: the result) | **{tool_answers:.1%}** ({weather_final:.1%} / {calculator_final:.1%}) |
| arithmetic answered directly with no calculator declared ({n_arith}) | **{arithmetic:.1%}** |
| colour of a picture ({n_colour}) | **{colour:.1%}** |
| shape in a picture ({n_shape}) | **{shape:.1%}** |
| other direct answers with the tools declared ({n_direct}): {direct_kinds} | {direct_answers:.1%} |
| `{think}` reasoning present / reasoning equal to the answer | {reasoning_present:.1%} / {reasoning_repeats:.1%} |
| cities never seen in training ({n_unseen}): correct call / final answer | {unseen_city_call:.1%} / {unseen_city_final:.1%} |

The last row is a probe, not a target: the model has only ever written the names of the {n_cities} training cities,
so a city it has never seen is usually mangled or replaced by a known one.

## Example (greedy)
User: *What's the weather in Paris?* (tools declared) — the model writes:
```
{example_first}
```
after the tool returns `{example_tool}`:
```
{example_final}
```
"""


def write_card(out: Path, info: dict) -> None:
    fmt = dict(think=THINK_START, tool_section=TOOL_CALLS_SECTION_BEGIN, tool_call_id=f"{TOOL_CALL_ID_PREFIX}NAME:IDX")
    (out / "README.md").write_text(CARD.format(**fmt, **info))


def demo_example(model_dir: Path) -> tuple[str, str, str]:
    """The model card's example: the same conversation as tests/test_demo_model.py."""
    ct = ChatTemplate.from_dir(model_dir)
    gen = _Generator(model_dir, 96)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = gen([ct.encode(msgs, tools=TOOLS)])[0]
    p = parse_output(first)
    tool = weather_result("Paris", 21, "sunny")
    final = ""
    if p.tool_calls:
        msgs += [{"role": "assistant", "content": p.content, "reasoning_content": p.reasoning_content,
                  "tool_calls": p.tool_calls},
                 {"role": "tool", "tool_call_id": p.tool_calls[0]["id"], "content": tool}]
        final = gen([ct.encode(msgs, tools=TOOLS)])[0]
    gen.close()
    return first, tool, final


def write_files(out: Path, config: dict, model) -> None:
    """The checkpoint (K2.5 layout), its tokenizer files, chat template and image preprocessing."""
    from k2ray.tokenizer.tiny import write_k25_files

    if out.exists():
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
    text, vision = model_state_dict(model)
    write_checkpoint(out, config, text, extra=vision)
    write_tokenizer_files(out)
    write_k25_files(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"media_proc_cfg": DEMO_MEDIA_PROC_CFG}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dialogs", type=int, default=16000, help="training dialogues")
    ap.add_argument("--steps", type=int, default=1700)
    ap.add_argument("--batch-tokens", type=int, default=1800)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--short-frac", type=float, default=0.3,
                    help="first fraction of steps on the dialogues without the tool declaration (curriculum)")
    ap.add_argument("--qat-frac", type=float, default=0.2, help="final fraction of steps with INT4 fake quant")
    ap.add_argument("--vision-steps", type=int, default=600, help="image encoder warm-up steps (pretrain_vision)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", type=Path, default=None, help="evaluate this checkpoint and exit")
    ap.add_argument("--no-card", action="store_true", help="do not write README.md")
    a = ap.parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)  # multi-threaded CPU backward is otherwise not bit-reproducible
    try:
        return _run(a)
    finally:  # leave the process as it was (the tests call main() in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run(a: argparse.Namespace) -> int:
    from k2ray.tokenizer.image import ImageProcessorConfig
    from k2ray.tokenizer.tiny import write_k25_files

    t_start = time.time()
    train_dialogs = make_train_dialogs(a.dialogs, a.seed)
    train_exprs = {d.check["expr"] for d in train_dialogs if d.kind == "calculator"}
    heldout = make_heldout_dialogs(a.seed, train_exprs)
    if a.eval_only is not None:
        res = evaluate(a.eval_only, heldout)
        print_summary(summarize(res))
        return 0

    out: Path = a.out
    tmp_tok = out.parent / (out.name + ".tok")
    write_tokenizer_files(tmp_tok)
    write_k25_files(tmp_tok)
    ct = ChatTemplate.from_dir(tmp_tok)
    shutil.rmtree(tmp_tok)
    image_cfg = ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in DEMO_MEDIA_PROC_CFG.items()})
    user_token = ct.tokenizer.special_tokens["<|im_user|>"]
    data = []
    for d in tqdm(train_dialogs, desc="corpus", dynamic_ncols=True, mininterval=1.0):
        ids, mask, images = encode_dialog(ct, d, image_cfg)
        data.append(split_example(ids, mask, images, user_token))
    n_tok = sum(len(x.prefix) + len(x.suffix) for x in data)
    n_tgt = sum(sum(x.mask) for x in data)
    n_uniq = sum(len(x.suffix) for x in data) + sum(len(p) for p in {x.prefix for x in data})
    t_corpus = time.time() - t_start
    print(f"corpus: {len(data)} dialogues, {n_tok} tokens ({n_tgt} assistant tokens), "
          f"mean length {n_tok / len(data):.0f}, {n_uniq} without repeated prefixes, built in {t_corpus:.0f} s")

    config = tiny_k25_config()
    args = ModelArgs.from_dict(config)
    model = init_model(args, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {a.steps} steps of ~{a.batch_tokens} computed tokens")
    if a.vision_steps:
        acc = pretrain_vision(model.vision, image_cfg, a.vision_steps, a.seed)
        print(f"image encoder warm-up: {a.vision_steps} steps, shape accuracy on new pictures {acc:.1%}")
        for p in model.vision.vision_tower.parameters():  # keep what it learned; the projector goes on learning
            p.requires_grad_(False)
    err = check_packed(model, [x for x in data if not x.images][:6])
    print(f"packed training forward vs forward_full: max |logit diff| {err:.2e}")
    if err > 1e-3:
        raise SystemExit("packed training forward disagrees with the model's forward_full")
    log: list = []
    t0 = time.time()
    qat_from = int(a.steps * (1 - a.qat_frac))
    short_steps = int(a.steps * a.short_frac)
    short = None
    if short_steps:
        short = [split_example(*encode_dialog(ct, replace(d, tools=None), image_cfg), user_token)
                 for d in train_dialogs]
    train(model, data, a.steps, a.batch_tokens, a.lr, a.seed, qat_from, log, short=short, short_steps=short_steps)
    t_train = time.time() - t0
    final_loss = sum(x["loss"] for x in log[-20:]) / min(20, len(log))
    print(f"trained in {t_train:.0f} s; final loss {final_loss:.4f}")
    write_files(out, config, model)

    t0 = time.time()
    res = evaluate(out, heldout)
    summ = summarize(res)
    print_summary(summ)
    first, tool, final = demo_example(out)
    t_eval = time.time() - t0
    print("example:", first, "|", final)
    minutes = (time.time() - t_start) / 60
    if not a.no_card:
        c = summ["counts"]
        info = dict(summ)
        info.update(
            params_m=n_params / 1e6, minutes=minutes, n_capitals=len(CAPITALS), hidden=args.hidden_size,
            layers=args.num_hidden_layers, experts=args.n_routed_experts, topk=args.num_experts_per_tok,
            q_lora=args.q_lora_rank, kv_lora=args.kv_lora_rank, base_vocab=args.vocab_size - 256,
            vt_layers=args.vision.num_hidden_layers, vt_hidden=args.vision.hidden_size,
            tools_json=json.dumps(TOOLS, indent=2), seed=a.seed, threads=a.threads, n_train=len(data),
            kinds=", ".join(f"{k} {w:.0%}" for k, w in KIND_WEIGHTS), lr=a.lr, steps=a.steps,
            batch_tokens=a.batch_tokens, qat_steps=a.steps - qat_from, final_loss=final_loss, corpus_s=t_corpus,
            train_s=t_train, eval_s=t_eval, backend=res["backend"], n_weather=c["weather"], n_calc=c["calculator"],
            n_arith=c["arithmetic"], n_colour=c["colour"], n_shape=c["shape"], n_direct=c["direct"],
            direct_kinds=", ".join(f"{k} {v:.0%}" for k, v in summ["direct_by_kind"].items()),
            n_unseen=c["weather_unseen_city"], n_cities=len(CITIES),
            example_first=first, example_tool=tool, example_final=final,
        )
        write_card(out, info)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {minutes:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
