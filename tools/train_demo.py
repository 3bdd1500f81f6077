#!/usr/bin/env python3
"""Train ``k2ray-demo``: a tiny Kimi K2 (exact architecture and checkpoint format) that thinks and calls tools.

    python3 tools/train_demo.py                        # train, quantize, write k2ray/assets/k2ray-demo, evaluate
    python3 tools/train_demo.py --eval-only DIR        # evaluate an existing checkpoint on the held-out set
    python3 tools/train_demo.py --steps 50 --out /tmp/x --no-card   # a quick smoke run

What it does, deterministically for a given ``--seed``:

1. Builds a synthetic corpus of chat transcripts rendered with the model's own K2-Thinking chat template (default
   system prompt, tools declared through the template's ``tools`` argument): weather questions answered through a
   ``get_weather(city)`` tool call, arithmetic through a ``calculator(expression)`` tool call, and small sums, capitals,
   facts and greetings answered directly. Every assistant turn starts with a ``<think>`` block.
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
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

# k2ray must be installed (`pip install -e .`): its kernels package lives outside k2ray/ and only the installed
# package maps it, so the source tree is not put on sys.path here.
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "k2ray" / "assets" / "k2ray-demo"

# ---------------------------------------------------------------------------------------------------------- tools
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression to evaluate, e.g. 12 * 7"}},
            "required": ["expression"],
        },
    },
}
TOOLS = [WEATHER_TOOL, CALCULATOR_TOOL]

# ---------------------------------------------------------------------------------------------------------- corpus
CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "New York", "Sydney", "Cairo", "Rome", "Madrid", "Beijing",
    "Moscow", "Toronto", "Mumbai", "Seoul", "Lisbon", "Vienna", "Dublin", "Oslo", "Stockholm", "Helsinki",
    "Athens", "Istanbul", "Dubai", "Singapore", "Bangkok", "Jakarta", "Manila", "Lima", "Santiago", "Bogota",
    "Mexico City", "Chicago", "Boston", "Seattle", "Denver", "Miami", "Houston", "Vancouver", "Montreal",
    "Nairobi", "Lagos", "Cape Town", "Buenos Aires", "Sao Paulo", "Shanghai", "Osaka", "Delhi", "Warsaw",
    "Prague", "Budapest", "Amsterdam", "Brussels", "Zurich", "Geneva", "Munich", "Hamburg", "Milan",
    "Barcelona", "Copenhagen", "Reykjavik", "Auckland", "Melbourne", "Perth", "Hanoi", "Kyoto",
]
# Never seen in training (not even as text): a probe of how far copying generalizes, reported separately.
UNSEEN_CITIES = ["Lyon", "Porto", "Dallas", "Austin", "Portland", "Bern", "Basel", "Dakar", "Tunis", "Nice"]
CONDITIONS = ["sunny", "cloudy", "partly cloudy", "rainy", "light rain", "windy", "snowy", "foggy", "clear", "stormy"]
CAPITALS = {
    "France": "Paris", "the United Kingdom": "London", "Japan": "Tokyo", "Germany": "Berlin", "Italy": "Rome",
    "Spain": "Madrid", "China": "Beijing", "Russia": "Moscow", "Portugal": "Lisbon", "Austria": "Vienna",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Greece": "Athens",
    "Egypt": "Cairo", "South Korea": "Seoul", "Thailand": "Bangkok", "Indonesia": "Jakarta", "Peru": "Lima",
    "Chile": "Santiago", "Colombia": "Bogota", "Mexico": "Mexico City", "Kenya": "Nairobi", "Poland": "Warsaw",
    "the Czech Republic": "Prague", "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Iceland": "Reykjavik", "Vietnam": "Hanoi", "Canada": "Ottawa",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "the Philippines": "Manila",
}

# Phrasings: the training set uses the first list, the held-out set only the second.
WEATHER_Q = [
    "What's the weather in {city}?",
    "What is the weather in {city}?",
    "What's the weather like in {city} today?",
    "How is the weather in {city} right now?",
    "Is it raining in {city}?",
    "How hot is it in {city}?",
    "Tell me the temperature in {city}.",
    "Can you check the weather in {city} for me?",
    "Should I bring an umbrella in {city} today?",
    "Is it cold in {city}?",
    "Weather in {city}, please.",
    "I am traveling to {city} tomorrow. What is the weather there?",
]
WEATHER_Q_HELDOUT = [
    "Could you tell me the weather in {city}?",
    "How's the weather in {city} today?",
    "I would like to know the weather in {city}.",
    "What is the temperature in {city} right now?",
    "Is it sunny in {city}?",
    "Please check the weather in {city}.",
]
WEATHER_THINK = "The user wants the current weather in {city}. I will call get_weather with the city name."
WEATHER_THINK_2 = "get_weather returned {temp} degrees Celsius and {cond} for {city}."
WEATHER_ANSWERS = [
    "It is {cond} in {city} right now, with a temperature of {temp} degrees Celsius.",
    "The weather in {city} is {cond} with a temperature of {temp} degrees Celsius.",
]

OPS = [("+", "plus", "add"), ("-", "minus", "subtract"), ("*", "times", "multiply")]
CALC_Q = [
    "What is {a} {sym} {b}?",
    "What is {a} {word} {b}?",
    "What's {a} {sym} {b}?",
    "Calculate {a} {sym} {b}.",
    "Please compute {a} {sym} {b} for me.",
    "How much is {a} {word} {b}?",
    "Use the calculator to work out {a} {sym} {b}.",
    "Could you calculate {a} {word} {b}?",
    "{a} {sym} {b} = ?",
    "Work out {a} {sym} {b}.",
    "Calculate {a} {word} {b}, please.",
    "Work out {a} {word} {b} for me.",
    "Tell me what {a} {word} {b} is.",
    "Please work this out: {a} {sym} {b}, thanks.",
]
CALC_Q_HELDOUT = [
    "Can you work out {a} {sym} {b}?",
    "I need the result of {a} {sym} {b}.",
    "How much is {a} {sym} {b}?",
    "Compute {a} {word} {b}, please.",
]
CALC_THINK = "This needs exact arithmetic, so I will use the calculator to evaluate {a} {sym} {b}."
CALC_THINK_2 = "The calculator returned {r}."
CALC_ANSWERS = ["The result is {r}.", "{a} {sym} {b} is {r}."]

SUM_Q = [
    "What is {a} {sym} {b}?", "What is {a} {word} {b}?", "What's {a} {sym} {b}?", "How much is {a} {word} {b}?",
    "Calculate {a} {sym} {b}.", "{a} {sym} {b} = ?", "Quick question: what is {a} {word} {b}?",
    "Please compute {a} {sym} {b} for me.",
]
SUM_Q_HELDOUT = ["What do you get for {a} {sym} {b}?", "Tell me {a} {word} {b}."]
SUM_THINK = "This is simple: {a} {sym} {b} = {r}."
SUM_ANSWER = "{a} {sym} {b} = {r}."

CAPITAL_Q = [
    "What is the capital of {country}?", "Which city is the capital of {country}?", "Name the capital of {country}.",
    "What city is the capital of {country}?", "Do you know the capital of {country}?",
]
CAPITAL_Q_HELDOUT = ["Tell me the capital of {country}.", "What's the capital city of {country}?"]
CAPITAL_THINK = "The capital of {country} is {city}."
CAPITAL_ANSWER = "The capital of {country} is {city}."

FACTS = [  # (training phrasings, held-out phrasing, reasoning, answer)
    (["How many days are in a week?", "How many days does a week have?", "A week has how many days?"],
     "Tell me how many days a week has.", "A week has 7 days.", "There are 7 days in a week."),
    (["How many months are in a year?", "How many months does a year have?", "A year has how many months?"],
     "Tell me how many months a year has.", "A year has 12 months.", "There are 12 months in a year."),
    (["What is the largest planet?", "Which planet is the largest?", "What is the biggest planet?"],
     "Name the largest planet.", "The largest planet in the solar system is Jupiter.",
     "Jupiter is the largest planet in the solar system."),
    (["What is the highest mountain?", "Which mountain is the highest in the world?", "What is the tallest mountain?"],
     "Name the highest mountain in the world.", "The highest mountain is Mount Everest.",
     "Mount Everest is the highest mountain in the world."),
    (["How many sides does a triangle have?", "How many sides has a triangle?", "A triangle has how many sides?"],
     "Tell me how many sides a triangle has.", "A triangle has three sides.", "A triangle has three sides."),
    (["What is the largest ocean?", "Which ocean is the largest?", "What is the biggest ocean?"],
     "Name the largest ocean on Earth.", "The largest ocean is the Pacific Ocean.",
     "The Pacific Ocean is the largest ocean on Earth."),
    (["At what temperature does water boil?", "When does water boil?", "What is the boiling point of water?"],
     "Tell me the temperature at which water boils.", "Water boils at 100 degrees Celsius at sea level.",
     "Water boils at 100 degrees Celsius at sea level."),
    (["How many hours are in a day?", "How many hours does a day have?", "A day has how many hours?"],
     "Tell me how many hours a day has.", "A day has 24 hours.", "There are 24 hours in a day."),
]
CHITCHAT = [  # (training phrasings, held-out phrasing, reasoning, answer)
    (["Hello!", "Hi!", "Hey!", "Hi there!", "Good morning!", "Hello, Kimi!"], "Hello there!",
     "The user greets me.", "Hello! How can I help you today?"),
    (["Who are you?", "Hi, who are you?", "What is your name?", "Who am I talking to?", "Introduce yourself."],
     "Tell me who you are.", "The user asks who I am.", "I am Kimi, an AI assistant created by Moonshot AI."),
    (["Thank you!", "Thanks!", "Thank you very much.", "Thanks for the help!", "Great, thanks."], "Thanks a lot!",
     "The user thanks me.", "You are welcome! Let me know if you need anything else."),
    (["What can you do?", "How can you help me?", "What are your skills?", "What can you help me with?",
      "What do you do?"], "What are you able to do?", "The user asks what I can do.",
     "I can answer questions, check the weather in a city, and do arithmetic with a calculator."),
]


@dataclass
class Dialog:
    """One conversation: ``messages`` end with the assistant turn(s) to learn; ``check`` describes the truth."""

    kind: str
    messages: list[dict]
    tools: list | None
    check: dict = field(default_factory=dict)


def _call(name: str, args: dict, idx: int) -> dict:
    return {"id": f"functions.{name}:{idx}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def weather_result(city: str, temp: int, cond: str) -> str:
    return json.dumps({"city": city, "temperature_c": temp, "condition": cond}, ensure_ascii=False)


def calc_result(r: int) -> str:
    return json.dumps({"result": r})


def _weather(rng: random.Random, held_out: bool, idx: int, city: str | None = None) -> tuple[list[dict], dict]:
    city = city or rng.choice(CITIES)
    temp, cond = rng.randint(-10, 38), rng.choice(CONDITIONS)
    q = rng.choice(WEATHER_Q_HELDOUT if held_out else WEATHER_Q).format(city=city)
    call = _call("get_weather", {"city": city}, idx)
    f = dict(city=city, temp=temp, cond=cond)
    msgs = [
        {"role": "user", "content": q},
        {"role": "assistant", "content": "", "reasoning_content": WEATHER_THINK.format(**f), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": weather_result(city, temp, cond)},
        {"role": "assistant", "content": rng.choice(WEATHER_ANSWERS).format(**f),
         "reasoning_content": WEATHER_THINK_2.format(**f)},
    ]
    return msgs, {"tool": "get_weather", "args": {"city": city}, "temp": temp, "cond": cond}


def _operands(rng: random.Random) -> tuple[int, int]:
    """A two-digit first operand and a 1-2 digit second one: each is one token that the model has seen often
    enough to copy (three-digit numbers are single tokens too, but each of the 900 would be seen about once)."""
    return rng.randint(10, 99), rng.randint(2, 99)


def _calc(rng: random.Random, held_out: bool, idx: int, seen: set | None = None) -> tuple[list[dict], dict]:
    while True:
        sym, word, _ = rng.choice(OPS)
        a, b = _operands(rng)
        if sym == "-" and b > a:
            a, b = b, a
        if seen is None or (a, sym, b) not in seen:
            break
    r = eval(f"{a} {sym} {b}")  # noqa: S307 - two ints and one operator
    f = dict(a=a, b=b, sym=sym, word=word, r=r)
    expr = f"{a} {sym} {b}"
    call = _call("calculator", {"expression": expr}, idx)
    msgs = [
        {"role": "user", "content": rng.choice(CALC_Q_HELDOUT if held_out else CALC_Q).format(**f)},
        {"role": "assistant", "content": "", "reasoning_content": CALC_THINK.format(**f), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": calc_result(r)},
        {"role": "assistant", "content": rng.choice(CALC_ANSWERS).format(**f), "reasoning_content": CALC_THINK_2.format(**f)},
    ]
    return msgs, {"tool": "calculator", "args": {"expression": expr}, "expr": (a, sym, b), "result": r}


def _small_sum(rng: random.Random, held_out: bool) -> tuple[list[dict], dict]:
    sym, word, _ = rng.choice(OPS[:2])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if sym == "-" and b > a:
        a, b = b, a
    r = a + b if sym == "+" else a - b
    f = dict(a=a, b=b, sym=sym, word=word, r=r)
    msgs = [
        {"role": "user", "content": rng.choice(SUM_Q_HELDOUT if held_out else SUM_Q).format(**f)},
        {"role": "assistant", "content": SUM_ANSWER.format(**f), "reasoning_content": SUM_THINK.format(**f)},
    ]
    return msgs, {"answer": f"= {r}."}


def _capital(rng: random.Random, held_out: bool) -> tuple[list[dict], dict]:
    country = rng.choice(sorted(CAPITALS))
    f = dict(country=country, city=CAPITALS[country])
    msgs = [
        {"role": "user", "content": rng.choice(CAPITAL_Q_HELDOUT if held_out else CAPITAL_Q).format(**f)},
        {"role": "assistant", "content": CAPITAL_ANSWER.format(**f), "reasoning_content": CAPITAL_THINK.format(**f)},
    ]
    return msgs, {"answer": f"capital of {country} is {f['city']}"}


def _fact(rng: random.Random, held_out: bool, table: list) -> tuple[list[dict], dict]:
    qs, q_held, think, answer = rng.choice(table)
    msgs = [
        {"role": "user", "content": q_held if held_out else rng.choice(qs)},
        {"role": "assistant", "content": answer, "reasoning_content": think},
    ]
    return msgs, {"exact": answer}


KIND_WEIGHTS = [("weather", 0.26), ("calculator", 0.38), ("sum", 0.10), ("capital", 0.11), ("fact", 0.08),
                ("chitchat", 0.07)]


def _single(rng: random.Random, kind: str, held_out: bool, idx: int, **kw) -> tuple[list[dict], dict]:
    if kind == "weather":
        return _weather(rng, held_out, idx, kw.get("city"))
    if kind == "calculator":
        return _calc(rng, held_out, idx, kw.get("seen"))
    if kind == "sum":
        return _small_sum(rng, held_out)
    if kind == "capital":
        return _capital(rng, held_out)
    if kind == "fact":
        return _fact(rng, held_out, FACTS)
    return _fact(rng, held_out, CHITCHAT)


def _tools_for(rng: random.Random, kind: str) -> list | None:
    """Mostly both tools in the canonical order; sometimes reversed, only the relevant one, or (no tool use) none."""
    x = rng.random()
    if x < 0.75:
        return TOOLS
    if x < 0.87:
        return TOOLS[::-1]
    if kind == "weather":
        return [WEATHER_TOOL]
    if kind == "calculator":
        return [CALCULATOR_TOOL]
    return None if x < 0.95 else [rng.choice(TOOLS)]


def make_train_dialogs(n: int, seed: int) -> list[Dialog]:
    rng = random.Random(seed)
    kinds, weights = zip(*KIND_WEIGHTS)
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        tools = _tools_for(rng, kind)
        prefix: list[dict] = []
        n_calls = 0
        if rng.random() < 0.08:  # a completed earlier exchange: past turns are rendered with an empty think block
            prev = rng.choices(kinds, weights)[0]
            if tools is not TOOLS and prev in ("weather", "calculator"):
                prev = "capital"
            prefix, _ = _single(rng, prev, False, 0)
            n_calls = sum(len(m.get("tool_calls") or ()) for m in prefix)
        msgs, check = _single(rng, kind, False, n_calls)
        out.append(Dialog(kind, prefix + msgs, tools, check))
    return out


def make_heldout_dialogs(seed: int, train_exprs: set, n_weather: int = 60, n_unseen_city: int = 10,
                         n_calc: int = 40, n_direct: int = 40) -> list[Dialog]:
    rng = random.Random(seed + 1_000_003)
    out = []
    for i in range(n_weather):
        msgs, check = _weather(rng, True, 0)
        out.append(Dialog("weather", msgs, TOOLS, check))
    for city in UNSEEN_CITIES[:n_unseen_city]:
        msgs, check = _weather(rng, True, 0, city=city)
        out.append(Dialog("weather_unseen_city", msgs, TOOLS, check))
    for i in range(n_calc):
        msgs, check = _calc(rng, True, 0, seen=train_exprs)
        out.append(Dialog("calculator", msgs, TOOLS, check))
    for i in range(n_direct):
        kind = ("sum", "capital", "fact", "chitchat")[i % 4]
        msgs, check = _single(rng, kind, True, 0)
        out.append(Dialog(kind, msgs, TOOLS, check))
    return out


# ---------------------------------------------------------------------------------------------------------- encoding
def encode_dialog(ct, d: Dialog) -> tuple[list[int], list[int]]:
    """Token ids of the conversation as the model sees it when writing its last turn, and the loss mask.

    The sequence is the prompt of the last assistant turn (``add_generation_prompt``) plus that turn as the model
    writes it (``<think>…</think>content<|im_end|>``). Assistant turns after the last user message (the tool-call
    turn of the current tool loop, which the template keeps with its reasoning) are learned as well.
    """
    msgs = d.messages
    last = len(msgs) - 1
    assert msgs[last]["role"] == "assistant"
    ids = ct.encode(msgs[:last], tools=d.tools, add_generation_prompt=True)
    mask = [0] * len(ids)
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    for j in range(last_user + 1, last):
        if msgs[j]["role"] != "assistant":
            continue
        start = len(ct.encode(msgs[:j], tools=d.tools, add_generation_prompt=True))
        end = len(ct.encode(msgs[: j + 1], tools=d.tools, add_generation_prompt=False))
        for k in range(start, end):
            mask[k] = 1
    tgt = target_text(msgs[last])
    tok = ct.tokenizer
    tgt_ids: list[int] = []
    for piece, special in tok.split_special(tgt):
        tgt_ids += [tok.special_tokens[piece]] if special else tok.encode(piece)
    return ids + tgt_ids, mask + [1] * len(tgt_ids)


def target_text(msg: dict) -> str:
    text = f"<think>{msg.get('reasoning_content') or ''}</think>{msg.get('content') or ''}"
    for tc in msg.get("tool_calls") or ():
        if text.find("<|tool_calls_section_begin|>") < 0:
            text += "<|tool_calls_section_begin|>"
        text += f"<|tool_call_begin|>{tc['id']}<|tool_call_argument_begin|>{tc['function']['arguments']}<|tool_call_end|>"
    if msg.get("tool_calls"):
        text += "<|tool_calls_section_end|>"
    return text + "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------- model
def init_model(args, seed: int):
    """A fresh model: N(0, 0.05) weights (residual outputs scaled by depth), unit norms, zero routing bias; the
    routed experts become trainable parameters (they are buffers for inference)."""
    from k2ray.model.model import KimiK2ForCausalLM

    torch.manual_seed(seed)
    model = KimiK2ForCausalLM(args)
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
    for moe in model.moe_layers:
        ex = moe.experts
        for n in ("w13", "w2"):
            t = ex._buffers.pop(n)
            ex.register_parameter(n, torch.nn.Parameter(t))
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


def set_train_experts(model, fake_quant: bool | None) -> None:
    """Route the MoE layers through :func:`routed_experts_train` (with INT4 fake quantization of the expert
    weights when ``fake_quant``); ``None`` restores the model's own routed experts."""
    for moe in model.moe_layers:
        if fake_quant is None:
            moe.set_routed(None)
            continue
        ex = moe.experts
        if fake_quant:
            moe.set_routed(lambda x, i, w, ex=ex: routed_experts_train(
                x, i, w, fake_quant_int4(ex.w13), fake_quant_int4(ex.w2)))
        else:
            moe.set_routed(lambda x, i, w, ex=ex: routed_experts_train(x, i, w, ex.w13, ex.w2))


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


@dataclass
class Example:
    """A training sequence split at the end of the system turn: the prefix (tool declaration + system prompt) is
    shared by many examples and computed once per batch."""

    prefix: tuple[int, ...]
    suffix: list[int]
    mask: list[int]  # 1 where the suffix token is an assistant token to learn


def split_example(ids: list[int], mask: list[int], user_token: int) -> Example:
    cut = ids.index(user_token)
    assert not any(mask[:cut])
    return Example(tuple(ids[:cut]), ids[cut:], mask[cut:])


class PackedMeta:
    """Attention metadata of a packed micro-batch: ``mask[i, j]`` says whether token ``i`` may attend to ``j``."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask


def mla_packed_forward(attn, x, rope, cos_sin, meta: PackedMeta, kv_cache=None) -> torch.Tensor:
    """``MLAttention`` over a packed micro-batch, for training: the module's own projections, norms, rope and
    naive (non-absorbed) MLA math — as its prefill path — with one masked attention over all tokens instead of a
    Python loop over sequences (whose backward costs O(sequences x tokens))."""
    n = x.shape[0]
    if attn.q_lora_rank:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    else:
        q = attn.q_proj(x)
    q = q.view(n, attn.num_heads, attn.nope + attn.rope_dim)
    q_nope, q_pe = q.split([attn.nope, attn.rope_dim], dim=-1)
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    c_kv = attn.kv_a_layernorm(c_kv)
    cos, sin = cos_sin
    q_pe = rope.apply(q_pe, cos, sin)
    k_pe = rope.apply(k_pe.unsqueeze(1), cos, sin).squeeze(1)
    kv = attn.kv_b_proj(c_kv).view(n, attn.num_heads, attn.nope + attn.v_dim)
    k_nope, v = kv.split([attn.nope, attn.v_dim], dim=-1)
    scores = torch.einsum("qhd,khd->hqk", q_nope, k_nope) + torch.einsum("qhr,kr->hqk", q_pe, k_pe)
    scores = (scores * attn.scale).masked_fill(~meta.mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return attn.o_proj(out.reshape(n, attn.num_heads * attn.v_dim))


def set_packed_attention(model, on: bool) -> None:
    for layer in model.model.layers:
        if on:
            layer.self_attn.forward = (lambda attn: lambda *a, **k: mla_packed_forward(attn, *a, **k))(layer.self_attn)
        else:
            layer.self_attn.__dict__.pop("forward", None)


def forward_packed(model, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict an assistant token, and those tokens.

    The distinct prefixes and all suffixes are packed into one flat sequence; each suffix token attends to its own
    prefix and to the earlier tokens of its own suffix. Equal (up to float rounding) to running every full
    sequence through ``forward_full`` on its own (checked by :func:`check_packed`)."""
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
    hidden = model(torch.tensor(flat), torch.tensor(positions), PackedMeta(mask))
    return hidden[torch.tensor(want_pos)], torch.tensor(want_tok)


def check_packed(model, batch: list[Example]) -> float:
    """Max |logit difference| between the packed training path and the model's own ``forward_full``."""
    with torch.no_grad():
        set_packed_attention(model, True)
        set_train_experts(model, False)
        try:
            hidden, _ = forward_packed(model, batch)
            packed = model.compute_logits(hidden)
        finally:
            set_packed_attention(model, False)
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
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in n or "embed" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    balance = BalanceTracker(model, rate=1e-3)
    order: list[int] = []
    model.train()
    set_packed_attention(model, True)
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
    set_packed_attention(model, False)
    model.eval()


def model_state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------- eval
class _Generator:
    """Greedy generation: ``k2ray.LLM`` (local executor), or a plain no-cache loop over ``forward_full``."""

    def __init__(self, model_dir: Path, max_tokens: int):
        self.max_tokens = max_tokens
        from k2ray.tokenizer import KimiTokenizer

        self.tok = KimiTokenizer.from_dir(model_dir)
        self.stop = set(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"])
        try:
            from k2ray import LLM, SamplingParams

            self.llm = LLM(model=str(model_dir))
            self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
            self.backend = "k2ray.LLM (local executor)"
        except Exception as e:  # pragma: no cover - only while the engine is unavailable
            from k2ray.checkpoint.loader import load_model

            print(f"k2ray.LLM unavailable ({e}); evaluating with a plain greedy loop", file=sys.stderr)
            self.llm = None
            self.model = load_model(model_dir, torch.float32)
            self.backend = "greedy loop over forward_full"

    def __call__(self, prompts: list[list[int]]) -> list[str]:
        if self.llm is not None:
            outs = self.llm.generate(prompts, self.params)
            ids_list = [o.outputs[0].token_ids for o in outs]
        else:
            ids_list = []
            with torch.no_grad():
                for p in prompts:
                    ids = list(p)
                    for _ in range(self.max_tokens):
                        nxt = int(self.model.forward_full([ids])[-1].argmax())
                        ids.append(nxt)
                        if nxt in self.stop:
                            break
                    ids_list.append(ids[len(p):])
        return [self.tok.decode([t for t in ids if t not in self.stop]) for ids in ids_list]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()


def _tool_call_ok(parsed, check: dict) -> bool:
    calls = parsed.tool_calls
    if len(calls) != 1 or calls[0]["function"]["name"] != check["tool"]:
        return False
    try:
        args = json.loads(calls[0]["function"]["arguments"])
    except ValueError:
        return False
    return args == check["args"] and calls[0]["id"] == f"functions.{check['tool']}:0"


def evaluate(model_dir: Path, dialogs: list[Dialog], max_tokens: int = 96) -> dict:
    """Two rounds of greedy generation: first turn for every dialog; for tool dialogs whose call is well-formed the
    tool result (for the model's own arguments) is appended and the final answer is generated."""
    from k2ray.tokenizer import ChatTemplate
    from k2ray.tokenizer.parsers import parse_output

    ct = ChatTemplate.from_dir(model_dir)
    gen = _Generator(model_dir, max_tokens)
    t0 = time.time()
    first = gen([ct.encode(d.messages[:1], tools=d.tools, add_generation_prompt=True) for d in dialogs])
    stats = {k: {"n": 0, "first_ok": 0, "reasoning": 0, "final_ok": 0} for k in
             ("weather", "weather_unseen_city", "calculator", "direct")}
    second_prompts, second_idx = [], []
    for i, (d, text) in enumerate(zip(dialogs, first)):
        kind = d.kind if d.kind in stats else "direct"
        s = stats[kind]
        s["n"] += 1
        parsed = parse_output(text)
        if parsed.reasoning_content.strip():
            s["reasoning"] += 1
        if kind == "direct":
            if "exact" in d.check:
                ok = not parsed.tool_calls and parsed.content.strip() == d.check["exact"]
            else:
                ok = not parsed.tool_calls and d.check["answer"] in parsed.content
            s["first_ok"] += ok
            s["final_ok"] += ok
            continue
        if _tool_call_ok(parsed, d.check):
            s["first_ok"] += 1
        calls = parsed.tool_calls
        if len(calls) != 1:
            continue
        try:
            args = json.loads(calls[0]["function"]["arguments"])
        except ValueError:
            continue
        name = calls[0]["function"]["name"]
        if name == "get_weather" and isinstance(args.get("city"), str):
            # the weather service answers for the city asked; values are the dialog's (unseen combinations)
            result = weather_result(args["city"], d.check["temp"], d.check["cond"])
            truth = (str(d.check["temp"]), d.check["cond"])
        elif name == "calculator" and isinstance(args.get("expression"), str):
            try:
                r = eval(args["expression"], {"__builtins__": {}}, {})  # noqa: S307 - digits and + - * only
            except Exception:
                continue
            result, truth = calc_result(r), (str(r),)
        else:
            continue
        msgs = d.messages[:1] + [
            {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content,
             "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": result},
        ]
        second_prompts.append(ct.encode(msgs, tools=d.tools, add_generation_prompt=True))
        second_idx.append((i, kind, truth, d.check))
    second = gen(second_prompts) if second_prompts else []
    for (i, kind, truth, check), text in zip(second_idx, second):
        parsed = parse_output(text)
        # the final answer must state the TRUE values (a wrong call gives a wrong result and fails here)
        if kind.startswith("weather"):
            want = (str(check["temp"]), check["cond"])
        else:
            want = (str(check["result"]),)
        ok = not parsed.tool_calls and answer_states(parsed.content, want)
        stats[kind]["final_ok"] += ok
    gen.close()
    return {"stats": stats, "seconds": time.time() - t0, "backend": gen.backend,
            "example_first": first[0], "example_final": second[0] if second else ""}


def answer_states(text: str, want: tuple) -> bool:
    """``text`` states every number in ``want`` as a word, and exactly the condition in ``want`` (if any)."""
    words = text.replace(".", " ").replace(",", " ").split()
    rest, found = text, set()
    for cond in sorted(CONDITIONS, key=len, reverse=True):  # "partly cloudy" before "cloudy"
        if cond in rest:
            found.add(cond)
            rest = rest.replace(cond, " ")
    conds = {w for w in want if not w.lstrip("-").isdigit()}
    return all(w in words for w in want if w.lstrip("-").isdigit()) and found == conds


def summarize(res: dict) -> dict:
    s = res["stats"]
    tool = [s["weather"], s["calculator"]]
    n_tool = sum(x["n"] for x in tool)
    out = {
        "tool_calls_correct": sum(x["first_ok"] for x in tool) / max(1, n_tool),
        "final_answers_correct": (sum(x["final_ok"] for x in tool) + s["direct"]["final_ok"])
        / max(1, n_tool + s["direct"]["n"]),
        "weather_call": s["weather"]["first_ok"] / max(1, s["weather"]["n"]),
        "weather_final": s["weather"]["final_ok"] / max(1, s["weather"]["n"]),
        "calculator_call": s["calculator"]["first_ok"] / max(1, s["calculator"]["n"]),
        "calculator_final": s["calculator"]["final_ok"] / max(1, s["calculator"]["n"]),
        "direct_answers": s["direct"]["final_ok"] / max(1, s["direct"]["n"]),
        "reasoning_present": sum(x["reasoning"] for x in s.values()) / max(1, sum(x["n"] for x in s.values())),
        "unseen_city_call": s["weather_unseen_city"]["first_ok"] / max(1, s["weather_unseen_city"]["n"]),
        "unseen_city_final": s["weather_unseen_city"]["final_ok"] / max(1, s["weather_unseen_city"]["n"]),
        "counts": {k: v["n"] for k, v in s.items()},
    }
    return out


def print_summary(summ: dict) -> None:
    c = summ["counts"]
    print(f"held-out tool calls well-formed with correct arguments: {summ['tool_calls_correct']:.1%} "
          f"({c['weather']} weather + {c['calculator']} calculator)")
    print(f"  get_weather {summ['weather_call']:.1%}, calculator {summ['calculator_call']:.1%}")
    print(f"held-out final answers correct: {summ['final_answers_correct']:.1%} "
          f"(weather {summ['weather_final']:.1%}, calculator {summ['calculator_final']:.1%}, "
          f"direct {summ['direct_answers']:.1%} of {c['direct']})")
    print(f"think block present: {summ['reasoning_present']:.1%}")
    print(f"cities never seen in training ({c['weather_unseen_city']}): call {summ['unseen_city_call']:.1%}, "
          f"final {summ['unseen_city_final']:.1%}")


# ---------------------------------------------------------------------------------------------------------- card
CARD = """\
# k2ray-demo

**A toy.** A ~{params_m:.1f}M-parameter model with the exact Kimi K2 (DeepSeek-V3) architecture and checkpoint format,
trained for {minutes:.0f} minutes on two CPU cores on **synthetic** chat transcripts, so that the k2ray serving stack
has something to serve that gives readable, deterministic answers — including real tool calls — in its demos and
tests. It knows nothing beyond its tiny synthetic corpus: weather look-ups through a `get_weather` tool, arithmetic
through a `calculator` tool (a two-digit number plus, minus or times a one- or two-digit number), single-digit sums, the capitals of {n_capitals} countries, a handful of facts and
greetings. The weather it reports comes from whatever the tool returns. Do not use it for anything else.

## Format
Exactly what a real K2-Thinking release looks like, at a tiny shape:
- `config.json`: `model_type: kimi_k2`, `DeepseekV3ForCausalLM`, hidden {hidden}, {layers} layers (layer 0 dense),
  {experts} routed experts (top-{topk}, sigmoid `noaux_tc` routing) + 1 shared expert, MLA (q_lora {q_lora},
  kv_lora {kv_lora}), YaRN rope; vocabulary {base_vocab} BPE tokens + the 256 K2 special tokens at the K2 offsets.
- Routed experts INT4 `pack-quantized` (compressed-tensors, symmetric, group 32: `weight_packed` / `weight_scale` /
  `weight_shape`); everything else bf16, `e_score_correction_bias` fp32; two safetensors shards + index.
- `tiktoken.model`, `tokenizer_config.json`, `chat_template.jinja` (K2-Thinking chat format: `<think>` reasoning,
  `<|tool_calls_section_begin|>` tool calls with ids `functions.NAME:IDX`, `## Return of ID` tool results).

## Tools it was trained with
Declare them through the chat template's `tools` (the OpenAI `tools` field), this order or reversed:
```json
{tools_json}
```

## Training
`python3 tools/train_demo.py` (deterministic: seed {seed}; fp32; {threads} CPU threads) builds {n_train} synthetic
dialogues rendered with `chat_template.jinja` (default system prompt, the tools above declared), {kinds}; trains the
k2ray model code itself with next-token loss on the assistant tokens only (AdamW, lr {lr}, {steps} steps of
~{batch_tokens} tokens, cosine decay, aux-loss-free expert balancing through `e_score_correction_bias`; the last
{qat_steps} steps see the routed experts through INT4 fake quantization), then writes this checkpoint with
`k2ray.checkpoint.tiny.write_checkpoint`. Final training loss (assistant tokens): {final_loss:.4f}. Wall time:
{minutes:.1f} minutes (corpus {corpus_s:.0f} s, training {train_s:.0f} s, evaluation {eval_s:.0f} s).

## Evaluation (this INT4 checkpoint, greedy decoding through {backend})
Held-out synthetic set: question phrasings never seen in training, new temperature/condition combinations, and
arithmetic expressions (same operand ranges) that do not occur in the training corpus. Reproduce it with
`python3 tools/train_demo.py --eval-only k2ray/assets/k2ray-demo`.

| measure | result |
|---|---|
| tool calls well-formed with correct name, id and arguments ({n_tool} dialogues) | **{tool_calls_correct:.1%}** |
| &nbsp;&nbsp;`get_weather` ({n_weather}) / `calculator` ({n_calc}) | {weather_call:.1%} / {calculator_call:.1%} |
| final answers correct: tool dialogues after the tool result + direct answers ({n_all}) | **{final_answers_correct:.1%}** |
| &nbsp;&nbsp;weather (states the returned temperature and condition) / calculator (states the result) | {weather_final:.1%} / {calculator_final:.1%} |
| &nbsp;&nbsp;direct answers, no tool call: sums state the result, capitals the city, facts and greetings word for word ({n_direct}) | {direct_answers:.1%} |
| `<think>` reasoning present | {reasoning_present:.1%} |
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
    (out / "README.md").write_text(CARD.format(**info))


def demo_example(model_dir: Path) -> tuple[str, str, str]:
    """The model card's example: the same conversation as tests/test_demo_model.py."""
    from k2ray.tokenizer import ChatTemplate
    from k2ray.tokenizer.parsers import parse_output

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


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dialogs", type=int, default=12000, help="training dialogues")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-tokens", type=int, default=1800)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--short-frac", type=float, default=0.3,
                    help="first fraction of steps on the dialogues without the tool declaration (curriculum)")
    ap.add_argument("--qat-frac", type=float, default=0.2, help="final fraction of steps with INT4 fake quant")
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
    from k2ray.checkpoint.tiny import tiny_config, write_checkpoint
    from k2ray.config import ModelArgs
    from k2ray.tokenizer import ChatTemplate, write_tokenizer_files

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
    ct = ChatTemplate.from_dir(tmp_tok)
    shutil.rmtree(tmp_tok)
    user_token = ct.tokenizer.special_tokens["<|im_user|>"]
    data = [split_example(*encode_dialog(ct, d), user_token) for d in train_dialogs]
    n_tok = sum(len(x.prefix) + len(x.suffix) for x in data)
    n_tgt = sum(sum(x.mask) for x in data)
    n_uniq = sum(len(x.suffix) for x in data) + sum(len(p) for p in {x.prefix for x in data})
    t_corpus = time.time() - t_start
    print(f"corpus: {len(data)} dialogues, {n_tok} tokens ({n_tgt} assistant tokens), "
          f"mean length {n_tok / len(data):.0f}, {n_uniq} without repeated prefixes, built in {t_corpus:.0f} s")

    config = tiny_config()
    args = ModelArgs.from_dict(config)
    model = init_model(args, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {a.steps} steps of ~{a.batch_tokens} computed tokens")
    err = check_packed(model, data[:6])
    print(f"packed training forward vs forward_full: max |logit diff| {err:.2e}")
    if err > 1e-3:
        raise SystemExit("packed training forward disagrees with the model's forward_full")
    log: list = []
    t0 = time.time()
    qat_from = int(a.steps * (1 - a.qat_frac))
    short_steps = int(a.steps * a.short_frac)
    short = None
    if short_steps:
        short = [split_example(*encode_dialog(ct, replace(d, tools=None)), user_token) for d in train_dialogs]
    train(model, data, a.steps, a.batch_tokens, a.lr, a.seed, qat_from, log, short=short, short_steps=short_steps)
    t_train = time.time() - t0
    final_loss = sum(x["loss"] for x in log[-20:]) / min(20, len(log))
    print(f"trained in {t_train:.0f} s; final loss {final_loss:.4f}")

    if out.exists():
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
    write_checkpoint(out, config, model_state_dict(model))
    write_tokenizer_files(out)
    (out / "training_log.json").unlink(missing_ok=True)

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
            q_lora=args.q_lora_rank, kv_lora=args.kv_lora_rank, base_vocab=config["vocab_size"] - 256,
            tools_json=json.dumps(TOOLS, indent=2), seed=a.seed, threads=a.threads, n_train=len(data),
            kinds=", ".join(f"{k} {w:.0%}" for k, w in KIND_WEIGHTS), lr=a.lr, steps=a.steps,
            batch_tokens=a.batch_tokens, qat_steps=a.steps - qat_from, final_loss=final_loss, corpus_s=t_corpus,
            train_s=t_train, eval_s=t_eval, backend=res["backend"], n_tool=c["weather"] + c["calculator"],
            n_weather=c["weather"], n_calc=c["calculator"], n_all=c["weather"] + c["calculator"] + c["direct"],
            n_direct=c["direct"], n_unseen=c["weather_unseen_city"], n_cities=len(CITIES),
            example_first=first, example_tool=tool, example_final=final,
        )
        write_card(out, info)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {minutes:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
