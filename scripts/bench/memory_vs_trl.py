"""Peak memory and speed of LoRA fine-tuning a Qwen2.5-0.5B-shaped model, burnish beside TRL,
on this machine (issue 18's benchmark):

    scripts/bench/memory_vs_trl.sh [--seqs 1024,2048,4096] [--steps 2] [--warmup 1]
                                   [--out target/bench/memory_vs_trl] [--sides burnish,burnish-bf16,ref]

Model: hidden 896, 24 layers, 14/2 heads, intermediate 4864, vocabulary 151,936, tied
embeddings, random init (qwen05b_setup.py), f32. Job: SFT with LoRA r 16, alpha 32 on
q,k,v,o,gate,up,down, batch 1 x SEQ tokens (burnish: packed rows of up to SEQ; TRL: rows of
exactly SEQ, packing "wrapped"), gradient checkpointing on both sides, AdamW, lr 1e-4.
Sides: burnish with the f32 base (as TRL's), burnish with the base stored in bf16
(`[model] dtype = "bfloat16"`: computed in f32, adapters f32), TRL.
Per length and side: peak RSS of the process tree, median tokens/s of the measured steps,
CPU use; for burnish also the `--dry-run` memory estimate and its error against the peak.
Run with the bench venv's python (memory_vs_trl.sh makes it).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vs_trl  # noqa: E402  (same folder: the process sampling and machine description)

ROOT = vs_trl.ROOT


def recipe(model, data, run_dir, cache, seq, steps, dtype):
    t = vs_trl.toml_str
    return f"""# written by scripts/bench/memory_vs_trl.py
method = "sft"
seed = 42

[model]
path = {t(model)}
dtype = "{dtype}"

[adapter]
type = "lora"
r = 16
alpha = 32
dropout = 0.0
target_modules = "all-linear"

[data]
files = [{t(data)}]
format = "openai"
template = "auto"
max_seq_len = {seq}
mask = "all"
truncation = "left"
packing = true
eval_fraction = 0.0
on_error = "fail"
cache_dir = {t(cache)}

[train]
output_dir = {t(run_dir)}
overwrite_output_dir = true
per_device_train_batch_size = 1
per_device_eval_batch_size = 1
gradient_accumulation_steps = 1
gradient_checkpointing = true
learning_rate = 1e-4
lr_scheduler_type = "constant"
warmup_steps = 0
warmup_ratio = 0.0
weight_decay = 0.0
max_grad_norm = 1.0
max_steps = {steps}
eval_steps = 0
eval_on_start = false
save_steps = 0
save_total_limit = 1
logging_steps = 1
export_dtype = "float32"
"""


def dry_run_total(burnish, recipe_path, env):
    """The `--dry-run` estimate's total in bytes (None if it cannot be read)."""
    r = subprocess.run([str(burnish), "train", "--recipe", str(recipe_path), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=600)
    m = re.search(r"^total\s+([\d.]+) (GB|MB|kB)", r.stdout, re.M)
    if not m:
        return None, (r.stdout + r.stderr)[-800:]
    scale = {"GB": 1e9, "MB": 1e6, "kB": 1e3}[m.group(2)]
    return float(m.group(1)) * scale, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "target/bench/memory_vs_trl")
    ap.add_argument("--burnish", type=Path,
                    default=Path(os.environ.get("BURNISH_BIN") or ROOT / "target/release/burnish"))
    ap.add_argument("--sides", default="burnish,burnish-bf16,ref",
                    help="burnish (f32 base), burnish-bf16 (base stored in bf16, [model] dtype), ref (TRL, f32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--job-timeout", type=float, default=3600.0)
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    sides = args.sides.split(",")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    setup = out / "setup"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), BENCH_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")

    # Rows: the bench conversations (tokenizer, chat template), enough for the longest rows.
    need_rows = max(seqs) * (args.warmup + args.steps + 2) // 200 + 20
    r = subprocess.run([sys.executable, HERE / "bench_setup.py", "--dir", setup, "--rows", str(need_rows),
                        "--pairs", "8", "--prompts", "8"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("[setup] bench_setup.py failed:\n" + r.stderr[-2000:])
    model = setup / "qwen05b"
    r = subprocess.run([sys.executable, HERE / "qwen05b_setup.py", "--tokenizer", setup / "tokenizer", "--out",
                        model], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("[setup] qwen05b_setup.py failed:\n" + r.stderr[-2000:])
    print(f"[setup] {r.stdout.strip()}", flush=True)

    total = args.warmup + args.steps
    results = {"info": vs_trl.machine_info(args.burnish), "args": {k: str(v) for k, v in vars(args).items()},
               "runs": {}}
    for seq in seqs:
        results["runs"][seq] = {}
        for side in sides:
            run = out / "runs" / str(seq) / side
            if run.exists():
                shutil.rmtree(run)
            run.mkdir(parents=True)
            vs_trl.wait_idle(10.0, 60.0)
            res = {}
            if side.startswith("burnish"):
                dtype = "bfloat16" if side == "burnish-bf16" else "float32"
                (run / "recipe.toml").write_text(recipe(model, setup / "data/sft.jsonl", run / "run",
                                                        out / "burnish-cache", seq, total, dtype))
                est, text = dry_run_total(args.burnish, run / "recipe.toml", env)
                (run / "dry_run.txt").write_text(text)
                res_est = {"dry_run_bytes": est}
                cmd = [args.burnish, "train", "--recipe", run / "recipe.toml"]
                step_file, kind = run / "run" / "metrics.jsonl", "burnish"
            else:
                res_est = {}
                cmd = [sys.executable, HERE / "ref_jobs.py", "lora", "--setup", setup, "--model", model, "--seq",
                       str(seq), "--batch", "1", "--gradient-checkpointing", "--out", run, "--steps", str(total),
                       "--threads", str(args.threads)]
                step_file, kind = run / "steps.jsonl", "ref"
            print(f"[{seq}/{side}] running", flush=True)
            res = vs_trl.run_monitored(cmd, ROOT, env, run, step_file, kind, args.warmup, args.steps,
                                       args.interval, args.job_timeout)
            res.update(res_est)
            if res_est.get("dry_run_bytes"):
                peak = res["peak_rss_mb"] * 1024 * 1024
                res["dry_run_error_pct"] = round(100 * (res_est["dry_run_bytes"] - peak) / peak, 1)
            (run / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
            results["runs"][seq][side] = res
            if res.get("error"):
                print(f"[{seq}/{side}] FAILED: {res['error']}\n  " + "\n  ".join(res.get("stderr_tail", "").splitlines()),
                      flush=True)
            else:
                est = f", dry-run {res_est['dry_run_bytes'] / 1e9:.2f} GB ({res.get('dry_run_error_pct')}%)" \
                    if res_est.get("dry_run_bytes") else ""
                print(f"[{seq}/{side}] {res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB,"
                      f" CPU {res['cpu_pct']:.0f}%{est}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    info = results["info"]
    flags = " ".join(f for f, on in info["flags"].items() if on)
    lines = [f"# Memory: LoRA r16 on a Qwen2.5-0.5B-shaped model, batch 1, gradient checkpointing", "",
             f"{info['date']}; {info['cpu']} ({info['cores']} cores; {flags}); burnish {info['burnish_commit']};"
             f" {json.dumps(info.get('python_packages', {}))}", "",
             "| seq | burnish base | burnish peak RSS (MB) | TRL peak RSS (MB) | RSS ratio | burnish tok/s | TRL tok/s |"
             " speed ratio | burnish CPU % | TRL CPU % | dry-run (GB) | dry-run error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seq, r in results["runs"].items():
        t = r.get("ref", {})
        for side in [s for s in sides if s.startswith("burnish")]:
            b = r.get(side, {})
            rss = vs_trl.fmt(vs_trl.ratio(b.get("peak_rss_mb"), t.get("peak_rss_mb")), 2)
            spd = vs_trl.fmt(vs_trl.ratio(b.get("tokens_per_s"), t.get("tokens_per_s")), 2)
            est = b.get("dry_run_bytes")
            base = "bf16" if side == "burnish-bf16" else "f32"
            lines.append(f"| {seq} | {base} | {vs_trl.fmt(b.get('peak_rss_mb'), 0)} |"
                         f" {vs_trl.fmt(t.get('peak_rss_mb'), 0)} | {rss} | {vs_trl.fmt(b.get('tokens_per_s'))} |"
                         f" {vs_trl.fmt(t.get('tokens_per_s'))} | {spd} | {vs_trl.fmt(b.get('cpu_pct'), 0)} |"
                         f" {vs_trl.fmt(t.get('cpu_pct'), 0)} | {vs_trl.fmt(est / 1e9 if est else None, 2)} |"
                         f" {vs_trl.fmt(b.get('dry_run_error_pct'))}% |")
    lines.append("")
    lines.append("RSS ratio = burnish / TRL (< 1: burnish uses less); speed ratio = burnish / TRL (> 1: faster)."
                 " TRL's base is f32; burnish's bf16 base is `[model] dtype = \"bfloat16\"` (frozen base stored"
                 " in bf16, computed in f32, adapters f32).")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
