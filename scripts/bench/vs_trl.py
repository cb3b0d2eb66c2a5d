"""burnish vs TRL/PyTorch on this machine: same model, data and settings, one process per
job and side, one after the other; throughput, memory and CPU use side by side.

    scripts/bench/vs_trl.sh [--jobs sft,lora,dpo,grpo,distill,distill-cached,sft-moe] [--steps 6] [--warmup 2]
                            [--out target/bench/vs_trl]

Run with the bench venv's python (vs_trl.sh makes it). Needs only the standard library here;
the model/data setup (bench_setup.py) and the reference jobs (ref_jobs.py) run as child
processes with torch/transformers/trl/peft.

Per job and side: wait for an idle machine, start the process, sample it (and its children)
and the machine from /proc every --interval seconds, and follow its per-step log (burnish:
<output_dir>/metrics.jsonl; reference: steps.jsonl) to find the measured window: from the end
of warmup step --warmup to the end of step --warmup + --steps. The figure is the median
tokens/s of the measured steps (burnish: `tokens_per_s` of each metrics line; reference: real
tokens of the step / wall time since the previous step ended).
"""

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLK = os.sysconf("SC_CLK_TCK")
ALL_JOBS = ["sft", "lora", "dpo", "grpo", "distill", "distill-cached", "sft-moe"]
SEQ = 256


# ----------------------------------------------------------------------------- /proc


def machine_ticks():
    """(busy, total) clock ticks of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = v[3] + v[4]
    return total - idle, total


def proc_table():
    """pid -> (ppid, utime, stime, cutime, cstime) for every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        try:
            out[int(name)] = (int(rest[1]), int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14]))
        except (IndexError, ValueError):
            continue
    return out


def tree(root, table):
    kids = {}
    for pid, row in table.items():
        kids.setdefault(row[0], []).append(pid)
    seen, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in table and p not in seen:
            seen.append(p)
            todo.extend(kids.get(p, []))
    return seen


def mem_kb(pid):
    hwm = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return hwm, rss


class Sample:
    __slots__ = ("t", "utime", "stime", "busy", "total", "hwm_kb", "rss_kb", "nproc", "self_cpu")


def sample(root):
    s = Sample()
    s.t = time.time()
    table = proc_table()
    pids = tree(root, table)
    s.utime = s.stime = 0
    s.hwm_kb = s.rss_kb = 0
    for p in pids:
        _, ut, st, cut, cst = table[p]
        # Reaped children are in their parent's cutime/cstime: counted once either way.
        s.utime += ut + cut
        s.stime += st + cst
        h, r = mem_kb(p)
        s.hwm_kb += h
        s.rss_kb += r
    s.nproc = len(pids)
    s.busy, s.total = machine_ticks()
    own = os.times()
    s.self_cpu = own.user + own.system  # this harness: not "other processes"
    return s


def wait_idle(threshold_pct, timeout_s, window_s=2.0):
    """Wait until the machine is under threshold_pct busy (of all cores) over window_s."""
    start = time.time()
    while True:
        b0, t0 = machine_ticks()
        time.sleep(window_s)
        b1, t1 = machine_ticks()
        pct = 100.0 * (b1 - b0) / max(t1 - t0, 1)
        waited = time.time() - start
        if pct < threshold_pct:
            return {"idle": True, "busy_pct": round(pct, 1), "waited_s": round(waited, 1)}
        if waited >= timeout_s:
            return {"idle": False, "busy_pct": round(pct, 1), "waited_s": round(waited, 1)}


# ----------------------------------------------------------------------------- step logs


class StepFollower:
    """Reads the complete lines appended to a JSONL file; notes when each step line arrived."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.pos = 0
        self.buf = ""
        self.steps = {}  # step -> record
        self.arrival = {}  # step -> sample index at which it was seen
        self.losses = {}  # step -> loss
        self.extra = []  # non-step records (settings, info)

    def poll(self, at_index):
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except OSError:
            return
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            self._record(r, at_index)

    def _record(self, r, at_index):
        step = r.get("step")
        if self.kind == "burnish":
            if step is not None and "loss" in r and "tokens_per_s" in r:
                self.steps[step] = r
                self.arrival.setdefault(step, at_index)
                self.losses[step] = r["loss"]
        else:
            if step is not None and "dt" in r:
                self.steps[step] = r
                self.arrival.setdefault(step, at_index)
                if "loss" in r:
                    self.losses[step] = r["loss"]
            elif step is not None and "loss_log" in r:
                self.losses[step] = r["loss_log"]
            else:
                self.extra.append(r)


# ----------------------------------------------------------------------------- one process


def run_monitored(cmd, cwd, env, log_dir: Path, step_file: Path, kind, warmup, steps, interval, timeout_s):
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "stdout.log", "w")
    err = open(log_dir / "stderr.log", "w")
    (log_dir / "command.txt").write_text(" ".join(map(str, cmd)) + "\n")
    follower = StepFollower(step_file, kind)
    t_start = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=err,
                            start_new_session=True)
    samples, rc, rusage, timed_out = [], None, None, False
    while True:
        s = sample(proc.pid)
        samples.append(s)
        follower.poll(len(samples) - 1)
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            rc = os.waitstatus_to_exitcode(status)
            rusage = ru
            proc.returncode = rc
            break
        if time.time() - t_start > timeout_s:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own child's process group
                time.sleep(5)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, rusage = os.wait4(proc.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            break
        time.sleep(interval)
    follower.poll(len(samples))  # lines written just before exit
    if samples:
        # a final sample for steps that arrived after the last one
        last = Sample()
        for k in Sample.__slots__:
            setattr(last, k, getattr(samples[-1], k))
        last.t = time.time()
        last.busy, last.total = machine_ticks()
        if rusage is not None:
            last.utime = max(last.utime, round(rusage.ru_utime * CLK))
            last.stime = max(last.stime, round(rusage.ru_stime * CLK))
        samples.append(last)
    out.close()
    err.close()
    return analyse(samples, follower, rc, rusage, timed_out, warmup, steps, t_start, log_dir, kind)


def tail(path: Path, n=15):
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # progress bars rewrite one line with \r: keep the last state of each line
    lines = [l.split("\r")[-1] for l in lines if l.strip()]
    return "\n".join(lines[-n:])


def analyse(samples, fl: StepFollower, rc, rusage, timed_out, warmup, steps, t_start, log_dir, kind):
    res = {"rc": rc, "timed_out": timed_out, "wall_s": round(samples[-1].t - t_start, 1) if samples else None}
    peak_kb = max((s.hwm_kb for s in samples), default=0)
    if rusage is not None:
        peak_kb = max(peak_kb, rusage.ru_maxrss)
    res["peak_rss_mb"] = round(peak_kb / 1024, 1)
    res["losses"] = {int(k): v for k, v in sorted(fl.losses.items())}
    res["extra"] = fl.extra
    last = warmup + steps
    measured = [fl.steps[k] for k in range(warmup + 1, last + 1) if k in fl.steps]
    ok = rc == 0 and len(measured) == steps and (warmup == 0 or warmup in fl.arrival) and last in fl.arrival
    if not ok:
        why = "timed out" if timed_out else f"exit code {rc}" if rc else f"{len(measured)}/{steps} measured steps logged"
        res["error"] = why
        res["stderr_tail"] = tail(log_dir / "stderr.log") or tail(log_dir / "stdout.log")
    if not measured:
        return res
    tps = [r["tokens_per_s"] for r in measured]
    res["tokens_per_s"] = statistics.median(tps)
    res["tokens_per_s_all"] = [round(x, 2) for x in tps]
    res["tokens_per_step"] = statistics.median(r["tokens"] for r in measured) if kind == "ref" else None
    gen_key = "generation_tokens_per_s" if kind == "burnish" else "gen_tokens_per_s"
    gens = [r[gen_key] for r in measured if gen_key in r]
    if gens:
        res["gen_tokens_per_s"] = statistics.median(gens)
        res["gen_tokens_per_s_all"] = [round(x, 2) for x in gens]
    i0 = fl.arrival.get(warmup, 0) if warmup > 0 else 0
    i1 = fl.arrival.get(last, len(samples) - 1)
    a, b = samples[i0], samples[i1]
    wall = max(b.t - a.t, 1e-9)
    du, ds = b.utime - a.utime, b.stime - a.stime
    job = (du + ds) / CLK
    machine_busy = (b.busy - a.busy) / CLK
    ncpu = os.cpu_count() or 1
    res["window"] = {
        "wall_s": round(wall, 2),
        "steps": len(measured),
        "samples": i1 - i0,
    }
    res["cpu_pct"] = round(100 * job / wall, 1)
    res["sys_pct"] = round(100 * ds / max(du + ds, 1), 1)
    res["other_cpu_pct"] = round(max(0.0, 100 * (machine_busy - job - (b.self_cpu - a.self_cpu)) / wall), 1)
    res["harness_cpu_pct"] = round(100 * (b.self_cpu - a.self_cpu) / wall, 1)
    res["machine_busy_pct"] = round(100 * machine_busy / wall / ncpu, 1)  # of all cores
    # Whole-run figures too (includes start-up, data preparation, final save).
    s0, s1 = samples[0], samples[-1]
    run_wall = max(s1.t - s0.t, 1e-9)
    run_job = (s1.utime + s1.stime - s0.utime - s0.stime) / CLK
    res["run_cpu_pct"] = round(100 * run_job / run_wall, 1)
    run_self = s1.self_cpu - s0.self_cpu
    res["run_other_cpu_pct"] = round(max(0.0, 100 * ((s1.busy - s0.busy) / CLK - run_job - run_self) / run_wall), 1)
    if kind == "ref":
        toks = sum(r["tokens"] for r in measured)
        res["window_tokens_per_s"] = round(toks / wall, 2)
    return res


# ----------------------------------------------------------------------------- recipes


def toml_str(p):
    return json.dumps(str(p))


def recipe(job, setup: Path, run_dir: Path, cache: Path, total_steps, top_k=20):
    model = setup / "model"
    data = setup / "data"
    lora = '\n[adapter]\ntype = "lora"\nr = 16\nalpha = 32\ndropout = 0.0\ntarget_modules = "all-linear"\n'
    train = f"""
[train]
output_dir = {toml_str(run_dir)}
overwrite_output_dir = true
per_device_train_batch_size = 8
per_device_eval_batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 1e-4
lr_scheduler_type = "constant"
warmup_steps = 0
warmup_ratio = 0.0
weight_decay = 0.0
adam_beta1 = 0.9
adam_beta2 = 0.999
adam_epsilon = 1e-8
max_grad_norm = 1.0
max_steps = {total_steps}
eval_steps = 0
eval_on_start = false
save_steps = 0
save_total_limit = 1
logging_steps = 1
export_dtype = "float32"
"""
    def data_section(file, fmt, extra, eval_fraction=0.0):
        return f"""
[data]
files = [{toml_str(data / file)}]
format = "{fmt}"
template = "auto"
max_seq_len = {SEQ}
{extra}eval_fraction = {eval_fraction}
on_error = "fail"
cache_dir = {toml_str(cache)}
"""

    sft_data = data_section("sft.jsonl", "openai", 'mask = "all"\ntruncation = "left"\npacking = true\n')
    head = f'# written by scripts/bench/vs_trl.py\nmethod = "{{method}}"\nseed = 42\n\n[model]\npath = {{path}}\n'
    if job in ("sft", "lora"):
        return head.format(method="sft", path=toml_str(model)) + (lora if job == "lora" else "") + sft_data + train
    if job == "sft-moe":
        return head.format(method="sft", path=toml_str(setup / "moe")) + sft_data + train
    if job == "dpo":
        return (head.format(method="dpo", path=toml_str(model)) + lora + """
[dpo]
loss_type = "sigmoid"
beta = 0.1
label_smoothing = 0.0
precompute_ref_log_probs = false
""" + data_section("dpo.jsonl", "preference", 'truncation = "drop"\npacking = false\n') + train)
    if job == "grpo":
        return (head.format(method="grpo", path=toml_str(model)) + lora + """
[grpo]
num_generations = 4
max_completion_length = 32
temperature = 1.0
top_p = 1.0
top_k = 0
beta = 0.04
epsilon = 0.2
num_iterations = 1
scale_rewards = "group"
loss_type = "dapo"
mask_truncated_completions = false

[[rewards]]
type = "format"
name = "has_zero"
pattern = '0'
weight = 1.0
""" + f"""
[data]
files = [{toml_str(data / "gsm8k.jsonl")}]
format = "prompt-answer"
template = "auto"
max_seq_len = 384
eval_fraction = 0.0
on_error = "fail"
cache_dir = {toml_str(cache)}
""" + train)
    if job in ("distill", "distill-cached"):
        cached = f"top_k = {top_k}\n" if job == "distill-cached" else ""
        return (head.format(method="distill", path=toml_str(setup / "student")) + f"""
[distill]
teacher = {toml_str(model)}
alpha = 0.5
temperature = 2.0
divergence = "forward_kl"
{cached}lmbda = 0.0
""" + sft_data + train)
    raise ValueError(job)


# ----------------------------------------------------------------------------- report

JOB_TEXT = {
    "sft": "full fine-tuning of the 31.8M model, loss on all tokens, rows of exactly 256 tokens (burnish: packing,"
           " conversations cut from the left to 256; TRL SFTTrainer: packing_strategy wrapped)",
    "lora": "the same with LoRA r 16, alpha 32, dropout 0 on q,k,v,o,gate,up,down (burnish all-linear; PEFT)",
    "dpo": "DPO sigmoid, beta 0.1, LoRA, reference = base with adapters off, 8 pairs (16 sequences) per step,"
           " pairs pre-cut to fit 256 tokens (nothing truncated); tokens = real tokens of chosen + rejected",
    "grpo": "GRPO + LoRA on GSM8K prompts, 2 prompts x 4 completions of up to 32 tokens, temperature 1, beta 0.04,"
            " dapo loss, reward = completion contains \"0\"; generation row = new tokens / sampling time"
            " (burnish generation_tokens_per_s; TRL: timed generate calls), whole step = prompt + completion tokens"
            " / step time",
    "distill": "logit KD, teacher the 31.8M model (online, frozen), student 1.1M, alpha 0.5, T 2, forward KL,"
               " loss on all tokens of 8 x 256 rows; reference = plain PyTorch loop with burnish's loss",
    "distill-cached": "burnish with the teacher's top-k log-probs cached before training, against the same"
                      " PyTorch online-teacher figure (top_k 20 unless --top-k)",
    "sft-moe": "full fine-tuning as sft of a Mixtral-shaped model (the 31.8M model's attention, 8 experts of"
               " width 352, top-2), load-balancing loss 0.02 on both sides (their default: the config's router_aux_loss_coef)",
}


def sh(cmd, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(burnish_bin):
    info = {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    lscpu = sh(["lscpu"])
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    flags = set()
    for l in lscpu.splitlines():
        if l.startswith("Flags"):
            flags = set(l.split(":", 1)[1].split())
    info["cpu"] = model
    info["flags"] = {f: f in flags for f in ["avx2", "avx512f", "avx512_bf16", "amx_tile", "fma"]}
    info["cores"] = os.cpu_count()
    info["kernel"] = platform.release()
    commit = sh(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]) or "?"
    dirty = sh(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    info["burnish_commit"] = commit + ("+dirty" if dirty else "")
    info["burnish_bin"] = str(burnish_bin)
    try:
        st = Path(burnish_bin).stat()
        info["burnish_bin_mtime"] = dt.datetime.fromtimestamp(st.st_mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except OSError:
        pass
    info["burnish_version"] = sh([str(burnish_bin), "--version"])
    code = ("import importlib.metadata as m, json, platform; print(json.dumps({'python': platform.python_version(), "
            "**{p: m.version(p) for p in ['torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', "
            "'tokenizers']}}))")
    try:
        info["python_packages"] = json.loads(sh([sys.executable, "-c", code]))
    except ValueError:
        info["python_packages"] = {}
    return info


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:,.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_table(results, info, args):
    lines = []
    p = info.get("python_packages", {})
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["flags"].items())
    lines.append(f"# burnish vs TRL/PyTorch ({info['date']})")
    lines.append("")
    lines.append(f"- CPU: {info['cpu']}, {info['cores']} cores; flags: {flags}")
    lines.append(f"- burnish: commit {info['burnish_commit']}, binary {info['burnish_bin']}"
                 f" (built {info.get('burnish_bin_mtime', '?')})")
    lines.append("- Python " + p.get("python", "?") + ": " +
                 ", ".join(f"{k} {v}" for k, v in p.items() if k != "python"))
    lines.append(f"- {args.warmup} warmup + {args.steps} measured optimizer steps per run, batch 8 x {SEQ} tokens,"
                 f" fp32, {args.threads} threads; figure = median tokens/s of the measured steps;"
                 " CPU % = process CPU time / wall time over the measured steps (100% = one core);"
                 " sys % = system share of that CPU time; RSS = peak resident set of the whole run")
    lines.append("")
    hdr = ["job", "burnish tokens/s", "reference tokens/s", "ratio", "burnish peak RSS (MB)", "ref peak RSS (MB)",
           "burnish CPU %", "ref CPU %", "burnish sys %", "ref sys %", "notes"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join("---" for _ in hdr) + "|")
    for row in results["rows"]:
        b, r = row.get("burnish") or {}, row.get("ref") or {}
        key = row.get("figure", "tokens_per_s")
        bv, rv = b.get(key), r.get(key)
        cells = [row["label"], fmt(bv), fmt(rv), fmt(ratio(bv, rv), 2) + ("x" if ratio(bv, rv) else ""),
                 fmt(b.get("peak_rss_mb"), 0), fmt(r.get("peak_rss_mb"), 0), fmt(b.get("cpu_pct"), 0),
                 fmt(r.get("cpu_pct"), 0), fmt(b.get("sys_pct"), 0), fmt(r.get("sys_pct"), 0),
                 "; ".join(row.get("notes", []))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("ratio = burnish / reference (> 1: burnish faster). Other procs CPU = busy CPU of other processes"
                 " during the measured steps of the burnish / reference run (100% = one core taken from the job).")
    lines.append("")
    lines.append("Jobs (burnish: `burnish train --recipe runs/<job>/burnish/recipe.toml`; reference: `ref_jobs.py <job>`):")
    lines.append("")
    for job, text in JOB_TEXT.items():
        if any(row["label"].split(" ")[0] == job for row in results["rows"]):
            lines.append(f"- {job}: {text}")
    lines.append("")
    sanity = results.get("loss_sanity") or {}
    if sanity:
        lines.append(f"Loss of the first steps (sanity: same model and data; ln(8000) = {math.log(8000):.2f}):")
        lines.append("")
        for job, d in sanity.items():
            for side in ("burnish", "ref"):
                vals = d.get(side) or []
                lines.append(f"- {job} {side:8s}: " + (", ".join(f"{v:.3f}" for v in vals) if vals else "-"))
        lines.append("")
    fails = [(row["label"], side, row[side]) for row in results["rows"] for side in ("burnish", "ref")
             if row.get(side) and row[side].get("error") and not row.get("shared_" + side)]
    if fails:
        lines.append("Failures:")
        lines.append("")
        for label, side, r in fails:
            lines.append(f"- {label} / {side}: {r['error']} (logs: {r.get('log_dir', '?')})")
            if r.get("stderr_tail"):
                lines.append("")
                lines.append("```")
                lines.append(r["stderr_tail"])
                lines.append("```")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default=",".join(ALL_JOBS))
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured ones")
    ap.add_argument("--out", type=Path, default=ROOT / "target/bench/vs_trl")
    ap.add_argument("--burnish", type=Path, default=Path(os.environ.get("BURNISH_BIN") or ROOT / "target/release/burnish"))
    ap.add_argument("--sides", default="burnish,ref", help="burnish,ref or one of them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period (s)")
    ap.add_argument("--idle-threshold", type=float, default=10.0, help="%% of all cores")
    ap.add_argument("--idle-timeout", type=float, default=60.0)
    ap.add_argument("--job-timeout", type=float, default=3600.0, help="per process (s)")
    ap.add_argument("--top-k", type=int, default=20, help="distill-cached: teacher top-k")
    args = ap.parse_args()

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    bad = [j for j in jobs if j not in ALL_JOBS]
    if bad:
        sys.exit(f"unknown job(s) {bad}; choose from {ALL_JOBS}")
    if args.warmup < 1:
        sys.exit("--warmup must be at least 1 (the window starts when warmup step N ends)")
    sides = [s.strip() for s in args.sides.split(",")]
    out = args.out.resolve()
    setup = out / "setup"
    total = args.warmup + args.steps
    burnish = args.burnish.resolve()
    if "burnish" in sides and not burnish.exists():
        sys.exit(f"burnish binary not found: {burnish} (build it, or set BURNISH_BIN / --burnish)")

    env = dict(os.environ)
    t = str(args.threads)
    env.update(RAYON_NUM_THREADS=t, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, BENCH_THREADS=t,
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_DISABLED="true", WANDB_MODE="disabled",
               HF_HOME=str(out / "hf-home"), PYTHONWARNINGS="ignore", NO_COLOR="1")

    # 1. Setup (models cached; data rewritten, cheap).
    out.mkdir(parents=True, exist_ok=True)
    rows_needed = max(96, math.ceil(total * 8 * 1.25))
    print(f"[setup] {setup}", flush=True)
    r = subprocess.run([sys.executable, str(HERE / "bench_setup.py"), "--dir", str(setup), "--rows", str(rows_needed),
                        "--pairs", str(rows_needed), "--prompts", str(max(200, total * 2))],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
        sys.exit("[setup] failed")
    setup_info = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"[setup] model {setup_info.get('model_params', '?')} params, student {setup_info.get('student_params', '?')},"
          f" sft rows {setup_info['sft']['rows']}, dpo pairs {setup_info['dpo']['pairs']}", flush=True)

    # 2. burnish reads the tokenizer, template and model.
    checks = {}
    if "burnish" in sides:
        for name, cmd in [
            ("data_inspect", [burnish, "data", "inspect", setup / "data/sft.jsonl", "--model", setup / "model",
                              "--max-seq-len", str(SEQ), "--mask", "all"]),
            ("generate", [burnish, "generate", "--model", setup / "model", "--prompt", "hi", "--max-new-tokens", "5"]),
        ]:
            c = subprocess.run([str(x) for x in cmd], env=env, capture_output=True, text=True, timeout=600)
            checks[name] = {"rc": c.returncode, "output": (c.stdout + c.stderr)[-1500:]}
            print(f"[check] burnish {name}: {'ok' if c.returncode == 0 else 'FAILED (rc %d)' % c.returncode}",
                  flush=True)
            if c.returncode != 0:
                print("  " + "\n  ".join((c.stdout + c.stderr).strip().splitlines()[-10:]), flush=True)

    info = machine_info(burnish)
    results = {"info": info, "args": {k: str(v) for k, v in vars(args).items()}, "setup": setup_info,
               "burnish_checks": checks, "runs": {}, "rows": []}

    def run_side(job, side):
        run = out / "runs" / job / side
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        idle = wait_idle(args.idle_threshold, args.idle_timeout)
        if side == "burnish":
            rec = recipe(job, setup, run / "run", out / "burnish-cache", total, args.top_k)
            (run / "recipe.toml").write_text(rec)
            cmd = [burnish, "train", "--recipe", run / "recipe.toml"]
            step_file, kind = run / "run" / "metrics.jsonl", "burnish"
        else:
            ref_job = {"distill-cached": "distill", "sft-moe": "sft"}.get(job, job)
            cmd = [sys.executable, HERE / "ref_jobs.py", ref_job, "--setup", setup, "--out", run, "--steps",
                   str(total), "--threads", str(args.threads)]
            if job == "sft-moe":
                cmd += ["--model", setup / "moe"]
            step_file, kind = run / "steps.jsonl", "ref"
        print(f"[{job}/{side}] machine {'idle' if idle['idle'] else 'NOT idle'} ({idle['busy_pct']}% busy,"
              f" waited {idle['waited_s']} s); running", flush=True)
        res = run_monitored(cmd, ROOT, env, run, step_file, kind, args.warmup, args.steps, args.interval,
                            args.job_timeout)
        res["idle_before"] = idle
        res["log_dir"] = str(run)
        (run / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        if res.get("error"):
            print(f"[{job}/{side}] FAILED: {res['error']}\n  " + "\n  ".join(res.get("stderr_tail", "").splitlines()),
                  flush=True)
        else:
            g = f", generation {res['gen_tokens_per_s']:.1f} tok/s" if "gen_tokens_per_s" in res else ""
            print(f"[{job}/{side}] {res['tokens_per_s']:.1f} tokens/s{g}, peak RSS {res['peak_rss_mb']:.0f} MB,"
                  f" CPU {res['cpu_pct']:.0f}% (sys {res['sys_pct']:.0f}%), other processes"
                  f" {res['other_cpu_pct']:.0f}%", flush=True)
        return res

    ref_distill = None
    for job in jobs:
        results["runs"][job] = {}
        for side in sides:
            if side == "ref" and job == "distill-cached" and ref_distill is not None:
                results["runs"][job]["ref"] = ref_distill
                continue
            results["runs"][job][side] = run_side(job, side)
            if side == "ref" and job in ("distill", "distill-cached"):
                ref_distill = results["runs"][job]["ref"]

    # Rows of the table.
    def notes_for(job, b, r):
        n = []
        for side, x in (("burnish", b), ("ref", r)):
            if not x:
                continue
            if x.get("error"):
                n.append(f"{side} FAILED: {x['error']}")
            if not x.get("idle_before", {}).get("idle", True):
                n.append(f"{side}: machine not idle before start ({x['idle_before']['busy_pct']}%)")
        ob, orf = (b or {}).get("other_cpu_pct"), (r or {}).get("other_cpu_pct")
        if ob is not None or orf is not None:
            n.append(f"other procs CPU {fmt(ob, 0)}% / {fmt(orf, 0)}%")
        return n

    ref_names = {"sft": "TRL SFTTrainer", "sft-moe": "TRL SFTTrainer", "lora": "TRL SFTTrainer + PEFT", "dpo": "TRL DPOTrainer + PEFT",
                 "grpo": "TRL GRPOTrainer + PEFT", "distill": "PyTorch loop", "distill-cached": "PyTorch loop (online)"}
    for job in jobs:
        b = results["runs"][job].get("burnish")
        r = results["runs"][job].get("ref")
        if job == "grpo":
            results["rows"].append({"label": "grpo (generation)", "figure": "gen_tokens_per_s", "burnish": b,
                                    "ref": r, "notes": notes_for(job, b, r) + ["new tokens/s of sampling"]})
            results["rows"].append({"label": "grpo (whole step)", "figure": "tokens_per_s", "burnish": b, "ref": r,
                                    "shared_burnish": True, "shared_ref": True,
                                    "notes": ["prompt+completion tokens / step time"]})
            continue
        notes = notes_for(job, b, r)
        if job == "distill-cached":
            notes.append(f"burnish top-{args.top_k} cached teacher vs PyTorch online teacher")
        row = {"label": job, "burnish": b, "ref": r, "notes": notes}
        if job == "distill-cached" and "ref" in results["runs"].get("distill", {}):
            row["shared_ref"] = True
        results["rows"].append(row)
    sanity = {}
    for job in ("sft", "lora", "sft-moe"):
        if job in results["runs"]:
            sanity[job] = {side: [results["runs"][job][side]["losses"][k]
                                  for k in sorted(results["runs"][job][side].get("losses", {}))[:4]]
                           for side in sides if results["runs"][job].get(side)}
    results["loss_sanity"] = sanity
    for row in results["rows"]:
        row["ref_impl"] = ref_names.get(row["label"].split(" ")[0])

    md = build_table(results, info, args)
    print()
    print(md)
    (out / "results.md").write_text(md + "\n")
    keep = ["tokens_per_s", "gen_tokens_per_s", "peak_rss_mb", "cpu_pct", "sys_pct", "other_cpu_pct",
            "machine_busy_pct", "error"]
    table = []
    for row in results["rows"]:
        fig = row.get("figure", "tokens_per_s")
        b, r = row.get("burnish") or {}, row.get("ref") or {}
        table.append({"job": row["label"], "figure": fig, "reference": row.get("ref_impl"),
                      "burnish": b.get(fig), "ref": r.get(fig), "ratio": ratio(b.get(fig), r.get(fig)),
                      "burnish_run": {k: b[k] for k in keep if k in b}, "ref_run": {k: r[k] for k in keep if k in r},
                      "notes": row.get("notes", [])})
    results["table"] = table
    del results["rows"]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    failed = any(x.get("error") for j in results["runs"].values() for x in j.values() if x)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
