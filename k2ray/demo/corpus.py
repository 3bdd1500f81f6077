"""The demo model's synthetic corpus: its two tools, the dialogues it learns and is evaluated on, and how a dialogue
becomes a training sequence.

Dialogues are chat transcripts in OpenAI message form, rendered with the model's own K2-Thinking chat template (default
system prompt, tools declared through the template's ``tools`` argument): weather questions answered through a
``get_weather(city)`` tool call, arithmetic through a ``calculator(expression)`` tool call, and small sums, capitals,
facts and greetings answered directly. Every assistant turn starts with a think block. The held-out set uses only
phrasings, values and expressions that training never sees, plus cities never seen at all. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from k2ray.tokenizer.kimi_format import (
    THINK_END,
    THINK_START,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    tool_call_id,
)

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
    return {"id": tool_call_id(name, idx), "type": "function",
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
    writes it (:func:`target_text`). Assistant turns after the last user message (the tool-call
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
    """An assistant turn as the model writes it: think block, content, tool-call section, ``<|im_end|>``."""
    text = f"{THINK_START}{msg.get('reasoning_content') or ''}{THINK_END}{msg.get('content') or ''}"
    for tc in msg.get("tool_calls") or ():
        if text.find(TOOL_CALLS_SECTION_BEGIN) < 0:
            text += TOOL_CALLS_SECTION_BEGIN
        text += f"{TOOL_CALL_BEGIN}{tc['id']}{TOOL_CALL_ARGUMENT_BEGIN}{tc['function']['arguments']}{TOOL_CALL_END}"
    if msg.get("tool_calls"):
        text += TOOL_CALLS_SECTION_END
    return text + "<|im_end|>"
