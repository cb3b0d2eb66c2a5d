#!/usr/bin/env python3
"""Tool-call templating fixtures: five conversations with tools, written in the three shapes
burnish reads (OpenAI `tool_calls`/`tool`, Bedrock Converse `toolUse`/`toolResult` with
`toolConfig`, ShareGPT `function_call`/`observation` as LLaMA-Factory writes them), and what
transformers renders for each row.

For every row, this script reads the row into transformers' message format with its own
reader (below, independent of burnish's Rust readers), renders it with
`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)` through burnish's
tools-aware ChatML template (models/templates/chatml.jinja) and the bundled tokenizer
(assets/tokenizers/phi3_vision), and records:
- `text`: the rendering, byte for byte;
- `prompt_text`: the rendering of the messages before the last assistant turn with
  `add_generation_prompt=True`;
- `ids`: the rendering's token ids (`add_special_tokens=False`, as apply_chat_template);
- `trained`: per token, whether it lies inside an assistant turn: the characters from the end
  of `render(messages[:k], add_generation_prompt=True)` to the end of
  `render(messages[:k+1])` for each assistant message k (to the end of the text for the last
  one), mapped to tokens through the tokenizer's offsets (a token across a boundary fails).

The conversations cover: a system prompt, a call then its result then an answer, parallel
calls answered in order, text and a call in one turn, two rounds of calls, a conversation
that ends with a call (the model learns to make it), non-ASCII and nested/float arguments,
and a Bedrock `json` tool result (read as compact JSON text).

Writes datasets/tests/fixtures/tool_calls/{openai,bedrock,sharegpt}.jsonl and expected.json.
Needs only `transformers` (and `jinja2`), no torch:
    python -m pip install transformers jinja2
    python scripts/parity/tool_chat_templates.py
"""

import copy
import json
import pathlib

import transformers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "datasets/tests/fixtures/tool_calls"
TEMPLATE = ROOT / "models/templates/chatml.jinja"
TOKENIZER = ROOT / "assets/tokenizers/phi3_vision"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CURRENCY = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string"},
                "to": {"type": "string"},
            },
            "required": ["amount", "from", "to"],
        },
    },
}
FLIGHTS = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Find flights between two airports",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string"},
                "destination": {"type": "string"},
                "date": {"type": "string", "format": "date"},
                "passengers": {"type": "integer"},
                "options": {"type": "object"},
            },
            "required": ["origin", "destination", "date"],
        },
    },
}


def call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# The conversations in OpenAI's fine-tuning shape (arguments as JSON strings).
CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "You are a travel assistant."},
            {"role": "user", "content": "What's the weather in Zürich?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call("c1", "get_weather", {"city": "Zürich", "unit": "celsius"})]},
            {"role": "tool", "tool_call_id": "c1", "content": "3.5 °C, snow ❄"},
            {"role": "assistant", "content": "It is 3.5 °C and snowing in Zürich."},
        ],
        "tools": [WEATHER],
    },
    {
        "messages": [
            {"role": "user", "content": "Convert 12.5 EUR to USD, and how warm is Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                call("a", "convert_currency", {"amount": 12.5, "from": "EUR", "to": "USD"}),
                call("b", "get_weather", {"city": "Oslo"}),
            ]},
            {"role": "tool", "tool_call_id": "a", "content": "13.61"},
            {"role": "tool", "tool_call_id": "b", "content": "-2 °C, clear"},
            {"role": "assistant", "content": "12.5 EUR is 13.61 USD; Oslo is at -2 °C under a clear sky."},
        ],
        "tools": [CURRENCY, WEATHER],
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Is it raining in Lima?"},
            {"role": "assistant", "content": "Let me check.",
             "tool_calls": [call("w1", "get_weather", {"city": "Lima"})]},
            {"role": "tool", "tool_call_id": "w1", "content": "19 °C, dry"},
            {"role": "assistant", "content": "No, it is dry (19 °C)."},
            {"role": "user", "content": "And in Quito, in fahrenheit?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call("w2", "get_weather", {"city": "Quito", "unit": "fahrenheit"})]},
            {"role": "tool", "tool_call_id": "w2", "content": "57 °F, light rain"},
            {"role": "assistant", "content": "Yes, light rain at 57 °F."},
        ],
        "tools": [WEATHER],
    },
    {
        "messages": [
            {"role": "user", "content": "Book me something from LHR to JFK on Christmas Eve for two."},
            {"role": "assistant", "content": None, "tool_calls": [call("f1", "search_flights", {
                "origin": "LHR", "destination": "JFK", "date": "2026-12-24", "passengers": 2,
                "options": {"direct": True, "cabins": ["economy", "premium"], "max_price": 1250.75,
                            "tolerance": 2.5e-06,
                            "note": "aisle \"seat\"\nplease"},
            })]},
        ],
        "tools": [WEATHER, FLIGHTS],
    },
    {
        "messages": [
            {"role": "system", "content": "Use tools when they help."},
            {"role": "user", "content": "How much is 100 JPY in EUR?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call("x9", "convert_currency", {"amount": 100, "from": "JPY", "to": "EUR"})]},
            {"role": "tool", "tool_call_id": "x9", "content": "{\"result\":0.61,\"rate_date\":\"2026-12-01\"}"},
            {"role": "assistant", "content": "100 JPY is about 0.61 EUR."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": [CURRENCY],
    },
]


# ---- writers: the OpenAI rows in the other two shapes ----

def to_bedrock(conv, json_results=False):
    msgs, system, pending = [], None, []
    for m in conv["messages"]:
        if m["role"] == "system":
            system = [{"text": m["content"]}]
        elif m["role"] == "tool":
            content = [{"text": m["content"]}]
            if json_results and m["content"].startswith("{"):
                content = [{"json": json.loads(m["content"])}]
            pending.append({"toolResult": {"toolUseId": m["tool_call_id"], "content": content}})
        elif m["role"] == "user":
            msgs.append({"role": "user", "content": pending + [{"text": m["content"]}]})
            pending = []
        else:
            if pending:
                msgs.append({"role": "user", "content": pending})
                pending = []
            blocks = [{"text": m["content"]}] if m.get("content") else []
            for c in m.get("tool_calls", []):
                blocks.append({"toolUse": {"toolUseId": c["id"], "name": c["function"]["name"],
                                           "input": json.loads(c["function"]["arguments"])}})
            msgs.append({"role": "assistant", "content": blocks})
    row = {"schemaVersion": "bedrock-conversation-2024"}
    if system:
        row["system"] = system
    row["messages"] = msgs
    row["toolConfig"] = {"tools": [
        {"toolSpec": {"name": t["function"]["name"], "description": t["function"]["description"],
                      "inputSchema": {"json": t["function"]["parameters"]}}}
        for t in conv["tools"]
    ]}
    return row


def to_sharegpt(conv):
    turns = []
    for m in conv["messages"]:
        if m["role"] == "system":
            turns.append({"from": "system", "value": m["content"]})
        elif m["role"] == "user":
            turns.append({"from": "human", "value": m["content"]})
        elif m["role"] == "tool":
            turns.append({"from": "observation", "value": m["content"]})
        else:
            if m.get("content"):
                turns.append({"from": "gpt", "value": m["content"]})
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                     for c in m.get("tool_calls", [])]
            if calls:
                value = calls[0] if len(calls) == 1 else calls
                turns.append({"from": "function_call", "value": json.dumps(value, ensure_ascii=False)})
    return {"conversations": turns,
            "tools": json.dumps([t["function"] for t in conv["tools"]], ensure_ascii=False)}


# ---- readers: each shape into transformers' messages and tools ----

def hf_call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def read_openai(row):
    msgs = copy.deepcopy(row["messages"])
    for m in msgs:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return msgs, row.get("tools")


def read_bedrock(row):
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": "\n".join(p["text"] for p in row["system"])})
    for m in row["messages"]:
        texts, calls = [], []
        for block in m["content"]:
            if "text" in block:
                texts.append(block["text"])
            elif "toolUse" in block:
                use = block["toolUse"]
                calls.append(hf_call(use["name"], use["input"]))
            else:
                result = block["toolResult"]
                parts = [p["text"] if "text" in p else json.dumps(p["json"], separators=(",", ":"), ensure_ascii=False)
                         for p in result["content"]]
                msgs.append({"role": "tool", "content": "\n".join(parts)})
        if texts or calls:
            msg = {"role": m["role"], "content": "\n".join(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            msgs.append(msg)
    tools = [{"type": "function", "function": {"name": s["toolSpec"]["name"],
                                               "description": s["toolSpec"]["description"],
                                               "parameters": s["toolSpec"]["inputSchema"]["json"]}}
             for s in row["toolConfig"]["tools"]]
    return msgs, tools


def read_sharegpt(row):
    roles = {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool"}
    msgs = []
    for t in row["conversations"]:
        if t["from"] == "function_call":
            value = json.loads(t["value"])
            calls = [hf_call(c["name"], c["arguments"]) for c in (value if isinstance(value, list) else [value])]
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" not in msgs[-1]:
                msgs[-1]["tool_calls"] = calls
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            msgs.append({"role": roles[t["from"]], "content": t["value"]})
    tools = [{"type": "function", "function": f} for f in json.loads(row["tools"])]
    return msgs, tools


def expected(tok, msgs, tools):
    def render(ms, gen=False):
        return tok.apply_chat_template(ms, tools=tools, tokenize=False, add_generation_prompt=gen)

    text = render(msgs)
    spans = []
    assistant = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    for k in assistant:
        start = len(render(msgs[:k], gen=True))
        assert text.startswith(render(msgs[:k], gen=True)), k
        if k + 1 == len(msgs):
            end = len(text)
        else:
            through = render(msgs[: k + 1])
            assert text.startswith(through), k
            end = len(through)
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = []
    for a, b in enc["offset_mapping"]:
        inside = any(s <= a and b <= e for s, e in spans)
        across = any(a < s < b or a < e < b for s, e in spans)
        assert not across, f"token {(a, b)} crosses an assistant span boundary {spans}"
        trained.append(int(inside))
    last = assistant[-1]
    return {"text": text, "prompt_text": render(msgs[:last], gen=True),
            "ids": enc["input_ids"], "trained": trained}


def main():
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.chat_template = TEMPLATE.read_text()
    shapes = {
        "openai": ([copy.deepcopy(c) for c in CONVERSATIONS], read_openai),
        "bedrock": ([to_bedrock(c, json_results=(i == 4)) for i, c in enumerate(CONVERSATIONS)], read_bedrock),
        "sharegpt": ([to_sharegpt(c) for c in CONVERSATIONS], read_sharegpt),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    out = {"transformers": transformers.__version__,
           "template": str(TEMPLATE.relative_to(ROOT)),
           "tokenizer": str(TOKENIZER.relative_to(ROOT)), "rows": {}}
    for shape, (rows, read) in shapes.items():
        with open(OUT / f"{shape}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        out["rows"][shape] = [expected(tok, *read(row)) for row in rows]
    # The same conversation renders the same in every shape (ids aside, which the template
    # does not print).
    for i in range(len(CONVERSATIONS)):
        texts = {shape: out["rows"][shape][i]["text"] for shape in shapes}
        assert len(set(texts.values())) == 1, (i, texts)
    (OUT / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {sum(len(r) for r in out['rows'].values())} rows")


if __name__ == "__main__":
    main()
