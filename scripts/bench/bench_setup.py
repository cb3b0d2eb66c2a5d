"""Setup shared by both sides of the burnish-vs-TRL benchmark (run with the bench venv's python).

Writes, under DIR:
  tokenizer/          byte-level BPE, exactly 8000 ids, bos/eos/pad, ChatML template
  model/              LlamaForCausalLM (hidden 512, 8 layers, ~31.8M params), fp32, seed 0
  student/            LlamaForCausalLM (hidden 64, 2 layers, ~1.1M params), fp32, seed 1
  moe/                MixtralForCausalLM shaped like model/ with 8 experts of width 352, top-2
                      (a token's feed-forward costs half model/'s), load-balancing loss
                      coefficient 0.02 (on by default on both sides), fp32, seed 2
  data/sft.jsonl      OpenAI `messages` rows, each > 256 tokens once templated (so every
                      training row is exactly 256 tokens on both sides)
  data/dpo.jsonl      `prompt`/`chosen`/`rejected` message lists from hh-rlhf, every pair
                      fitting in 256 tokens (leading turns dropped), so neither side truncates
  data/gsm8k.jsonl    `question`/`answer` rows
  setup.json          what was built (sizes, token statistics)

    python bench_setup.py --dir DIR --rows N --pairs N --prompts N
"""

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "assets/data/quickstart/fastchat_dummy_conversation.json"
GSM8K = ROOT / "assets/data/gsm8k/gsm8k_test_first200.jsonl"
HH = ROOT / "assets/data/preference/hh_rlhf_harmless_base_test_first300.jsonl"

VOCAB = 8000
SEQ = 256
BOS, EOS, PAD, IM_START = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIALS = [BOS, IM_START, EOS, PAD]  # ids 0, 1, 2, 3
# The same text as burnish's built-in models/templates/chatml.jinja.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SETUP_VERSION = 3


def quickstart_conversations():
    rows = json.loads(QUICKSTART.read_text())
    role = {"human": "user", "gpt": "assistant"}
    out = []
    for r in rows:
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
        if msgs and msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant":
            out.append(msgs)
    return out


def hh_turns(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> [(role, text), ...]"""
    parts = re.split(r"\n\n(Human|Assistant): ", text)
    turns = []
    for who, body in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if who == "Human" else "assistant", "content": body.strip()})
    return turns


def train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for conv in quickstart_conversations():
        texts.extend(m["content"] for m in conv)
    for line in GSM8K.read_text().splitlines():
        r = json.loads(line)
        texts += [r["question"], r["answer"]]
    for line in HH.read_text().splitlines():
        r = json.loads(line)
        texts += [r["chosen"], r["rejected"]]
    texts += ["user", "assistant", "system"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != VOCAB:
        sys.exit(f"tokenizer: trained {n} ids, expected exactly {VOCAB} (too little text?)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )
    fast.chat_template = CHATML
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 may write the template to chat_template.jinja only: keep it in
    # tokenizer_config.json too (burnish reads either; the .jinja wins when both exist).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for k, v in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        cfg.setdefault(k, v)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    return ids


def write_model(out: Path, tok_dir: Path, ids, seed, moe=False, **dims):
    import shutil

    import torch
    from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                              MixtralForCausalLM)

    config_cls, model_cls = (MixtralConfig, MixtralForCausalLM) if moe else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **dims,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    except TypeError:  # transformers without the argument: safetensors is the only format
        model.save_pretrained(str(out))
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]).save_pretrained(str(out))
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    # The config must say float32 whatever transformers version wrote it.
    c = json.loads((out / "config.json").read_text())
    c["torch_dtype"] = "float32"
    c["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


def render_len(tok, messages, add_generation_prompt=False):
    return len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=False))


def sft_rows(tok, n_rows, rng):
    """Merge consecutive quickstart conversations into multi-turn conversations of more than
    SEQ + 32 tokens, shuffling the pool between passes, until there are n_rows of them."""
    pool = quickstart_conversations()
    rows, cur, lens = [], [], []
    while len(rows) < n_rows:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            cur = cur + pool[i]
            n = render_len(tok, cur)
            if n > SEQ + 32:
                rows.append(cur)
                lens.append(n)
                cur = []
                if len(rows) >= n_rows:
                    break
    return rows, lens


def dpo_rows(tok, n_pairs, rng):
    pairs, dropped = [], 0
    for line in HH.read_text().splitlines():
        r = json.loads(line)
        c, j = hh_turns(r["chosen"]), hh_turns(r["rejected"])
        if len(c) < 2 or len(j) < 2 or c[:-1] != j[:-1] or c[-1]["role"] != "assistant" or j[-1]["role"] != "assistant":
            dropped += 1
            continue
        if not c[-1]["content"] or not j[-1]["content"] or c[-1]["content"] == j[-1]["content"]:
            dropped += 1
            continue
        prompt = c[:-1]
        # Drop leading (user, assistant) turns until prompt + the longer completion fits.
        while True:
            lc = render_len(tok, prompt + [c[-1]])
            lj = render_len(tok, prompt + [j[-1]])
            if max(lc, lj) <= SEQ or len(prompt) < 3:
                break
            prompt = prompt[2:]
        if max(lc, lj) > SEQ or prompt[0]["role"] != "user" or prompt[-1]["role"] != "user":
            dropped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": [c[-1]], "rejected": [j[-1]], "_tokens": lc + lj})
    if not pairs:
        sys.exit("dpo: no preference pair fits in 256 tokens")
    base = list(pairs)
    while len(pairs) < n_pairs:
        extra = list(base)
        rng.shuffle(extra)
        pairs += extra
    return pairs, dropped, len(base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--rows", type=int, default=96, help="SFT conversations (one 256-token row each)")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=200)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from transformers import AutoTokenizer

    d = a.dir
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    info = {"version": SETUP_VERSION}
    if not (d / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(d / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    assert len(tok) == VOCAB, len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    info["special_ids"] = ids
    info["tokenizer_vocab"] = len(tok)

    if not (d / "model" / "model.safetensors").exists():
        info["model_params"] = write_model(
            d / "model", d / "tokenizer", ids, 0, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, intermediate_size=1408)
    if not (d / "moe" / "model.safetensors").exists():
        info["moe_params"] = write_model(
            d / "moe", d / "tokenizer", ids, 2, moe=True, hidden_size=512, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, intermediate_size=352, num_local_experts=8,
            num_experts_per_tok=2, router_aux_loss_coef=0.02,
            sliding_window=None)
    if not (d / "student" / "model.safetensors").exists():
        info["student_params"] = write_model(
            d / "student", d / "tokenizer", ids, 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=176)

    data = d / "data"
    data.mkdir(exist_ok=True)
    rows, lens = sft_rows(tok, a.rows, rng)
    with open(data / "sft.jsonl", "w") as f:
        for m in rows:
            f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
    info["sft"] = {"rows": len(rows), "min_tokens": min(lens), "mean_tokens": sum(lens) / len(lens)}

    pairs, dropped, unique = dpo_rows(tok, a.pairs, rng)
    with open(data / "dpo.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({k: v for k, v in p.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    toks = [p["_tokens"] for p in pairs]
    info["dpo"] = {"pairs": len(pairs), "unique_pairs": unique, "hh_rows_unusable": dropped,
                   "mean_tokens_per_pair": sum(toks) / len(toks)}

    with open(data / "gsm8k.jsonl", "w") as f:
        n = 0
        while n < a.prompts:
            for line in GSM8K.read_text().splitlines():
                r = json.loads(line)
                f.write(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) + "\n")
                n += 1
                if n >= a.prompts:
                    break
    info["gsm8k"] = {"prompts": a.prompts}
    prev = {}
    if (d / "setup.json").exists():
        prev = json.loads((d / "setup.json").read_text())
    prev.update(info)
    (d / "setup.json").write_text(json.dumps(prev, indent=2) + "\n")
    print(json.dumps(prev))


if __name__ == "__main__":
    main()
