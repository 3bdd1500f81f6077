#!/usr/bin/env python3
"""Regenerate the tiny k2ray tokenizer files shipped in ``k2ray/tokenizer/data/``.

    python3 tools/make_tiny_bpe.py            # rewrite data/tiktoken.model + data/tokenizer_config.json
    python3 tools/make_tiny_bpe.py --check    # regenerate in memory, compare with the shipped files

The vocabulary is a byte-level BPE with exactly 2048 base tokens: the 256 single bytes (rank =
byte value) followed by 1792 merges learned greedily on a synthetic English corpus of chat
transcripts (weather in cities, arithmetic with a calculator tool, short facts), JSON tool
arguments and plain prose.  Pre-tokenization uses the K2 split pattern, so every merge stays
inside one pre-token exactly as tiktoken applies it.  Everything is deterministic: a seeded
corpus, and ties between equally frequent pairs broken by the pair's bytes.

The 256 K2 special tokens follow at ids 2048 + i with the real model's names; unnamed ones get
``<|reserved_token_{id}|>`` (the name the Kimi loader gives an id the config does not name).

The chat template (``data/chat_template.jinja``) is authored by hand, not generated here.
Needs k2ray installed (for Kimi's markers) and the ``regex`` module (a transformers dependency) for the ``&&``
class intersection.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import json
import os
import random
import sys
from collections import Counter

from k2ray.tokenizer import kimi_format as kf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "k2ray", "tokenizer", "data")

N_BASE = 2048
N_MERGES = N_BASE - 256
SEED = 20250711

# Same named offsets as k2ray.tokenizer.tokenizer.K2_NAMED_SPECIAL_OFFSETS, written out here (the tests check
# that they agree); only Kimi's think and tool-call markers come from the package, their one home.
NAMED_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: kf.TOOL_CALLS_SECTION_BEGIN, 12: kf.TOOL_CALLS_SECTION_END, 13: kf.TOOL_CALL_BEGIN,
    14: kf.TOOL_CALL_ARGUMENT_BEGIN, 15: kf.TOOL_CALL_END, 17: "<|im_middle|>",
    18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>",
    22: kf.THINK_START, 23: kf.THINK_END, 254: "[UNK]", 255: "[PAD]",
}

K2_PAT_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]

# ----------------------------------------------------------------------------------- corpus

CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "New York", "Sydney", "Cairo", "Rome", "Madrid", "Beijing",
    "Moscow", "Toronto", "Mumbai", "Seoul", "Lisbon", "Vienna", "Dublin", "Oslo", "Stockholm", "Helsinki",
    "Athens", "Istanbul", "Dubai", "Singapore", "Bangkok", "Jakarta", "Manila", "Lima", "Santiago", "Bogota",
    "Mexico City", "Chicago", "Boston", "Seattle", "Denver", "Miami", "Houston", "Vancouver", "Montreal",
    "Nairobi", "Lagos", "Cape Town", "Buenos Aires", "Sao Paulo", "Shanghai", "Osaka", "Delhi", "Warsaw",
    "Prague", "Budapest", "Amsterdam", "Brussels", "Zurich", "Geneva", "Munich", "Hamburg", "Milan",
    "Barcelona", "Copenhagen", "Reykjavik", "Auckland", "Melbourne", "Perth", "Hanoi", "Kyoto",
]
COUNTRIES = {
    "Paris": "France", "London": "the United Kingdom", "Tokyo": "Japan", "Berlin": "Germany", "Rome": "Italy",
    "Madrid": "Spain", "Beijing": "China", "Moscow": "Russia", "Lisbon": "Portugal", "Vienna": "Austria",
    "Dublin": "Ireland", "Oslo": "Norway", "Stockholm": "Sweden", "Helsinki": "Finland", "Athens": "Greece",
    "Cairo": "Egypt", "Seoul": "South Korea", "Bangkok": "Thailand", "Jakarta": "Indonesia", "Lima": "Peru",
    "Santiago": "Chile", "Bogota": "Colombia", "Mexico City": "Mexico", "Nairobi": "Kenya", "Warsaw": "Poland",
    "Prague": "the Czech Republic", "Budapest": "Hungary", "Amsterdam": "the Netherlands",
    "Brussels": "Belgium", "Copenhagen": "Denmark", "Reykjavik": "Iceland", "Hanoi": "Vietnam",
    "Ottawa": "Canada", "Canberra": "Australia", "Buenos Aires": "Argentina", "Manila": "the Philippines",
}
CONDITIONS = [
    "sunny", "cloudy", "partly cloudy", "rainy", "light rain", "heavy rain", "windy", "snowy", "foggy",
    "clear", "stormy", "overcast", "humid", "mild", "cold", "hot", "warm", "drizzle", "thunderstorms",
]
WEATHER_QUESTIONS = [
    "What is the weather in {city}?",
    "What's the weather like in {city} today?",
    "How is the weather in {city} right now?",
    "Is it raining in {city}?",
    "How hot is it in {city}?",
    "Tell me the temperature in {city}.",
    "Can you check the weather in {city} for me?",
    "What is the current temperature in {city} in {unit}?",
    "Should I bring an umbrella in {city} today?",
    "Is it cold in {city}?",
    "Weather in {city}, please.",
    "I am traveling to {city} tomorrow. What is the weather there?",
]
WEATHER_THOUGHTS = [
    "The user wants the current weather in {city}. I should call the get_weather tool with the city name.",
    "I need the weather for {city}. Let me use the get_weather function.",
    "The user is asking about {city}. I will look up the weather first and then answer.",
    "To answer, I need the current conditions in {city}, so I will call get_weather.",
]
WEATHER_ANSWERS = [
    "The weather in {city} is {cond} with a temperature of {temp} degrees {unit_name}.",
    "It is currently {cond} in {city}, and the temperature is {temp} degrees {unit_name}.",
    "In {city} it is {temp} degrees {unit_name} and {cond}. The humidity is {hum} percent.",
    "Right now {city} is {cond}. The temperature is {temp} degrees, with a wind speed of {wind} km/h.",
    "{city}: {cond}, {temp} degrees {unit_name}.",
    "The current temperature in {city} is {temp} degrees {unit_name}. The sky is {cond}.",
]
FACTS = [
    "The capital of {country} is {city}.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit.",
    "The Earth orbits the Sun once every 365.25 days.",
    "The Moon orbits the Earth about once every 27 days.",
    "Light travels at about 300,000 kilometers per second.",
    "A week has 7 days and a day has 24 hours.",
    "An hour has 60 minutes and a minute has 60 seconds.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Mount Everest is the highest mountain in the world, at 8,849 meters.",
    "The human heart has four chambers.",
    "Paris is the capital and the largest city of France.",
    "Tokyo is the capital of Japan and one of the largest cities in the world.",
    "The Amazon is the largest rainforest on Earth.",
    "A triangle has three sides and a square has four sides.",
    "The sum of the angles of a triangle is 180 degrees.",
    "There are 12 months in a year.",
    "The chemical symbol for gold is Au and for water it is H2O.",
    "Plants use sunlight to make food through photosynthesis.",
    "The Sun is a star at the center of our solar system.",
    "Jupiter is the largest planet in the solar system.",
    "Mercury is the planet closest to the Sun.",
    "The speed of sound in air is about 343 meters per second.",
    "A kilometer is 1,000 meters and a mile is about 1.609 kilometers.",
    "The Nile is one of the longest rivers in the world.",
    "Honey never spoils if it is stored in a sealed container.",
    "Humans have 206 bones in the adult body.",
    "The freezing point of water in Fahrenheit is 32 degrees.",
    "Oxygen makes up about 21 percent of the air we breathe.",
    "The Great Wall of China is thousands of kilometers long.",
]
FACT_QUESTIONS = [
    ("What is the capital of {country}?", "The capital of {country} is {city}."),
    ("Which city is the capital of {country}?", "{city} is the capital of {country}."),
    ("Is {city} the capital of {country}?", "Yes, {city} is the capital of {country}."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("What is the highest mountain?", "Mount Everest is the highest mountain in the world."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean on Earth."),
]
OPS = [("+", "plus", "add"), ("-", "minus", "subtract"), ("*", "times", "multiply"), ("/", "divided by", "divide")]
MATH_QUESTIONS = [
    "What is {a} {sym} {b}?",
    "What is {a} {word} {b}?",
    "Calculate {a} {sym} {b}.",
    "Please compute {a} {sym} {b} for me.",
    "Can you {verb} {a} and {b}?",
    "How much is {a} {word} {b}?",
    "Use the calculator to work out {a} {sym} {b}.",
]
MATH_THOUGHTS = [
    "The user wants to {verb} {a} and {b}. I will use the calculator tool to get an exact answer.",
    "I should evaluate the expression {a} {sym} {b} with the calculator.",
    "Let me call the calculator with the expression {a} {sym} {b}.",
]
MATH_ANSWERS = [
    "The answer is {r}.",
    "{a} {sym} {b} = {r}.",
    "{a} {word} {b} is {r}.",
    "The result of {a} {sym} {b} is {r}.",
    "The calculator says the answer is {r}.",
]
SYSTEM_PROMPTS = [
    "You are Kimi, an AI assistant created by Moonshot AI.",
    "You are a helpful assistant.",
    "You are a helpful assistant that can use tools to answer questions about the weather and math.",
    "You are a concise assistant. Answer in one sentence.",
]
CHITCHAT = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, who are you?", "I am Kimi, an AI assistant created by Moonshot AI. How can I help you?"),
    ("Thank you!", "You are welcome! Let me know if you need anything else."),
    ("Thanks, that is helpful.", "I am glad it helped. Is there anything else you would like to know?"),
    ("Good morning.", "Good morning! What can I do for you today?"),
    ("Can you help me?", "Of course. What do you need help with?"),
    ("What can you do?", "I can answer questions, check the weather in a city, and do arithmetic with a calculator."),
    ("Bye.", "Goodbye! Have a great day."),
]
PROSE = """\
An assistant is a program that answers questions and helps people get things done. A good answer is short,
correct and easy to read. When the question needs fresh information, such as the weather in a city today, the
assistant should call a tool instead of guessing. A tool is a function with a name, a description and a set of
parameters. The assistant writes the name of the function and its arguments as a JSON object, the system runs the
function, and the result comes back as a message from the tool. Then the assistant reads the result and writes the
final answer for the user.

The weather changes from day to day and from place to place. In the morning it may be cold and foggy, and in the
afternoon it may be warm and sunny. Temperature is measured in degrees Celsius in most countries and in degrees
Fahrenheit in a few others. To convert Celsius to Fahrenheit, multiply by 9, divide by 5 and add 32. A temperature of
20 degrees Celsius is 68 degrees Fahrenheit. Humidity is the amount of water in the air, given as a percentage.
Wind speed is usually given in kilometers per hour or in miles per hour.

Arithmetic is the part of mathematics that deals with numbers and the basic operations on them: addition,
subtraction, multiplication and division. A calculator evaluates an expression such as 12 * 7 or (3 + 4) / 2 and
returns the result. Even simple sums are easy to get wrong when the numbers are large, so a careful assistant uses the
calculator and then reports the exact result. The answer to 12 * 7 is 84, and the answer to 100 / 4 is 25.

People ask many kinds of questions. Some want facts, like the capital of a country or the height of a mountain.
Some want help with a plan, a message or a calculation. Some just want to talk. The assistant should be polite and
honest: if it does not know something, it should say so, and if a tool fails, it should explain what happened and try
again or suggest another way. It should not make up numbers, names or dates.

Before answering, the assistant may think step by step. It considers what the user is asking, which tools could
help, and what the result means. The thinking is private reasoning; the final answer is what the user reads. For
example: the user asks for the weather in Paris, the assistant decides to call get_weather with the city Paris,
the tool returns sunny and 21 degrees, and the assistant answers that it is sunny in Paris with a temperature of 21
degrees Celsius.

The request contains a list of messages. Each message has a role, such as system, user, assistant or tool, and
content. The system message sets the behavior of the assistant. The user message contains the question. The
assistant message contains the answer, and it may also contain tool calls. Each tool call has an id, a type and a
function with a name and arguments. The tool message contains the result of a call and the id of the call it answers.
"""
CODE_SNIPPETS = [
    'def get_weather(city: str, unit: str = "celsius") -> dict:\n    """Return the current weather for a city."""\n'
    '    data = fetch(city)\n    return {"city": city, "temperature": data["temp"], "unit": unit}\n',
    'import json\n\nresult = json.loads(response)\nif result["status"] == "ok":\n    print(result["value"])\nelse:\n'
    '    raise ValueError("request failed")\n',
    "for i in range(10):\n    total += i * i\nprint(total)\n",
    'curl -s http://localhost:8000/v1/chat/completions -H "Content-Type: application/json" -d \'{"model": "kimi"}\'\n',
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The name of the city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            },
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
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web and return the top results.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "The search query"},
                "max_results": {"type": "integer", "description": "How many results to return"},
            },
            "required": ["query"],
        },
    },
}


def _weather_dialog(rng: random.Random, call_idx: int) -> tuple[list[str], int]:
    city = rng.choice(CITIES)
    unit = rng.choice(["celsius", "celsius", "celsius", "fahrenheit"])
    unit_name = "Celsius" if unit == "celsius" else "Fahrenheit"
    temp = rng.randint(-15, 38) if unit == "celsius" else rng.randint(5, 100)
    cond, hum, wind = rng.choice(CONDITIONS), rng.randint(10, 99), rng.randint(0, 60)
    fmt = dict(city=city, unit=unit, unit_name=unit_name, temp=temp, cond=cond, hum=hum, wind=wind)
    args = {"city": city} if rng.random() < 0.6 else {"city": city, "unit": unit}
    seps = rng.choice([(", ", ": "), (",", ":")])
    result = {"city": city, "temperature": temp, "unit": unit, "condition": cond, "humidity": hum, "wind_kph": wind}
    call_id = kf.tool_call_id("get_weather", call_idx)
    lines = [
        "user",
        rng.choice(WEATHER_QUESTIONS).format(**fmt),
        "assistant",
        rng.choice(WEATHER_THOUGHTS).format(**fmt),
        call_id + json.dumps(args, separators=seps, ensure_ascii=False),
        "tool",
        f"## Return of {call_id}",
        json.dumps(result, separators=rng.choice([(", ", ": "), (",", ":")])),
        "assistant",
        rng.choice(WEATHER_ANSWERS).format(**fmt),
    ]
    return lines, call_idx + 1


def _math_dialog(rng: random.Random, call_idx: int) -> tuple[list[str], int]:
    sym, word, verb = rng.choice(OPS)
    a = rng.choice([rng.randint(0, 20), rng.randint(10, 999), rng.randint(100, 99999)])
    b = rng.choice([rng.randint(1, 20), rng.randint(2, 999)])
    if sym == "+":
        r = a + b
    elif sym == "-":
        r = a - b
    elif sym == "*":
        r = a * b
    else:
        r = round(a / b, 4)
        if r == int(r):
            r = int(r)
    fmt = dict(a=a, b=b, sym=sym, word=word, verb=verb, r=r)
    expr = f"{a} {sym} {b}"
    call_id = kf.tool_call_id("calculator", call_idx)
    lines = [
        "user",
        rng.choice(MATH_QUESTIONS).format(**fmt),
        "assistant",
        rng.choice(MATH_THOUGHTS).format(**fmt),
        call_id + json.dumps({"expression": expr}),
        "tool",
        f"## Return of {call_id}",
        json.dumps({"result": r}) if rng.random() < 0.7 else str(r),
        "assistant",
        rng.choice(MATH_ANSWERS).format(**fmt),
    ]
    return lines, call_idx + 1


def _fact_dialog(rng: random.Random) -> list[str]:
    city, country = rng.choice(sorted(COUNTRIES.items()))
    q, a = rng.choice(FACT_QUESTIONS)
    lines = ["user", q.format(city=city, country=country), "assistant"]
    if rng.random() < 0.5:
        lines.append("The user asks a simple factual question. I know the answer, so no tool is needed.")
    lines.append(a.format(city=city, country=country))
    if rng.random() < 0.4:
        lines.append(rng.choice(FACTS).format(city=city, country=country))
    return lines


def build_corpus(seed: int = SEED, n_dialogs: int = 2400) -> str:
    """The deterministic training corpus (~1 MB of English)."""
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(6):
        docs.append(PROSE)
    for snippet in CODE_SNIPPETS:
        docs.extend([snippet] * 3)
    for tools in ([WEATHER_TOOL], [CALCULATOR_TOOL], [WEATHER_TOOL, CALCULATOR_TOOL], [SEARCH_TOOL, WEATHER_TOOL]):
        docs.append("tool_declare\n" + json.dumps(tools, separators=(",", ":")))
        docs.append(json.dumps(tools, indent=2))
    for _ in range(n_dialogs):
        lines = []
        if rng.random() < 0.5:
            tools = rng.choice([[WEATHER_TOOL], [CALCULATOR_TOOL], [WEATHER_TOOL, CALCULATOR_TOOL], [SEARCH_TOOL]])
            lines += ["tool_declare", json.dumps(tools, separators=(",", ":"))]
        lines += ["system", rng.choice(SYSTEM_PROMPTS)]
        call_idx = 0
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.4:
                more, call_idx = _weather_dialog(rng, call_idx)
            elif kind < 0.7:
                more, call_idx = _math_dialog(rng, call_idx)
            elif kind < 0.9:
                more = _fact_dialog(rng)
            else:
                more = list(rng.choice(CHITCHAT))
                more = ["user", more[0], "assistant", more[1]]
            lines.extend(more)
        docs.append("\n".join(lines))
    for _ in range(400):
        docs.append(rng.choice(FACTS).format(city="Paris", country="France"))
        docs.append(
            f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)} at "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} the temperature was {rng.uniform(-10, 40):.1f} degrees."
        )
    return "\n\n".join(docs) + "\n"


# ----------------------------------------------------------------------------------- training


def _pretokenize(corpus: str) -> Counter:
    import regex  # type: ignore[import-not-found]

    pat = regex.compile("(?V1)" + "|".join(K2_PAT_PARTS))
    return Counter(m.encode("utf-8") for m in pat.findall(corpus))


def train_bpe(corpus: str, n_merges: int = N_MERGES) -> list[bytes]:
    """Greedy byte-level BPE; returns the token bytes in rank order (256 bytes + merges)."""
    words = _pretokenize(corpus)
    items = sorted(words.items())  # deterministic order
    seqs: list[list[int]] = [list(w) for w, _ in items]
    freqs: list[int] = [f for _, f in items]
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    index: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}

    pair_count: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for wi, seq in enumerate(seqs):
        f = freqs[wi]
        for p in zip(seq, seq[1:]):
            pair_count[p] += f
            where.setdefault(p, set()).add(wi)

    heap: list = []

    def push(p: tuple[int, int]) -> None:
        c = pair_count.get(p, 0)
        if c > 0:
            heapq.heappush(heap, (-c, vocab[p[0]], vocab[p[1]], p))

    for p in pair_count:
        push(p)

    added = 0
    while added < n_merges:
        if not heap:
            raise RuntimeError(f"corpus too small: only {added} merges learned")
        negc, _, _, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc:
            continue  # stale entry
        a, b = pair
        merged = vocab[a] + vocab[b]
        new_id = index.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            index[merged] = new_id
            added += 1
        touched: set[tuple[int, int]] = set()
        for wi in sorted(where.pop(pair, ())):
            seq = seqs[wi]
            f = freqs[wi]
            if len(seq) < 2:
                continue
            new: list[int] = []
            i = 0
            changed = False
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    new.append(new_id)
                    i += 2
                    changed = True
                else:
                    new.append(seq[i])
                    i += 1
            if not changed:
                continue
            for p in zip(seq, seq[1:]):
                pair_count[p] -= f
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(wi)
                touched.add(p)
            seqs[wi] = new
        pair_count.pop(pair, None)
        for p in touched:
            if pair_count.get(p, 0) <= 0:
                pair_count.pop(p, None)
            elif p != pair:
                push(p)
    return vocab


# ----------------------------------------------------------------------------------- files


def tiktoken_model_bytes(vocab: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in enumerate(vocab))


def special_names(n_base: int = N_BASE) -> dict[int, str]:
    return {n_base + i: NAMED_SPECIALS.get(i, f"<|reserved_token_{n_base + i}|>") for i in range(256)}


def tokenizer_config_bytes(n_base: int = N_BASE) -> bytes:
    names = special_names(n_base)
    cfg = {
        "added_tokens_decoder": {
            str(i): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, name in names.items()
        },
        "additional_special_tokens": [names[n_base + i] for i in sorted(NAMED_SPECIALS) if i not in (0, 1, 254, 255)],
        "bos_token": "[BOS]",
        "eos_token": "<|im_end|>",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "tokenizer_class": "TikTokenTokenizer",
        # As in Kimi's releases: AutoTokenizer(trust_remote_code=True) loads the checkpoint's tokenization_kimi.py.
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DATA_DIR, help="output directory (default: the package data dir)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    ap.add_argument("--merges", type=int, default=N_MERGES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    vocab = train_bpe(build_corpus(), args.merges)
    files = {
        "tiktoken.model": tiktoken_model_bytes(vocab),
        "tokenizer_config.json": tokenizer_config_bytes(len(vocab)),
    }
    status = 0
    for name, data in files.items():
        path = os.path.join(args.out, name)
        if args.check:
            with open(path, "rb") as fh:
                same = fh.read() == data
            print(f"{name}: {'identical' if same else 'DIFFERS'}")
            status |= 0 if same else 1
        else:
            os.makedirs(args.out, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
            print(f"wrote {name} ({len(data)} bytes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
