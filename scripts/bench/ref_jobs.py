"""Reference (TRL / plain PyTorch) side of the burnish-vs-TRL benchmark: one job per process.

    python ref_jobs.py JOB --setup SETUP_DIR --out RUN_DIR --steps N [--threads 2]

JOB is sft | lora | dpo | grpo | distill. Each writes RUN_DIR/steps.jsonl, one line per
optimizer step as it ends: {"step", "t" (unix time), "dt" (s since the previous step ended),
"tokens" (real, unpadded tokens of the step), "tokens_per_s", "loss"} (+ for grpo
"gen_tokens", "gen_s", "gen_tokens_per_s"). Settings mirror the burnish recipes written by
vs_trl.py: fp32, no gradient checkpointing, lr 1e-4 constant, no warmup, AdamW
(0.9, 0.999, 1e-8, wd 0), clip 1.0, one micro-batch per step, no eval, no saving.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

SEQ = 256
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepLog:
    """Per-step records, appended and flushed as steps end (the harness polls the file)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)
        self.t_prev = time.time()
        self.tokens = 0
        self.gen_tokens = 0
        self.gen_s = 0.0

    def start(self):
        self.t_prev = time.time()

    def end_step(self, step, loss=None, **extra):
        t = time.time()
        dt = t - self.t_prev
        self.t_prev = t
        rec = {"step": step, "t": t, "dt": dt, "tokens": self.tokens,
               "tokens_per_s": self.tokens / max(dt, 1e-9)}
        if loss is not None:
            rec["loss"] = loss
        if self.gen_s > 0:
            rec.update(gen_tokens=self.gen_tokens, gen_s=self.gen_s,
                       gen_tokens_per_s=self.gen_tokens / self.gen_s)
        rec.update(extra)
        self.f.write(json.dumps(rec) + "\n")
        self.tokens = self.gen_tokens = 0
        self.gen_s = 0.0

    def write(self, rec):
        self.f.write(json.dumps(rec) + "\n")


def training_args(cls, a, **kw):
    common = dict(
        output_dir=str(a.out / "trainer"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=42,
        disable_tqdm=True,
    )
    common.update(kw)
    return cls(**common)


def log_settings(log, tr):
    """What the trainer will really run with (TRL changes some defaults)."""
    a = tr.args
    keys = ["bf16", "fp16", "activation_checkpointing", "optim", "lr_scheduler_type", "learning_rate", "warmup_steps",
            "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_steps", "packing", "packing_strategy", "padding_free", "max_length",
            "beta", "loss_type", "num_generations", "generation_batch_size", "steps_per_generation",
            "max_completion_length", "temperature", "epsilon", "scale_rewards"]
    s = {k: getattr(a, k) for k in keys if hasattr(a, k)}
    s = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)) for k, v in s.items()}
    s["torch_threads"] = __import__("torch").get_num_threads()
    s["model_dtype"] = str(next(tr.model.parameters()).dtype)
    s["attn_implementation"] = getattr(tr.model.config, "_attn_implementation", None)
    s["trainable_params"] = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    log.write({"settings": s})


def callback(log: StepLog):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            log.start()

        def on_step_end(self, args, state, control, **kw):
            log.end_step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.write({"step": state.global_step, "loss_log": float(logs["loss"])})

    return Timing()


def counting(trainer_cls, log: StepLog, count):
    """`trainer_cls` whose compute_loss adds the real tokens of its inputs to the log."""

    class Counting(trainer_cls):
        def compute_loss(self, model, inputs, *args, **kw):
            log.tokens += int(count(inputs))
            return super().compute_loss(model, inputs, *args, **kw)

    return Counting


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    # use_cache stays as saved (True): the trainers turn it off for training forwards
    # themselves, and GRPO's generate needs the KV cache.
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")


def read_jsonl(p):
    return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]


def real_tokens(inputs):
    am = inputs.get("attention_mask")
    if am is not None:
        return am.sum().item()
    return inputs["input_ids"].numel()


def run_sft(a, log, lora):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(a.setup / "tokenizer"))
    ds = Dataset.from_list(read_jsonl(a.setup / "data/sft.jsonl"))
    # "wrapped": the conversations' tokens concatenated and cut into rows of exactly 256,
    # a plain [8, 256] batch. (The default "bfd" turns on padding-free batches, which need
    # FlashAttention; on CPU SDPA would attend over one 2048-token row.)
    seq = a.seq or SEQ
    extra = {}
    if a.gradient_checkpointing:
        extra = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.batch:
        extra["per_device_train_batch_size"] = a.batch
    args = training_args(SFTConfig, a, packing=True, packing_strategy="wrapped", padding_free=False,
                         max_length=seq, assistant_only_loss=False, completion_only_loss=False,
                         dataset_num_proc=None, shuffle_dataset=False, **extra)
    cls = counting(SFTTrainer, log, real_tokens)
    tr = cls(model=load_model(a.model or a.setup / "model"), args=args, train_dataset=ds, processing_class=tok,
             peft_config=lora_config() if lora else None, callbacks=[callback(log)])
    lens = [len(r) for r in tr.train_dataset["input_ids"]]
    # Wrapping leaves one short row at the end: drop it so every row trained is full.
    tr.train_dataset = tr.train_dataset.filter(lambda r: len(r["input_ids"]) == seq)
    log.write({"info": f"packed rows: {len(lens)}, kept (exactly {seq} tokens): {len(tr.train_dataset)}"})
    log_settings(log, tr)
    tr.train()


def run_dpo(a, log):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(a.setup / "tokenizer"))
    ds = Dataset.from_list(read_jsonl(a.setup / "data/dpo.jsonl"))
    args = training_args(DPOConfig, a, beta=0.1, loss_type=["sigmoid"], max_length=SEQ,
                         truncation_mode="keep_start", precompute_ref_log_probs=False,
                         padding_free=False)
    cls = counting(DPOTrainer, log, real_tokens)
    tr = cls(model=load_model(a.setup / "model"), ref_model=None, args=args, train_dataset=ds,
             processing_class=tok, peft_config=lora_config(), callbacks=[callback(log)])
    log_settings(log, tr)
    tr.train()


def has_zero(completions, **kw):
    """1 when the completion contains the digit 0, else 0: burnish's [[rewards]] type = "format",
    pattern = '0'. Trivial, but about half of a random model's 32-token completions get it,
    so groups have a reward spread and advantages are not all zero."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(1.0 if re.search(r"0", text) else 0.0)
    return out


def run_grpo(a, log):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(str(a.setup / "tokenizer"))
    rows = read_jsonl(a.setup / "data/gsm8k.jsonl")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                            for r in rows])
    # per_device_train_batch_size counts completions: generation_batch_size defaults to
    # 8 x steps_per_generation (= gradient_accumulation_steps = 1) = 8 = 2 prompts x 4.
    args = training_args(GRPOConfig, a, num_generations=4, max_completion_length=32, temperature=1.0,
                         top_p=1.0, top_k=0, beta=0.04, epsilon=0.2, num_iterations=1, loss_type="dapo",
                         scale_rewards="group", mask_truncated_completions=False, log_completions=False,
                         shuffle_dataset=True)

    def count(inputs):
        return inputs["prompt_mask"].sum().item() + inputs["completion_mask"].sum().item()

    base = counting(GRPOTrainer, log, count)

    class Timed(base):
        def _generate_single_turn(self, prompt_ids, *args, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kw)
            log.gen_s += time.perf_counter() - t0
            log.gen_tokens += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    tr = Timed(model=load_model(a.setup / "model"), reward_funcs=[has_zero], args=args, train_dataset=ds,
               processing_class=tok, peft_config=lora_config(), callbacks=[callback(log)])
    assert args.generation_batch_size == 8 and args.steps_per_generation == 1, (
        args.generation_batch_size, args.steps_per_generation)
    log_settings(log, tr)
    tr.train()


def distill_rows(setup):
    """The SFT conversations templated and cut from the left to 256 tokens, as burnish's
    `truncation = "left"` does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setup / "tokenizer"))
    rows = []
    for r in read_jsonl(setup / "data/sft.jsonl"):
        ids = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
        rows.append(ids[-SEQ:])
    return rows


def run_distill(a, log):
    """Plain PyTorch logit distillation with burnish's loss (trainers/src/distill.rs):
    sum over trained positions of alpha * T^2 * KL(p_teacher^T || p_student^T)
    + (1 - alpha) * CE, divided by the number of trained positions; teacher online."""
    import random

    import torch
    import torch.nn.functional as F

    alpha, temp = 0.5, 2.0
    teacher = load_model(a.setup / "model").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = load_model(a.setup / "student").train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=True)
    rows = distill_rows(a.setup)
    assert all(len(r) == SEQ for r in rows), "every distill row must be 256 tokens"
    order, at, rng = [], 0, random.Random(42)
    log.start()
    for step in range(1, a.steps + 1):
        if at + 8 > len(order):
            order = list(range(len(rows)))
            rng.shuffle(order)
            at = 0
        batch = torch.tensor([rows[i] for i in order[at:at + 8]], dtype=torch.long)
        at += 8
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits[:, :-1]
            lt = F.log_softmax(t_logits / temp, dim=-1)
        s_logits = student(input_ids=batch).logits[:, :-1]
        n = targets.numel()
        v = s_logits.size(-1)
        ce = F.cross_entropy(s_logits.reshape(-1, v), targets.reshape(-1), reduction="sum")
        ls = F.log_softmax(s_logits / temp, dim=-1)
        kl = (lt.exp() * (lt - ls)).sum()
        loss = (alpha * temp * temp * kl + (1 - alpha) * ce) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        log.tokens += batch.numel()
        log.end_step(step, loss=loss.item())
        del inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["sft", "lora", "dpo", "grpo", "distill"])
    ap.add_argument("--setup", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    # sft/lora only (the memory benchmark, memory_vs_trl.py): another model, row length,
    # batch size, and gradient checkpointing.
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    a.out.mkdir(parents=True, exist_ok=True)
    log = StepLog(a.out / "steps.jsonl")
    if a.job in ("sft", "lora"):
        run_sft(a, log, lora=a.job == "lora")
    elif a.job == "dpo":
        run_dpo(a, log)
    elif a.job == "grpo":
        run_grpo(a, log)
    else:
        run_distill(a, log)
    log.write({"done": True})


if __name__ == "__main__":
    sys.exit(main())
