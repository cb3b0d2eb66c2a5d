"""A Qwen2.5-0.5B-shaped model for the memory benchmark (scripts/bench/memory_vs_trl.py):
hidden 896, 24 layers, 14 query / 2 key-value heads, intermediate 4864, vocabulary 151,936,
tied embeddings (as Qwen2.5-0.5B), random init, written as an HF directory (safetensors, f32)
with the bench tokenizer (8,000 tokens: the rows use the first ids of the vocabulary).

    python qwen05b_setup.py --tokenizer DIR --out DIR
"""

import argparse
import json
import shutil
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    if (a.out / "model.safetensors").exists():
        print(json.dumps({"reused": str(a.out)}))
        return
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(a.out))
    for f in a.tokenizer.iterdir():
        if f.is_file():
            shutil.copy(f, a.out / f.name)
    c = json.loads((a.out / "config.json").read_text())
    c["torch_dtype"] = "float32"
    c["dtype"] = "float32"
    (a.out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
