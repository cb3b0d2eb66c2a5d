#!/usr/bin/env python3
"""Regenerate the model/tokenizer parity fixtures under tests/fixtures/.

Writes, with transformers + torch on CPU:
  tests/fixtures/models/{tiny-llama,tiny-qwen2,tiny-mistral}/  HF checkpoints (random weights)
      tiny-llama:   f32, sharded (model.safetensors.index.json), GQA, untied, llama3 rope_scaling
      tiny-qwen2:   bf16 on disk, q/k/v bias, tied embeddings
      tiny-mistral: f16 on disk, untied, no GQA
      tiny-mistral-swa: f32, sliding_window 5 (shorter than the 12-token inputs and the
          generations, so the window decides the logits)
      tiny-qwen3:   f32, per-head q/k RMSNorm, explicit head_dim 32 (not hidden / heads = 16),
          GQA, tied embeddings
      tiny-phi3:    f32, fused qkv_proj and gate_up_proj, GQA, untied, sliding_window 5
          (every layer, shorter than the inputs)
      tiny-gemma2:  f32, Gemma 2: norms scaled by 1 + weight, sqrt(hidden) embedding scale,
          GeGLU (gelu_pytorch_tanh), pre/post feed-forward norms, query_pre_attn_scalar 24
          (not head_dim 32), attention soft-cap 2 and final logit soft-cap 3 (small, so they
          bite on random weights), sliding window 5 on alternating layers, GQA, tied
      tiny-gemma3:  f32, Gemma 3 text: as Gemma 2 without soft-capping, plus per-head q/k norms
          (1 + weight) and a rotary base per layer type (global layers 1e6 with linear
          scaling 2, sliding layers 1e4), window 5
      tiny-mixtral: f32, 16 experts, top-2 (renormalised), expert width 48, GQA, untied; the
          router rows of experts 14 and 15 are scaled down so that they get no token
      tiny-qwen3-moe: f32, 3 layers, layer 1 dense (`mlp_only_layers`), 8 experts, top-2 not
          renormalised (`norm_topk_prob` false), q/k norms, head_dim 32, tied; experts 5-7
          are starved as above (some get no token)
      tiny-phi3-longrope: f32, LongRoPE (original context 8: the 12-token inputs use the long
          factors, generation prompts start on the short ones and cross over while decoding),
          partial_rotary_factor 0.5 (8 of 16 head dims turn), attention factor from 128/8
  tests/fixtures/models/<name>/expected.json: input ids, logits (f32, computed from the
      weights as stored on disk), logits of a left-padded batch, and greedy continuations;
      for the mixtures of experts also the load-balancing loss of both batches (transformers'
      `aux_loss`, the padded one without the padding) and each sparse layer's routed tokens
      per expert on the plain batch.
  tests/fixtures/tokenizer/phi3_expected.json: ids for strings and rendered chat templates
      (the tokenizer's own template and burnish's built-in ones in models/templates/).

Usage: python3 scripts/parity/make_model_fixtures.py [--only NAME]   (pip install torch transformers jinja2)
"""
import json
import os
import pathlib

import torch
from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
TOKENIZER = ROOT / "assets" / "tokenizers" / "phi3_vision"

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def randomise_norms(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # q_norm / k_norm too
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def starve_experts(experts):
    """Scale down the router rows of `experts`: their logits stay near 0 while the others'
    spread wide, so top-k almost never picks them (checked on the inputs below)."""
    def prepare(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p[experts] *= 0.01
    return prepare


def routed_tokens(router_logits, top_k, experts):
    """Per sparse layer, how many (token, slot) routings each expert got."""
    out = []
    for logits in router_logits:
        chosen = torch.topk(torch.softmax(logits.float(), -1), top_k, -1).indices
        out.append(torch.bincount(chosen.reshape(-1), minlength=experts).tolist())
    return out


def build(name, cls, cfg, dtype, shard, prepare=None):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model = cls(cfg).eval()
    randomise_norms(model, gen)
    if prepare:
        prepare(model)
    out = FIX / "models" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    model.to(dtype).save_pretrained(out, safe_serialization=True,
                                    max_shard_size="200KB" if shard else "1GB")
    # Reference values come from the weights as stored, upcast to f32 (what burnish loads).
    # Eager attention: the only one of transformers' that soft-caps (Gemma 2).
    model = cls.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()

    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    # Left-padded batch: row 0 has 4 pad tokens.
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    padded = ids.clone()
    padded[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        pad_logits = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits

    prompts = [ids[0, :3].tolist(), ids[1, :7].tolist()]
    width = max(len(p) for p in prompts)
    gen_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    gen_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out_ids = model.generate(input_ids=gen_ids, attention_mask=gen_mask, max_new_tokens=10,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = [row[width:].tolist() for row in out_ids]

    expected = {
        "input_ids": ids.tolist(),
        "logits": logits.tolist(),
        "padded_input_ids": padded.tolist(),
        "padded_attention_mask": mask.tolist(),
        "padded_logits": pad_logits.tolist(),
        "prompts": prompts,
        "greedy_new_tokens": greedy,
    }
    if hasattr(cfg, "num_experts_per_tok"):
        with torch.no_grad():
            plain = model(input_ids=ids, output_router_logits=True)
            pad = model(input_ids=padded, attention_mask=mask, position_ids=pos,
                        output_router_logits=True)
        experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        counts = routed_tokens(plain.router_logits, cfg.num_experts_per_tok, experts)
        assert any(0 in layer for layer in counts), f"every expert got a token: {counts}"
        expected["router_aux_loss"] = plain.aux_loss.item()
        expected["padded_router_aux_loss"] = pad.aux_loss.item()
        expected["expert_tokens"] = counts
    (out / "expected.json").write_text(json.dumps(expected))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, greedy {greedy}")


def models(only=None):
    for name, (args, kw) in MODELS.items():
        if only in (None, name):
            build(name, *args, **kw)


MODELS = {}


def model(name, *args, **kw):
    MODELS[name] = (args, kw)


def _register():
    model("tiny-llama", LlamaForCausalLM,
          LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      rope_theta=10000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
          torch.float32, shard=True)
    model("tiny-qwen2", Qwen2ForCausalLM,
          Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_theta=1000000.0, use_sliding_window=False),
          torch.bfloat16, shard=False)
    model("tiny-mistral", MistralForCausalLM,
          MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                        sliding_window=None),
          torch.float16, shard=False)
    model("tiny-qwen3", Qwen3ForCausalLM,
          Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      tie_word_embeddings=True, rope_theta=1000000.0, attention_bias=False,
                      use_sliding_window=False),
          torch.float32, shard=False)
    model("tiny-phi3", Phi3ForCausalLM,
          Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     rope_theta=10000.0, sliding_window=5, original_max_position_embeddings=128),
          torch.float32, shard=False)
    model("tiny-gemma2", Gemma2ForCausalLM,
          Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                       final_logit_softcapping=3.0, sliding_window=5, tie_word_embeddings=True,
                       hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0),
          torch.float32, shard=False)
    model("tiny-gemma3", Gemma3ForCausalLM,
          Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           query_pre_attn_scalar=24, sliding_window=5, tie_word_embeddings=True,
                           layer_types=["sliding_attention", "full_attention"],
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1000000.0},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 10000.0}}),
          torch.float32, shard=False)
    model("tiny-phi3-longrope", Phi3ForCausalLM,
          Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5,
                                      "original_max_position_embeddings": 8,
                                      "short_factor": [1.0, 1.3, 2.1, 3.7],
                                      "long_factor": [1.5, 2.9, 6.2, 11.0]},
                     original_max_position_embeddings=8),
          torch.float32, shard=False)
    model("tiny-mixtral", MixtralForCausalLM,
          MixtralConfig(**{**COMMON, "intermediate_size": 48}, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
                        num_local_experts=16, num_experts_per_tok=2, router_aux_loss_coef=0.02),
          torch.float32, shard=False, prepare=starve_experts([14, 15]))
    model("tiny-qwen3-moe", Qwen3MoeForCausalLM,
          Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3}, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         rope_theta=1000000.0, use_sliding_window=False, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                         decoder_sparse_step=1, mlp_only_layers=[1]),
          torch.float32, shard=False, prepare=starve_experts([5, 6, 7]))
    model("tiny-mistral-swa", MistralForCausalLM,
          MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        sliding_window=5),
          torch.float32, shard=False)


_register()


CONVERSATIONS = [
    [{"role": "user", "content": "Hello world!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  And 3+3?  "}],
    [{"role": "user", "content": "Écris un haïku. 🍂"},
     {"role": "assistant", "content": "Feuilles qui tombent\nle vent les emporte\nautomne"}],
]
STRINGS = ["Hello world!", " leading space", "multi\nline\ttext", "Écris un haïku. 🍂",
           "<|user|>\nhi<|end|>\n<|assistant|>\n", "1234567 + 89 = ?"]


def tokenizer():
    from transformers.utils.chat_template_utils import _compile_jinja_template
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    out = {"encode": [], "own_template": [], "builtin": {}}
    for s in STRINGS:
        ids = tok(s)["input_ids"]
        out["encode"].append({"text": s, "ids": ids,
                              "ids_no_special": tok(s, add_special_tokens=False)["input_ids"],
                              "decoded": tok.decode(ids, skip_special_tokens=True)})
    for conv in CONVERSATIONS:
        for agp in (False, True):
            out["own_template"].append({"messages": conv, "add_generation_prompt": agp,
                                        "text": tok.apply_chat_template(conv, tokenize=False,
                                                                        add_generation_prompt=agp)})
    for path in sorted((ROOT / "models" / "templates").glob("*.jinja")):
        tmpl = _compile_jinja_template(path.read_text())
        rendered = []
        for conv in CONVERSATIONS:
            for agp in (False, True):
                try:
                    text = tmpl.render(messages=conv, add_generation_prompt=agp, bos_token="<s>",
                                       eos_token="</s>")
                    rendered.append({"messages": conv, "add_generation_prompt": agp, "text": text})
                except Exception as e:  # raise_exception in the template
                    rendered.append({"messages": conv, "add_generation_prompt": agp, "error": str(e)})
        out["builtin"][path.stem] = rendered
    (FIX / "tokenizer").mkdir(parents=True, exist_ok=True)
    (FIX / "tokenizer" / "phi3_expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print("tokenizer fixtures written")


if __name__ == "__main__":
    import sys
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    models(only)
    if only is None:
        tokenizer()
