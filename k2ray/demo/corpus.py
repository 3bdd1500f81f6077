"""The demo model's synthetic corpus: its tools, the dialogues it learns and is evaluated on, and how a dialogue
becomes a training sequence.

Dialogues are chat transcripts in OpenAI message form, rendered with the model's own chat template (Kimi K2.5: K2-Thinking
turns, image parts as media markers): weather questions answered through a ``get_weather(city)`` tool call whose result
comes in many shapes (keys, nesting, units, plain strings, errors), arithmetic through a ``calculator(expression)``
tool call when one is declared and directly (small numbers) when none is, comparisons with a short reasoning, capitals,
facts, greetings, and questions about a picture's colour or shape. Tools are declared in several spellings (the demo's,
the Kimi K2 model card's, the OpenAI Agents SDK's), with unrelated tools beside them or not at all; the system prompt
varies; some conversations carry an earlier exchange (its reasoning dropped, as the template renders past turns). Every
assistant turn starts with a think block that plans rather than repeats the answer.

The held-out set uses only phrasings, tool-result shapes (key names and nestings), error messages, expressions and
pictures that training never sees. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from k2ray.demo.pictures import COLOURS, SHAPE_COLOURS, SHAPES, data_url, shape_picture, solid
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
# The Kimi K2 model card's tool-calling example declares get_weather like this.
CARD_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Retrieve current weather information. Call this when the user asks about the weather.",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "Name of the city"}},
        },
    },
}


def sdk_tool(name: str, arg: str, description: str) -> dict:
    """A tool as the OpenAI Agents SDK's ``function_tool`` declares a one-string-argument function (strict schema)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "properties": {arg: {"title": arg.title(), "type": "string"}},
                "required": [arg],
                "title": f"{name}_args",
                "type": "object",
                "additionalProperties": False,
            },
            "strict": True,
        },
    }


SDK_WEATHER_TOOL = sdk_tool("get_weather", "city", "Get the weather for a city.")
SDK_CALCULATOR_TOOL = sdk_tool("calculator", "expression", "Evaluate an arithmetic expression.")
# Declared beside the demo's tools, never called: the model must pick the right one.
OTHER_TOOLS = [
    sdk_tool("search_web", "query", "Search the web and return the top results."),
    {"type": "function", "function": {"name": "get_time", "description": "Get the current local time in a timezone.",
                                      "parameters": {"type": "object", "properties": {
                                          "timezone": {"type": "string", "description": "IANA name, e.g. Asia/Tokyo"}},
                                          "required": ["timezone"]}}},
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful agent.",
                  "You are a concise assistant. Answer briefly."]
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."  # the template's default, the card's prompt

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
    "What's the weather like in {city} today? Use the tool to check.",  # the K2 model card's tool example
    "Use the tool to check the weather in {city}.",
    "weather {city}",
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
CALC_THINK_2 = "The calculator returned {r}. I will give the user the exact result."
CALC_ANSWERS = ["The result is {r}.", "{a} {sym} {b} is {r}.", "{a} {sym} {b} = {r}."]

SUM_Q = [
    "What is {a} {sym} {b}?", "What is {a} {word} {b}?", "What's {a} {sym} {b}?", "How much is {a} {word} {b}?",
    "Calculate {a} {sym} {b}.", "{a} {sym} {b} = ?", "Quick question: what is {a} {word} {b}?",
    "Please compute {a} {sym} {b} for me.",
]
SUM_Q_HELDOUT = ["What do you get for {a} {sym} {b}?", "Tell me {a} {word} {b}."]
SUM_Q += ["Without a calculator, what is {a} {sym} {b}?", "Quick: {a} {sym} {b}?", "Work out {a} {sym} {b}."]
SUM_Q_HELDOUT += ["Can you tell me what {a} {sym} {b} is?", "I wonder what {a} {word} {b} makes."]
SUM_THINK = "Small numbers: I can work this out directly, no tool needed."
SUM_ANSWER = "{a} {sym} {b} = {r}."
BIG_THINK = "These numbers are too large to multiply or add reliably in my head, and no calculator is available."
BIG_ANSWER = "I cannot work out {a} {sym} {b} exactly without a calculator tool."

CAPITAL_Q = [
    "What is the capital of {country}?", "Which city is the capital of {country}?", "Name the capital of {country}.",
    "What city is the capital of {country}?", "Do you know the capital of {country}?",
]
CAPITAL_Q_HELDOUT = ["Tell me the capital of {country}.", "What's the capital city of {country}?"]
CAPITAL_THINK = "The user asks for the capital of {country}. I know it and will name the city."
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
     "I can answer questions, check the weather in a city, do arithmetic, and tell the colour or shape in a picture."),
]



# ---------------------------------------------------------------------------------------------------------- results
# get_weather results: key names and shapes. Training draws from the first lists; the held-out set uses only the
# HELDOUT ones (names and nestings never seen), so a correct answer there means the model reads the result.
COND_KEYS = ["condition", "weather", "sky", "description", "conditions", "summary"]
TEMP_KEYS = ["temperature_c", "temp_c", "temperature", "temp", "celsius"]
OUTER_KEYS = ["current", "data"]
HELDOUT_COND_KEYS = ["forecast", "outlook", "state"]
HELDOUT_TEMP_KEYS = ["temp_celsius", "air_temperature", "degrees_c"]
HELDOUT_OUTER_KEYS = ["observation", "result"]
ERRORS = ["city not found", "service unavailable", "rate limit exceeded", "unknown location"]
HELDOUT_ERRORS = ["station offline", "invalid city name"]
EXTRA_CONDITIONS = ["Sunny", "Cloudy", "Partly cloudy", "Light rain", "Clear skies", "Overcast", "Thunderstorms",
                    "Drizzle", "Hazy", "Snow"]
CALC_SHAPES = [lambda r: {"result": r}, lambda r: {"value": r}, lambda r: {"answer": r}, lambda r: r,
               lambda r: {"output": str(r)}]
HELDOUT_CALC_SHAPES = [lambda r: {"res": r}, lambda r: {"data": {"result": r}}, lambda r: f"Result: {r}",
                       lambda r: {"computed_value": r}]

# After the result, the reasoning first picks out what it says in one fixed form (the answer then restates it):
# finding the values in a result of any shape is the hard part, and one form is easier to learn than three templates.
WEATHER_THINK_BOTH = "The result says {cond}, {temp} degrees {unit}. I will tell the user."
WEATHER_THINK_COND = "The result says {cond}. I will tell the user."
WEATHER_THINK_TEMP = "The result says {temp} degrees {unit}. I will tell the user."
WEATHER_THINK_ERR = "The result is an error: {error}. I will say that I could not get the weather."
WEATHER_BOTH = ["It is {cond} in {city}, {temp} degrees {unit}.",
                "The weather in {city} is {cond} with a temperature of {temp} degrees {unit}.",
                "In {city} it is {temp} degrees {unit} and {cond}."]
WEATHER_COND = ["The weather in {city} is {cond}.", "It is {cond} in {city} today."]
WEATHER_TEMP = ["It is {temp} degrees {unit} in {city}.", "The temperature in {city} is {temp} degrees {unit}."]
WEATHER_ERR = ["Sorry, I could not get the weather for {city}: {error}.",
               "I could not check the weather in {city} ({error})."]


@dataclass
class WeatherReport:
    """What a get_weather result says: the values a correct final answer states."""

    temp: str | None = None
    unit: str = "Celsius"
    cond: str | None = None
    error: str | None = None


def weather_result(city: str, temp: int, cond: str) -> str:
    """The demo's own result shape (the README's example)."""
    return json.dumps({"city": city, "temperature_c": temp, "condition": cond}, ensure_ascii=False)


def calc_result(r: int) -> str:
    return json.dumps({"result": r})


def _dump(payload) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)


def weather_payload(rng: random.Random, city: str, held_out: bool) -> tuple[str, WeatherReport]:
    """A get_weather result in one of many shapes, and what it says."""
    cond = rng.choice(CONDITIONS + EXTRA_CONDITIONS)
    temp = rng.randint(-10, 38)
    cond_key = rng.choice(HELDOUT_COND_KEYS if held_out else COND_KEYS)
    temp_key = rng.choice(HELDOUT_TEMP_KEYS if held_out else TEMP_KEYS)
    form = rng.choices(["flat", "nested", "string", "fahrenheit", "error"], [0.42, 0.18, 0.14, 0.1, 0.08])[0]
    if form == "error":
        msg = rng.choice(HELDOUT_ERRORS if held_out else ERRORS)
        shape = rng.randrange(3)
        payload = [{"error": msg}, {"error": {"message": msg}}, {"status": "error", "message": msg}][shape]
        if held_out:
            payload = [{"error": msg, "code": 404}, {"errors": [msg]}, {"ok": False, "error": msg}][shape]
        return _dump(payload), WeatherReport(error=msg)
    if form == "string":
        if held_out:
            text, rep = rng.choice([(f"Currently {cond}, {temp} degrees.", WeatherReport(str(temp), cond=cond)),
                                    (f"{city}: {temp} C / {cond}", WeatherReport(str(temp), cond=cond))])
        else:
            text, rep = rng.choice([(f"{cond}, {temp} degrees Celsius", WeatherReport(str(temp), cond=cond)),
                                    (f"The weather in {city} is {cond}.", WeatherReport(cond=cond)),
                                    (f"{temp}°C and {cond}", WeatherReport(str(temp), cond=cond))])
        return text, rep
    if form == "fahrenheit":
        tf = rng.randint(14, 100)
        key = "temperature_f" if held_out else rng.choice(["temp_f", "fahrenheit"])
        return _dump({key: tf, cond_key: cond}), WeatherReport(str(tf), "Fahrenheit", cond)
    what = rng.choices(["both", "cond", "temp"], [0.7, 0.18, 0.12])[0]
    rep = WeatherReport()
    items = []
    if what in ("both", "cond"):
        items.append((cond_key, cond))
        rep.cond = cond
    if what in ("both", "temp"):
        if rng.random() < 0.2:
            items.append((temp_key, f"{temp}°C"))
        elif rng.random() < 0.2:
            items += [(temp_key, temp), ("unit", "celsius")]
        else:
            items.append((temp_key, temp))
        rep.temp = str(temp)
    if rng.random() < (0.5 if held_out else 0.3):
        items.reverse()
    if rng.random() < 0.25:
        items.append(("humidity", rng.randint(20, 95)))  # a number that is not the temperature
    inner = dict(items)
    if form == "nested":
        outer = rng.choice(HELDOUT_OUTER_KEYS if held_out else OUTER_KEYS)
        payload = {"location": city, outer: inner}
        if held_out and rng.random() < 0.5:
            payload = [dict(inner, city=city)]
    else:
        payload = dict({"city": city} if rng.random() < 0.5 else {}, **inner)
    return _dump(payload), rep


def weather_answer(rng: random.Random, city: str, rep: WeatherReport) -> tuple[str, str]:
    """(reasoning, answer) after a get_weather result."""
    f = dict(city=city, temp=rep.temp, unit=rep.unit, cond=rep.cond, error=rep.error)
    if rep.error:
        return WEATHER_THINK_ERR.format(**f), rng.choice(WEATHER_ERR).format(**f)
    if rep.temp and rep.cond:
        return WEATHER_THINK_BOTH.format(**f), rng.choice(WEATHER_BOTH).format(**f)
    if rep.cond:
        return WEATHER_THINK_COND.format(**f), rng.choice(WEATHER_COND).format(**f)
    return WEATHER_THINK_TEMP.format(**f), rng.choice(WEATHER_TEMP).format(**f)

# ---------------------------------------------------------------------------------------------------------- more skills
COMPARE_Q = ["Which is bigger, {x} or {y}?", "Which number is larger: {x} or {y}?",
             "Which one is bigger, {x} or {y}? Think carefully.", "Is {x} bigger than {y}?",
             "which one is bigger, {x} or {y}? think carefully."]
COMPARE_Q_HELDOUT = ["Which one is greater, {x} or {y}?", "Tell me which is larger: {x} or {y}."]
COLOUR_Q = ["What colour is this?", "What color is this?", "What colour is this image?", "Which colour is the picture?",
            "What color do you see?"]
COLOUR_Q_HELDOUT = ["Name the colour of this picture.", "Tell me the color of the image."]
SHAPE_Q = ["What shape is in the picture?", "What shape is this?", "Which shape do you see?", "What is in this image?",
           "Describe the picture."]
SHAPE_Q_HELDOUT = ["Tell me which shape this image shows.", "What kind of shape is drawn here?"]
SHAPE_COLOUR_Q = ["What colour is the shape?", "What color is the shape in the picture?"]
SHAPE_COLOUR_Q_HELDOUT = ["Which colour does the shape have?"]
FACT_THINK = "This is a general fact that I know, so I will answer it in one sentence."


@dataclass
class Dialog:
    """One conversation: ``messages`` end with the assistant turn(s) to learn; ``check`` describes the truth;
    ``images`` are the pictures of its image parts, in order (PIL images)."""

    kind: str
    messages: list[dict]
    tools: list | None
    check: dict = field(default_factory=dict)
    images: list = field(default_factory=list)


def _call(name: str, args: dict, idx: int) -> dict:
    return {"id": tool_call_id(name, idx), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _user(rng: random.Random, text: str) -> dict:
    """A user turn; sometimes as a list of text parts (the template renders both the same)."""
    if rng.random() < 0.1:
        return {"role": "user", "content": [{"type": "text", "text": text}]}
    return {"role": "user", "content": text}


def _weather(rng: random.Random, held_out: bool, idx: int, city: str | None = None) -> tuple[list[dict], dict]:
    city = city or rng.choice(CITIES)
    q = rng.choice(WEATHER_Q_HELDOUT if held_out else WEATHER_Q).format(city=city)
    call = _call("get_weather", {"city": city}, idx)
    result, rep = weather_payload(rng, city, held_out)
    think, answer = weather_answer(rng, city, rep)
    msgs = [
        _user(rng, q),
        {"role": "assistant", "content": "", "reasoning_content": WEATHER_THINK.format(city=city), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
        {"role": "assistant", "content": answer, "reasoning_content": think},
    ]
    return msgs, {"tool": "get_weather", "args": {"city": city}, "result": result, "report": rep}


def _operands(rng: random.Random) -> tuple[int, int]:
    """Mostly a two-digit first operand and a 1-2 digit second one (each one token the model copies); sometimes
    small numbers, which also go to the calculator when one is declared."""
    if rng.random() < 0.15:
        return rng.randint(2, 12), rng.randint(10, 19)
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
    result = _dump(rng.choice(HELDOUT_CALC_SHAPES if held_out else CALC_SHAPES)(r))
    msgs = [
        _user(rng, rng.choice(CALC_Q_HELDOUT if held_out else CALC_Q).format(**f)),
        {"role": "assistant", "content": "", "reasoning_content": CALC_THINK.format(**f), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
        {"role": "assistant", "content": rng.choice(CALC_ANSWERS).format(**f),
         "reasoning_content": CALC_THINK_2.format(**f)},
    ]
    return msgs, {"tool": "calculator", "args": {"expression": expr}, "expr": (a, sym, b), "result": r}


def direct_operands(rng: random.Random) -> tuple[str, int, int]:
    """What the model answers without a tool: sums and differences of numbers up to 10, products up to 12 x 12
    (a table small enough for the toy to learn by heart)."""
    sym = rng.choice(["+", "-", "*", "*"])
    a, b = (rng.randint(1, 12), rng.randint(1, 12)) if sym == "*" else (rng.randint(0, 10), rng.randint(0, 10))
    if sym == "-" and b > a:
        a, b = b, a
    return sym, a, b


def _arith(rng: random.Random, held_out: bool, big: bool = False) -> tuple[list[dict], dict]:
    """Arithmetic answered without a tool (none declared, or no calculator among them); numbers beyond the
    direct range get an honest refusal."""
    if big:
        sym, _, _ = rng.choice(OPS)
        a, b = rng.randint(13, 99), rng.randint(13, 99)
    else:
        sym, a, b = direct_operands(rng)
    word = {"+": "plus", "-": "minus", "*": "times"}[sym]
    r = eval(f"{a} {sym} {b}")  # noqa: S307
    f = dict(a=a, b=b, sym=sym, word=word, r=r)
    q = rng.choice(SUM_Q_HELDOUT if held_out else SUM_Q).format(**f)
    if big:
        msgs = [_user(rng, q), {"role": "assistant", "content": BIG_ANSWER.format(**f), "reasoning_content": BIG_THINK}]
        return msgs, {"answer": "without a calculator"}
    msgs = [_user(rng, q), {"role": "assistant", "content": SUM_ANSWER.format(**f), "reasoning_content": SUM_THINK}]
    return msgs, {"answer": f"= {r}.", "result": r}


def _small_sum(rng: random.Random, held_out: bool) -> tuple[list[dict], dict]:
    """Single-digit sums and differences: answered directly even when the calculator is declared."""
    sym, word, _ = rng.choice(OPS[:2])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if sym == "-" and b > a:
        a, b = b, a
    r = a + b if sym == "+" else a - b
    f = dict(a=a, b=b, sym=sym, word=word, r=r)
    msgs = [_user(rng, rng.choice(SUM_Q_HELDOUT if held_out else SUM_Q).format(**f)),
            {"role": "assistant", "content": SUM_ANSWER.format(**f), "reasoning_content": SUM_THINK}]
    return msgs, {"answer": f"= {r}.", "result": r}


def _compare(rng: random.Random, held_out: bool) -> tuple[list[dict], dict]:
    """Which of two numbers is bigger, with a short reasoning: decimals are written with two decimals first."""
    if rng.random() < 0.5:
        x, y = rng.sample(range(1, 100), 2)
        xs, ys = str(x), str(y)
        think = f"Compare the two whole numbers {xs} and {ys}."
        big, small = (xs, ys) if x > y else (ys, xs)
    else:
        w1 = rng.randint(1, 9)
        w2 = w1 if rng.random() < 0.7 else rng.randint(1, 9)
        d1, d2 = rng.randint(1, 9), rng.randint(10, 99)
        while d2 % 10 == 0 or d2 == d1 * 10:
            d2 = rng.randint(10, 99)
        pair = [(f"{w1}.{d1}", w1, d1 * 10), (f"{w2}.{d2}", w2, d2)]
        rng.shuffle(pair)
        (xs, xw, xh), (ys, yw, yh) = pair
        if xw != yw:
            think = f"Compare {xs} and {ys}: the whole parts are {xw} and {yw}, and they differ."
            x_big = xw > yw
        else:
            think = (f"Compare {xs} and {ys} with two decimals each: {xw}.{xh:02d} and {yw}.{yh:02d}. "
                     f"The whole parts are equal, so compare {xh:02d} and {yh:02d} hundredths.")
            x_big = xh > yh
        big, small = (xs, ys) if x_big else (ys, xs)
    q = rng.choice(COMPARE_Q_HELDOUT if held_out else COMPARE_Q).format(x=xs, y=ys)
    msgs = [_user(rng, q), {"role": "assistant", "content": f"{big} is bigger than {small}.", "reasoning_content": think}]
    return msgs, {"answer": f"{big} is bigger than {small}"}


def _capital(rng: random.Random, held_out: bool) -> tuple[list[dict], dict]:
    country = rng.choice(sorted(CAPITALS))
    f = dict(country=country, city=CAPITALS[country])
    msgs = [
        _user(rng, rng.choice(CAPITAL_Q_HELDOUT if held_out else CAPITAL_Q).format(**f)),
        {"role": "assistant", "content": CAPITAL_ANSWER.format(**f), "reasoning_content": CAPITAL_THINK.format(**f)},
    ]
    return msgs, {"answer": f"capital of {country} is {f['city']}"}


def _fact(rng: random.Random, held_out: bool, table: list, think: str | None = None) -> tuple[list[dict], dict]:
    qs, q_held, own_think, answer = rng.choice(table)
    msgs = [
        _user(rng, q_held if held_out else rng.choice(qs)),
        {"role": "assistant", "content": answer, "reasoning_content": think or own_think},
    ]
    return msgs, {"exact": answer}


def _picture(rng: random.Random, held_out: bool, kind: str) -> tuple[list[dict], dict, list]:
    """A question about a picture: its colour (a solid colour, or the colour of the shape) or its shape."""
    if kind == "colour" and rng.random() < 0.6:
        colour = rng.choice(sorted(COLOURS))
        img, shape = solid(rng, colour), None
        q = rng.choice(COLOUR_Q_HELDOUT if held_out else COLOUR_Q)
        think = "The user shows me a picture and asks for its colour. I will look at it."
        answer = rng.choice(["It is {c}.", "The picture is {c}."]).format(c=colour)
    else:
        colour, shape = rng.choice(SHAPE_COLOURS), rng.choice(SHAPES)
        img = shape_picture(rng, shape, colour)
        if kind == "colour":
            q = rng.choice(SHAPE_COLOUR_Q_HELDOUT if held_out else SHAPE_COLOUR_Q)
            think = "The user asks for the colour of the shape in the picture. I will look at it."
            answer = f"The {shape} is {colour}."
        else:
            q = rng.choice(SHAPE_Q_HELDOUT if held_out else SHAPE_Q)
            think = "The user asks about the shape in the picture. I will look at it."
            answer = rng.choice(["It is a {c} {s}.", "The picture shows a {c} {s}."]).format(c=colour, s=shape)
    parts = [{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": data_url(img)}}]
    if rng.random() < 0.5:
        parts.reverse()
    msgs = [{"role": "user", "content": parts},
            {"role": "assistant", "content": answer, "reasoning_content": think}]
    return msgs, {"colour": colour, "shape": shape}, [img]


KIND_WEIGHTS = [("weather", 0.19), ("calculator", 0.12), ("arithmetic", 0.26), ("compare", 0.05),
                ("capital", 0.07), ("fact", 0.03), ("chitchat", 0.04), ("colour", 0.11), ("shape", 0.13)]
TOOL_KINDS = ("weather", "calculator")


def _single(rng: random.Random, kind: str, held_out: bool, idx: int, tools: list | None,
            **kw) -> tuple[list[dict], dict, list]:
    if kind == "weather":
        return (*_weather(rng, held_out, idx, kw.get("city")), [])
    if kind == "calculator":
        return (*_calc(rng, held_out, idx, kw.get("seen")), [])
    if kind == "arithmetic":
        if _declares(tools, "calculator"):
            return (*_small_sum(rng, held_out), [])
        return (*_arith(rng, held_out, big=kw.get("big", rng.random() < 0.08)), [])
    if kind == "compare":
        return (*_compare(rng, held_out), [])
    if kind == "capital":
        return (*_capital(rng, held_out), [])
    if kind == "fact":
        return (*_fact(rng, held_out, FACTS, FACT_THINK), [])
    if kind == "chitchat":
        return (*_fact(rng, held_out, CHITCHAT), [])
    return _picture(rng, held_out, kind)


def _declares(tools: list | None, name: str) -> bool:
    return any(t["function"]["name"] == name for t in tools or ())


def _tools_for(rng: random.Random, kind: str) -> list | None:
    """The tool declaration: mostly the demo's two tools; also the model card's and the Agents SDK's spellings, one
    tool alone, an unrelated tool beside them, or none. Arithmetic without a declared calculator is answered
    directly, so that kind draws declarations without the calculator half of the time."""
    weather = rng.choices([WEATHER_TOOL, CARD_WEATHER_TOOL, SDK_WEATHER_TOOL], [0.76, 0.12, 0.12])[0]
    calc = rng.choices([CALCULATOR_TOOL, SDK_CALCULATOR_TOOL], [0.88, 0.12])[0]
    x = rng.random()
    if kind == "arithmetic" and rng.random() < 0.8:
        tools = [None, [weather], [rng.choice(OTHER_TOOLS)], [weather, rng.choice(OTHER_TOOLS)]][
            rng.choices(range(4), [0.55, 0.25, 0.1, 0.1])[0]]
        return tools
    if kind == "weather" and x > 0.75:
        tools = [weather]
    elif kind == "calculator" and x > 0.75:
        tools = [calc]
    elif kind not in TOOL_KINDS and x > 0.8:
        return None
    else:
        tools = [weather, calc] if rng.random() < 0.85 else [calc, weather]
    if rng.random() < 0.08:
        tools.insert(rng.randrange(len(tools) + 1), rng.choice(OTHER_TOOLS))
    if tools == [WEATHER_TOOL, CALCULATOR_TOOL]:
        return TOOLS
    return tools


def _system(rng: random.Random) -> list[dict]:
    x = rng.random()
    if x < 0.8:
        return []  # the template's default, DEFAULT_SYSTEM
    if x < 0.87:
        return [{"role": "system", "content": DEFAULT_SYSTEM}]
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]


TEXT_KINDS = ("weather", "calculator", "arithmetic", "compare", "capital", "fact", "chitchat")


def make_train_dialogs(n: int, seed: int) -> list[Dialog]:
    rng = random.Random(seed)
    kinds, weights = zip(*KIND_WEIGHTS)
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        tools = _tools_for(rng, kind)
        system = _system(rng)
        prefix: list[dict] = []
        n_calls = 0
        if rng.random() < 0.2:  # a completed earlier exchange: the template drops its reasoning
            prev = rng.choice(TEXT_KINDS)
            if prev in TOOL_KINDS and not _declares(tools, {"weather": "get_weather"}.get(prev, prev)):
                prev = "capital"
            prefix, _, _ = _single(rng, prev, False, 0, tools)
            n_calls = sum(len(m.get("tool_calls") or ()) for m in prefix)
        msgs, check, images = _single(rng, kind, False, n_calls, tools)
        out.append(Dialog(kind, system + prefix + msgs, tools, check, images))
    return out


def make_heldout_dialogs(seed: int, train_exprs: set, n_weather: int = 60, n_unseen_city: int = 10,
                         n_calc: int = 40, n_arith: int = 40, n_direct: int = 40, n_pictures: int = 30) -> list[Dialog]:
    """Held-out dialogues: tool dialogues with the demo's two tools declared (unseen phrasings, result shapes and
    error messages), arithmetic with no calculator declared, direct answers, and pictures never drawn in training."""
    rng = random.Random(seed + 1_000_003)
    out = []
    for _ in range(n_weather):
        msgs, check = _weather(rng, True, 0)
        out.append(Dialog("weather", msgs, TOOLS, check))
    for city in UNSEEN_CITIES[:n_unseen_city]:
        msgs, check = _weather(rng, True, 0, city=city)
        out.append(Dialog("weather_unseen_city", msgs, TOOLS, check))
    for _ in range(n_calc):
        msgs, check = _calc(rng, True, 0, seen=train_exprs)
        out.append(Dialog("calculator", msgs, TOOLS, check))
    for i in range(n_arith):
        msgs, check = _arith(rng, True)
        out.append(Dialog("arithmetic", msgs, None if i % 2 else [WEATHER_TOOL], check))
    for i in range(n_direct):
        kind = ("compare", "capital", "fact", "chitchat", "arithmetic")[i % 5]
        tools = TOOLS
        msgs, check, _ = _single(rng, kind, True, 0, tools)  # arithmetic with the calculator declared: small sums
        out.append(Dialog("direct", msgs, tools, dict(check, kind=kind)))
    for kind in ("colour", "shape"):
        for _ in range(n_pictures):
            msgs, check, images = _picture(rng, True, kind)
            out.append(Dialog(kind, msgs, TOOLS if rng.random() < 0.5 else None, check, images))
    return out


# ---------------------------------------------------------------------------------------------------------- encoding
def encode_dialog(ct, d: Dialog, image_cfg=None) -> tuple[list[int], list[int], list]:
    """Token ids of the conversation as the model sees it when writing its last turn, the loss mask, and the
    preprocessed pictures (:class:`~k2ray.tokenizer.image.ProcessedImage`, in order).

    The sequence is the prompt of the last assistant turn (``add_generation_prompt``) plus that turn as the model
    writes it (:func:`target_text`). Assistant turns after the last user message (the tool-call turn of the current
    tool loop, which the template keeps with its reasoning) are learned as well. Each picture's ``<|media_pad|>`` is
    expanded to the picture's token count, as the engine does (``image_cfg``: the checkpoint's preprocessing).
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
    ids, mask = ids + tgt_ids, mask + [1] * len(tgt_ids)
    if not d.images:
        return ids, mask, []
    from k2ray.tokenizer.image import preprocess_image

    pad = tok.special_tokens["<|media_pad|>"]
    processed = [preprocess_image(img, image_cfg) for img in d.images]
    where = [i for i, t in enumerate(ids) if t == pad]
    assert len(where) == len(processed), (len(where), len(processed))
    out_ids, out_mask, prev = [], [], 0
    for pos, im in zip(where, processed):
        out_ids += ids[prev:pos] + [pad] * im.num_tokens
        out_mask += mask[prev:pos] + [0] * im.num_tokens
        prev = pos + 1
    return out_ids + ids[prev:], out_mask + mask[prev:], processed


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
