#!/usr/bin/env python3
"""Writes the malformed-input corpus under tests/corpus/ and its table, cases.json.

Run from anywhere: python3 tests/corpus/make_corpus.py. Standard library only. The files are
committed; tests/cli_corpus.rs runs every case of cases.json against the burnish binary and
checks its exit code, its message (file, line, field) and the output files afterwards.

A case: {"name", "args" (with {corpus} and {tmp} placeholders), "exit" (0 or 1),
"stderr" (a regex that must match), "files" ({path: "absent" | "present" | "unchanged"})}.
"unchanged" compares the file after the run with the same file before it (for commands that
write over their input). Every case also fails on a panic or an internal error.
"""
import gzip
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
DATA, MODELS, RECIPES = (os.path.join(HERE, d) for d in ("data", "models", "recipes"))
CASES = []


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def case(name, args, exit, stderr, files=None):
    CASES.append({"name": name, "args": args, "exit": exit, "stderr": stderr, "files": files or {}})


ALPACA = {"instruction": "Add 2 and 3.", "output": "5"}
ALPACA2 = {"instruction": "Name a colour.", "output": "Blue"}
PAIR = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}


def data_files():
    d = lambda n: os.path.join(DATA, n)
    write(d("empty.jsonl"), "")
    write(d("blank_lines.jsonl"), "\n   \n\t\n")
    write(d("not_gzip.jsonl.gz"), lines(ALPACA))
    write(d("garbage_gzip.jsonl.gz"), b"\x1f\x8b\x08\x00garbage that is not deflate", "wb")
    full = gzip.compress(lines(*[ALPACA] * 200).encode())
    write(d("truncated_gzip.jsonl.gz"), full[: len(full) // 2], "wb")
    write(d("utf16le_bom.jsonl"), lines(ALPACA).encode("utf-16"), "wb")
    write(d("utf16be_bom.jsonl"), b"\xfe\xff" + lines(ALPACA).encode("utf-16-be"), "wb")
    write(d("utf16le_nobom.jsonl"), lines(ALPACA).encode("utf-16-le"), "wb")
    write(d("cr_endings.jsonl"), lines(ALPACA, ALPACA2).replace("\n", "\r"))
    write(d("crlf_endings.jsonl"), lines(ALPACA, ALPACA2).replace("\n", "\r\n"))
    write(d("utf8_bom.jsonl"), b"\xef\xbb\xbf" + lines(ALPACA, ALPACA2).encode(), "wb")
    write(d("duplicate_key.jsonl"), lines(ALPACA, '{"instruction": "a", "output": "b", "output": "c"}'))
    write(d("duplicate_key_nested.jsonl"), lines(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        '{"messages": [{"role": "user", "content": "hi", "content": "ho"}, {"role": "assistant", "content": "yo"}]}'))
    write(d("chosen_equals_rejected.jsonl"), lines(PAIR, {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Hi!"}))
    write(d("invalid_utf8.jsonl"), lines(ALPACA).encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n', "wb")
    write(d("bad_json.jsonl"), lines(ALPACA, '{"instruction": "a", "output": }'))
    write(d("trailing_garbage.jsonl"), lines(ALPACA, '{"instruction": "a", "output": "b"} extra'))
    write(d("scalar_rows.jsonl"), lines(ALPACA, "5", '"a string"', "null", "[1, 2]"))
    write(d("wrong_type.jsonl"), lines(ALPACA, {"instruction": 5, "output": "x"}))
    write(d("missing_field.jsonl"), lines(ALPACA, {"instruction": "only"}))
    write(d("empty_strings.jsonl"), lines(ALPACA, {"instruction": "", "output": ""}))
    write(d("huge_line.jsonl"), lines(ALPACA, {"instruction": "x " * 100000, "output": "y"}))
    write(d("deep_nesting.jsonl"), lines(ALPACA, '{"instruction": ' + "[" * 300 + "]" * 300 + ', "output": "x"}'))
    write(d("number_overflow.jsonl"), lines(ALPACA, '{"instruction": "a", "output": "b", "margin": 1e400}'))
    write(d("lone_surrogate.jsonl"), lines(ALPACA, '{"instruction": "\\ud800", "output": "b"}'))
    write(d("control_char.jsonl"), lines(ALPACA, '{"instruction": "tab\there", "output": "b"}'))
    write(d("array_broken.json"), "[" + json.dumps(ALPACA) + ", ")
    write(d("array_ok.json"), json.dumps([ALPACA, ALPACA2], indent=2))
    write(d("single_object.json"), json.dumps(ALPACA, indent=2))
    write(d("unknown_format.jsonl"), lines({"foo": 1}, {"bar": 2}))
    write(d("mixed_formats.jsonl"), lines(ALPACA, ALPACA2, PAIR))
    write(d("sharegpt_bad_role.jsonl"), lines(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]}))
    write(d("openai_user_last.jsonl"), lines(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]}))
    write(d("preference_missing_rejected.jsonl"), lines(PAIR, {"prompt": "p", "chosen": "c"}))
    write(d("preferences.jsonl"), lines(PAIR, {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Hi."}))
    write(d("hh_rlhf_no_assistant.jsonl"), lines(
        {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        {"chosen": "just text", "rejected": "other text"}))
    write(d("gsm8k.jsonl"), lines(
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 4 * 2?", "answer": "4 * 2 = 8\n#### 8"}))
    write(d("bedrock_bad_content.jsonl"), lines(
        {"schemaVersion": "bedrock-conversation-2024", "messages": [
            {"role": "user", "content": [{"text": "hi"}]}, {"role": "assistant", "content": [{"text": "yo"}]}]},
        {"schemaVersion": "bedrock-conversation-2024", "messages": [
            {"role": "user", "content": 5}, {"role": "assistant", "content": [{"text": "yo"}]}]}))
    write(d("parquet_random.parquet"), b"PAR1" + bytes(range(256)) * 4 + b"PAR1", "wb")
    write(d("nul_bytes.jsonl"), lines(ALPACA) + '{"instruction": "a\u0000b", "output": "c"}\n')
    write(d("dedup_rows.jsonl"), lines(ALPACA, ALPACA, ALPACA2, {"id": 1}, {"id": 2}, "7", "{broken"))
    write(d("good.jsonl"), lines(ALPACA, ALPACA2))
    write(d("score_rows.jsonl"), lines({"prompt": "a b", "completion": " c"}, {"prompt": "a", "completion": 7},
                                       {"prompt": "b c", "completion": " d e"}))

    c, t = "{corpus}/data/", "{tmp}/"
    inspect = lambda f: ["data", "inspect", c + f]
    # File-level problems: one clear error naming the file.
    for f, msg in [
        ("empty.jsonl", r"empty\.jsonl is empty"),
        ("blank_lines.jsonl", r"blank_lines\.jsonl is empty"),
        ("not_gzip.jsonl.gz", r"not_gzip\.jsonl\.gz is named \.gz but is not gzip"),
        ("garbage_gzip.jsonl.gz", r"garbage_gzip\.jsonl\.gz"),
        ("truncated_gzip.jsonl.gz", r"truncated_gzip\.jsonl\.gz"),
        ("utf16le_bom.jsonl", r"utf16le_bom\.jsonl is UTF-16 \(little-endian\)"),
        ("utf16be_bom.jsonl", r"utf16be_bom\.jsonl is UTF-16 \(big-endian\)"),
        ("utf16le_nobom.jsonl", r"utf16le_nobom\.jsonl is UTF-16 \(little-endian\)"),
        ("array_broken.json", r"array_broken\.json starts with `\[` but is not a valid JSON array"),
        ("unknown_format.jsonl", r"cannot detect the format of .*unknown_format\.jsonl"),
        ("parquet_random.parquet", r"parquet_random\.parquet as Parquet"),
    ]:
        case(f"inspect {f}", inspect(f), 1, msg)
    case("inspect empty with --format", inspect("empty.jsonl") + ["--format", "alpaca"], 1, r"is empty")
    case("inspect --max-seq-len 0", inspect("good.jsonl") + ["--max-seq-len", "0"], 1, r"--max-seq-len must be at least 1")
    # Row-level problems: the row is rejected with file:line (and field), the rest read.
    for f, msg in [
        ("duplicate_key.jsonl", r"duplicate_key\.jsonl:2: invalid JSON .*duplicate key `output`"),
        ("duplicate_key_nested.jsonl", r"duplicate_key_nested\.jsonl:2: .*duplicate key `content`"),
        ("chosen_equals_rejected.jsonl", r"chosen_equals_rejected\.jsonl:2: field `rejected`: is the same as `chosen`"),
        ("invalid_utf8.jsonl", r"invalid_utf8\.jsonl:2: invalid UTF-8"),
        ("bad_json.jsonl", r"bad_json\.jsonl:2: invalid JSON at column"),
        ("trailing_garbage.jsonl", r"trailing_garbage\.jsonl:2: invalid JSON at column"),
        ("wrong_type.jsonl", r"wrong_type\.jsonl:2: field `instruction`"),
        ("missing_field.jsonl", r"missing_field\.jsonl:2: field `output`: missing required field"),
        ("deep_nesting.jsonl", r"deep_nesting\.jsonl:2: invalid JSON .*recursion limit"),
        ("number_overflow.jsonl", r"number_overflow\.jsonl:2: invalid JSON .*out of range"),
        ("lone_surrogate.jsonl", r"lone_surrogate\.jsonl:2: invalid JSON"),
        ("control_char.jsonl", r"control_char\.jsonl:2: invalid JSON .*control character"),
        ("nul_bytes.jsonl", r"nul_bytes\.jsonl:2: invalid JSON .*control character"),
        ("sharegpt_bad_role.jsonl", r"sharegpt_bad_role\.jsonl:2: field `conversations\[0\]\.from`"),
        ("preference_missing_rejected.jsonl", r"preference_missing_rejected\.jsonl:2: field `rejected`: missing"),
        ("bedrock_bad_content.jsonl", r"bedrock_bad_content\.jsonl:2: field `messages\[0\]\.content`"),
        ("hh_rlhf_no_assistant.jsonl", r"hh_rlhf_no_assistant\.jsonl:2"),
        ("scalar_rows.jsonl", r"scalar_rows\.jsonl:2: .*object"),
        ("mixed_formats.jsonl", r"mixed_formats\.jsonl:3"),
    ]:
        case(f"inspect {f}", inspect(f), 0, msg)
    for f, msg in [
        ("cr_endings.jsonl", r"2 read, 0 rejected, 2 kept"),
        ("crlf_endings.jsonl", r"2 read, 0 rejected, 2 kept"),
        ("utf8_bom.jsonl", r"2 read, 0 rejected, 2 kept"),
        ("array_ok.json", r"2 read, 0 rejected, 2 kept"),
        ("single_object.json", r"1 read, 0 rejected, 1 kept"),
        ("huge_line.jsonl", r"2 read, 0 rejected, 2 kept"),
        ("empty_strings.jsonl", r"empty_strings\.jsonl:2"),
        ("openai_user_last.jsonl", r"openai_user_last\.jsonl:2"),
    ]:
        case(f"inspect {f}", inspect(f), 0, msg)
    # inspect prints the counts to stdout and rejects to stderr; the test matches both.

    # convert: whole output or none, rejects listed and filed, non-zero when nothing is left.
    out = t + "out.jsonl"
    convert = lambda f, to, *extra: ["data", "convert", c + f, "--to", to, "--out", out, *extra]
    case("convert preference pairs to alpaca", convert("preferences.jsonl", "alpaca"), 1,
         r"no row is left to write: 2 of 2 rows rejected", {out: "absent"})
    case("convert with a bad row under --on-error fail", convert("bad_json.jsonl", "openai", "--on-error", "fail"), 1,
         r"1 of 2 rows rejected and --on-error fail: nothing written \(first: .*bad_json\.jsonl:2", {out: "absent"})
    case("convert with a bad row", convert("bad_json.jsonl", "openai"), 0,
         r"converted 1 of 2 rows .* 1 rejected", {out: "present", t + "out.rejects.jsonl": "present"})
    case("convert gsm8k rows to openai", convert("gsm8k.jsonl", "openai"), 0,
         r"converted 2 of 2 rows from prompt-answer to openai", {out: "present", t + "out.rejects.jsonl": "absent"})
    case("convert an empty file", convert("empty.jsonl", "openai"), 1, r"is empty", {out: "absent"})
    case("convert a UTF-16 file", convert("utf16le_bom.jsonl", "openai"), 1, r"UTF-16", {out: "absent"})
    case("convert duplicate keys", convert("duplicate_key.jsonl", "sharegpt"), 0, r"duplicate key `output`",
         {out: "present", t + "out.rejects.jsonl": "present"})
    case("convert to an unknown target", convert("good.jsonl", "csv"), 1, r"unknown target format `csv`", {out: "absent"})
    case("convert --on-error maybe", convert("good.jsonl", "openai", "--on-error", "maybe"), 1,
         r"--on-error.*expected fail or skip", {out: "absent"})
    # Over its own input: the input survives a refused conversion.
    case("convert in place, refused", ["data", "convert", t + "pairs.jsonl", "--to", "alpaca", "--out", t + "pairs.jsonl"],
         1, r"no row is left", {t + "pairs.jsonl": "unchanged"})

    # dedup: bad rows reported and skipped, rows without text kept.
    dd = t + "dedup.jsonl"
    case("dedup with bad rows and rows without text", ["data", "dedup", c + "dedup_rows.jsonl", "--out", dd], 0,
         r"2 rows with no text to compare", {dd: "present", t + "dedup.rejects.jsonl": "present"})
    case("dedup under --on-error fail", ["data", "dedup", c + "dedup_rows.jsonl", "--out", dd, "--on-error", "fail"], 1,
         r"2 of 7 rows rejected and --on-error fail", {dd: "absent"})
    case("dedup an empty file", ["data", "dedup", c + "empty.jsonl", "--out", dd], 1, r"empty\.jsonl is empty", {dd: "absent"})
    case("dedup scalar rows only", ["data", "dedup", c + "scalar_rows.jsonl", "--out", dd], 0,
         r"a row must be a JSON object, found a number", {dd: "present"})
    case("dedup a missing file", ["data", "dedup", c + "no_such_file.jsonl", "--out", dd], 1,
         r"cannot open .*no_such_file\.jsonl", {dd: "absent"})


# A 64-token word-level tokenizer and a Llama of hidden size 8 (a few KB).
WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] + \
    [str(i) for i in range(10)] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
    "+ = ? . , ! ( ) - * / : ; ' < > # $ % & @".split(" ")
H, I, L, V, HEADS, KV, HD = 8, 16, 1, 64, 2, 1, 4


def tokenizer_files(d):
    vocab = {w: i for i, w in enumerate(WORDS)}
    added = [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, w in enumerate(WORDS[:4])]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    write(os.path.join(d, "tokenizer.json"), json.dumps(tok))
    write(os.path.join(d, "tokenizer_config.json"), json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"}))


def config():
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "hidden_act": "silu"}


def tensors():
    q, kv = HEADS * HD, KV * HD
    out = [("model.embed_tokens.weight", [V, H])]
    for l in range(L):
        p = f"model.layers.{l}"
        out += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.self_attn.q_proj.weight", [q, H]),
                (f"{p}.self_attn.k_proj.weight", [kv, H]), (f"{p}.self_attn.v_proj.weight", [kv, H]),
                (f"{p}.self_attn.o_proj.weight", [H, q]), (f"{p}.post_attention_layernorm.weight", [H]),
                (f"{p}.mlp.gate_proj.weight", [I, H]), (f"{p}.mlp.up_proj.weight", [I, H]),
                (f"{p}.mlp.down_proj.weight", [H, I])]
    return out + [("model.norm.weight", [H])]


def safetensors(ts, dtype="F32", lie=None):
    """`lie` maps a tensor name to the shape its header claims (bytes stay those of the truth)."""
    header, body, off = {}, b"", 0
    for i, (name, shape) in enumerate(ts):
        n = 1
        for s in shape:
            n *= s
        data = b"".join(struct.pack("<f", ((i * 31 + j * 17) % 13 - 6) / 50.0) for j in range(n))
        if dtype == "I32":
            data = b"".join(struct.pack("<i", j) for j in range(n))
        header[name] = {"dtype": dtype, "shape": (lie or {}).get(name, shape), "data_offsets": [off, off + len(data)]}
        body += data
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + body


def model(name, cfg=None, weights=None, tokenizer=True, extra=None):
    d = os.path.join(MODELS, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if cfg is not False:
        write(os.path.join(d, "config.json"), cfg if isinstance(cfg, str) else json.dumps(cfg or config()))
    if weights is not False:
        write(os.path.join(d, "model.safetensors"), weights if weights is not None else safetensors(tensors()), "wb")
    if tokenizer:
        tokenizer_files(d)
    for f, content in (extra or {}).items():
        write(os.path.join(d, f), content, "wb" if isinstance(content, bytes) else "w")
    return d


def recipe_text(model_dir, extra="", method="sft", data="{corpus}/data/good.jsonl", train=""):
    return f'''method = "{method}"
[model]
path = "{model_dir}"
[data]
files = ["{data}"]
max_seq_len = 64
eval_fraction = 0.0
cache_dir = "{{tmp}}/cache"
[train]
output_dir = "{{tmp}}/run"
max_steps = 1
per_device_train_batch_size = 2
{train}
{extra}
'''


def models_and_recipes():
    good = safetensors(tensors())
    model("good")
    model("missing_config", cfg=False)
    model("config_not_json", cfg="{ not json")
    model("config_wrong_type", cfg={**config(), "hidden_size": "eight"})
    model("config_unsupported_arch", cfg={**config(), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    model("config_heads_mismatch", cfg={**config(), "num_key_value_heads": 3})
    model("no_weights", weights=False)
    model("weights_random_bytes", weights=bytes(range(256)) * 8)
    model("weights_truncated", weights=good[: len(good) - 100])
    model("weights_header_lies", weights=safetensors(tensors(), lie={"model.layers.0.mlp.up_proj.weight": [I // 2, H]}))
    model("weights_shape_vs_config", cfg={**config(), "intermediate_size": 24})
    model("weights_missing_tensor", weights=safetensors(tensors()[:-1]))
    model("weights_int_dtype", weights=safetensors(tensors(), dtype="I32"))
    model("weights_empty_file", weights=b"")
    model("index_missing_shard", weights=False, extra={"model.safetensors.index.json": json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n, _ in tensors()}})})
    model("index_not_json", weights=False, extra={"model.safetensors.index.json": "{"})
    model("no_tokenizer", tokenizer=False)
    model("tokenizer_not_json", extra={"tokenizer.json": "{ nope"})
    model("tokenizer_too_big", cfg={**config(), "vocab_size": 16})

    m = "{corpus}/models/"
    run = "{tmp}/run"
    for name, msg in [
        ("missing_config", r"config\.json"),
        ("config_not_json", r"config\.json"),
        ("config_wrong_type", r"config\.json: field `hidden_size` has the wrong type"),
        ("config_unsupported_arch", r"unsupported model_type `gpt2`; supported: llama"),
        ("config_heads_mismatch", r"num_key_value_heads|heads"),
        ("no_weights", r"no weights in .*no_weights: expected model\.safetensors"),
        ("weights_random_bytes", r"weights_random_bytes/model\.safetensors is not a valid safetensors file"),
        ("weights_truncated", r"weights_truncated/model\.safetensors (is truncated|is not a valid safetensors)"),
        ("weights_header_lies", r"weights_header_lies/model\.safetensors"),
        ("weights_shape_vs_config", r"tensor `model\.layers\.0\.mlp\.\w+_proj\.weight` .* config\.json implies"),
        ("weights_missing_tensor", r"tensor `model\.norm\.weight` .*missing"),
        ("weights_int_dtype", r"dtype I32; expected F32, BF16 or F16"),
        ("weights_empty_file", r"weights_empty_file/model\.safetensors is not a valid safetensors file"),
        ("index_missing_shard", r"model-00001-of-00002\.safetensors"),
        ("index_not_json", r"model\.safetensors\.index\.json is not valid JSON"),
        ("no_tokenizer", r"tokenizer"),
        ("tokenizer_not_json", r"tokenizer"),
        ("tokenizer_too_big", r"vocab"),
    ]:
        path = os.path.join(RECIPES, f"model_{name}.toml")
        write(path, recipe_text(m + name))
        case(f"dry-run on model {name}", ["train", "--recipe", "{recipes}/" + f"model_{name}.toml", "--dry-run"], 1, msg)
        case(f"train on model {name}", ["train", "--recipe", "{recipes}/" + f"model_{name}.toml"], 1, msg, {run: "absent"})

    good_model = m + "good"
    bad_recipes = [
        ("not_toml", "method = \n[model", r"not_toml\.toml"),
        ("unknown_key", recipe_text(good_model, train="learning_rat = 0.1"), r"unknown field `learning_rat`.*learning_rate"),
        ("unknown_section", recipe_text(good_model, extra="[trainer]\nx = 1"), r"unknown field `trainer`"),
        ("wrong_type", recipe_text(good_model, train='learning_rate = "fast"'), r"learning_rate|invalid type"),
        ("negative_lr", recipe_text(good_model, train="learning_rate = -1.0"), r"learning_rate must be positive"),
        ("zero_batch", recipe_text(good_model).replace("per_device_train_batch_size = 2", "per_device_train_batch_size = 0"),
         r"batch sizes must be at least 1"),
        ("no_files", recipe_text(good_model).replace('files = ["{corpus}/data/good.jsonl"]', "files = []"), r"files is empty"),
        ("missing_data_file", recipe_text(good_model, data="{corpus}/data/absent.jsonl"), r"absent\.jsonl"),
        ("unknown_method", recipe_text(good_model, method="sft2"), r"unknown variant `sft2`"),
        ("bf16_dtype", recipe_text(good_model).replace("[data]", 'dtype = "bfloat16"\n[data]'), r"dtype `bfloat16`"),
        ("max_seq_len_one", recipe_text(good_model).replace("max_seq_len = 64", "max_seq_len = 1"), r"max_seq_len must be at least 2"),
        ("eval_fraction_two", recipe_text(good_model).replace("eval_fraction = 0.0", "eval_fraction = 2.0"), r"eval_fraction"),
        ("on_error_maybe", recipe_text(good_model).replace("[train]", 'on_error = "maybe"\n[train]'), r"on_error|unknown variant"),
        ("quantize_nf3", recipe_text(good_model).replace("[data]", 'quantize = "nf3"\n[data]'), r"nf3"),
        ("adapter_r_zero", recipe_text(good_model, extra='[adapter]\ntype = "lora"\nr = 0'), r"\br\b|rank"),
        ("pad_multiple_zero", recipe_text(good_model, train="pad_to_multiple_of = 0"), r"pad_to_multiple_of must be at least 1"),
        ("autotune_unknown", recipe_text(good_model, train='autotune_level = "fast"'), r"unknown variant `fast`"),
        ("warmup_ratio_one", recipe_text(good_model, train="warmup_ratio = 1.0"), r"warmup_ratio must be in"),
        ("dpo_on_sft_data", recipe_text(good_model, method="dpo"), r"preference|pairs"),
        ("grpo_no_rewards", recipe_text(good_model, method="grpo", data="{corpus}/data/gsm8k.jsonl"), r"reward"),
        ("sft_on_gsm8k", recipe_text(good_model, data="{corpus}/data/gsm8k.jsonl"), r""),
    ]
    for name, text, msg in bad_recipes:
        write(os.path.join(RECIPES, f"{name}.toml"), text)
        ok = name == "sft_on_gsm8k"
        case(f"dry-run recipe {name}", ["train", "--recipe", "{recipes}/" + f"{name}.toml", "--dry-run"],
             0 if ok else 1, r"2 train" if ok else msg)
    case("--set a bad value is blamed on --set", ["train", "--recipe", "{recipes}/model_good_run.toml", "--dry-run",
                                                  "--set", "train.learning_rate=-1"], 1,
         r"with --set train\.learning_rate=-1 \(recipe .* is valid without them\)")
    case("--set without a value", ["train", "--recipe", "{recipes}/model_good_run.toml", "--dry-run", "--set", "train"],
         1, r"--set `train`: expected section\.key=value")
    write(os.path.join(RECIPES, "model_good_run.toml"), recipe_text(good_model))
    scores = "{tmp}/scores.jsonl"
    score = ["score", "--model", good_model, "--data", "{corpus}/data/score_rows.jsonl", "--out", scores]
    case("score with a bad row", score, 0, r"score_rows\.jsonl:2: field `completion`",
         {scores: "present", "{tmp}/scores.rejects.jsonl": "present"})
    case("score under --on-error fail", score + ["--on-error", "fail"], 1,
         r"1 of 3 rows rejected and --on-error fail", {scores: "absent"})
    case("score a UTF-16 file", ["score", "--model", good_model, "--data", "{corpus}/data/utf16le_bom.jsonl", "--out", scores],
         1, r"UTF-16", {scores: "absent"})
    case("a good recipe dry-runs", ["train", "--recipe", "{recipes}/model_good_run.toml", "--dry-run"], 0, r"")


def main():
    for d in (DATA, MODELS, RECIPES):
        shutil.rmtree(d, ignore_errors=True)
    data_files()
    models_and_recipes()
    # The in-place conversion case starts from a copy of preferences.jsonl in {tmp}.
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump({"setup": {"{tmp}/pairs.jsonl": "{corpus}/data/preferences.jsonl"}, "cases": CASES}, f, indent=1)
    files = sum(len(fs) for _, _, fs in os.walk(HERE))
    print(f"{len(CASES)} cases, {files} files under {HERE}")


if __name__ == "__main__":
    main()
