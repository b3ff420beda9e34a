"""Synthetic tool-calling conversations (OpenAI messages + tools), deterministic by seed.

Each conversation offers four tools; the user asks something only one of them answers; the assistant calls it
with exact arguments (as a JSON string, as most agent logs store them), reads the tool result and answers; a
share of conversations go on for a second round. Used by ``bench/tool_calling_run.py`` (does a model learn to
call the right function?) and the conversation case of ``bench/bench_data.py``.

    python -m bench.tool_data --rows 300 --out data/tools.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Perth", "Rome", "Seoul", "Accra", "Hanoi"]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "INR", "BRL"]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "source": {"type": "string"},
                                                        "target": {"type": "string"}},
                       "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "find_flights", "description": "Flights between two cities",
        "parameters": {"type": "object", "properties": {"origin": {"type": "string"},
                                                        "destination": {"type": "string"}},
                       "required": ["origin", "destination"]}}},
]


def _weather(rng):
    city = rng.choice(CITIES)
    ask = rng.choice(["What is the weather in {c}?", "How warm is it in {c} right now?", "Weather for {c}, please.",
                      "Is it cold in {c} today?"]).format(c=city)
    temp = rng.randint(-5, 35)
    return ask, "get_weather", {"city": city}, f"{temp}C, {rng.choice(['sunny', 'cloudy', 'rain'])}", \
        f"It is {temp}C in {city}."


def _time(rng):
    city = rng.choice(CITIES)
    ask = rng.choice(["What time is it in {c}?", "Local time in {c}?", "Tell me the time in {c}."]).format(c=city)
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return ask, "get_time", {"city": city}, clock, f"It is {clock} in {city}."


def _currency(rng):
    amount = rng.choice([5, 10, 20, 50, 100, 250])
    source, target = rng.sample(CURRENCIES, 2)
    ask = rng.choice(["Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?", "{a} {s} in {t}, please."]).format(
        a=amount, s=source, t=target)
    value = round(amount * rng.uniform(0.5, 2.0), 2)
    return ask, "convert_currency", {"amount": amount, "source": source, "target": target}, f"{value} {target}", \
        f"{amount} {source} is {value} {target}."


def _flights(rng):
    origin, destination = rng.sample(CITIES, 2)
    ask = rng.choice(["Find flights from {o} to {d}.", "Any flights {o} to {d}?", "I need to fly from {o} to {d}."]
                     ).format(o=origin, d=destination)
    count = rng.randint(0, 6)
    return ask, "find_flights", {"origin": origin, "destination": destination}, f"{count} flights", \
        f"There are {count} flights from {origin} to {destination}."


KINDS = (_weather, _time, _currency, _flights)


def conversation(rng: random.Random, index: int) -> dict:
    """One conversation: one or two rounds of question -> tool call -> tool result -> answer."""
    messages = [{"role": "system", "content": "You are a travel assistant. Use the tools."}]
    for round_ in range(1 + (rng.random() < 0.3)):
        ask, name, arguments, result, answer = rng.choice(KINDS)(rng)
        call_id = f"call_{index}_{round_}"
        messages += [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages, "tools": TOOLS}


def conversations(rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng, k) for k in range(rows)]


def write(path: str, rows: int, seed: int = 0) -> str:
    with open(path, "w", encoding="utf-8") as out:
        for row in conversations(rows, seed):
            out.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write(args.out, args.rows, args.seed))
