#!/usr/bin/env python3
"""Knowledge-distillation losses with PyTorch, on fixed student/teacher logits:

    loss = alpha * T^2 * D(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels)

summed over trained positions (labels != -100), for D = forward KL, reverse KL and the
generalised JSD, each computed by TRL 1.16's own `GKDTrainer.generalized_jsd_loss`
(trl/experimental/gkd/gkd_trainer.py; beta = 0 is forward KL, beta = 1 reverse KL,
temperature divides both logits) with reduction "sum". CE is the plain cross-entropy at
temperature 1.

Top-k variants (no TRL counterpart: burnish's cached-teacher form, written out here): the
teacher keeps its k most likely tokens at temperature 1 as log-probs; at temperature T both
distributions are renormalised over those k tokens (teacher: softmax(logp_k / T); student:
log_softmax(logits / T) gathered at the k ids, renormalised), then D is taken over them.

Writes tests/fixtures/losses/distill.json, checked by trainers/tests/loss_parity.rs.
    python3 scripts/parity/distill_reference.py   (pip install torch trl)
"""
import json
import pathlib

import torch
import torch.nn.functional as F
from trl.experimental.gkd.gkd_trainer import GKDTrainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
torch.manual_seed(7)
N, V, K = 7, 40, 5
student = torch.randn(N, V, dtype=torch.float64) * 2.0
teacher = torch.randn(N, V, dtype=torch.float64) * 3.0
labels = torch.randint(0, V, (N,))
labels[[1, 4]] = -100  # untrained positions
mask = labels != -100
temperature, alpha = 2.0, 0.5


def ce_sum():
    return F.cross_entropy(student[mask], labels[mask], reduction="sum")


def topk_divergence(beta, k):
    t_logp = F.log_softmax(teacher, dim=-1)
    t_top, idx = t_logp.topk(k, dim=-1)
    lt = F.log_softmax(t_top / temperature, dim=-1)
    ls_full = F.log_softmax(student / temperature, dim=-1)
    ls = ls_full.gather(-1, idx)
    ls = ls - torch.logsumexp(ls, dim=-1, keepdim=True)
    if beta == 0:
        d = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1:
        d = (ls.exp() * (ls - lt)).sum(-1)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        d = b * (lt.exp() * (lt - lm)).sum(-1) + (1 - b) * (ls.exp() * (ls - lm)).sum(-1)
    return d[mask].sum(), idx, t_top


cases = []
for name, beta in [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.9)]:
    d = GKDTrainer.generalized_jsd_loss(
        student.unsqueeze(0), teacher.unsqueeze(0), labels=labels.unsqueeze(0),
        beta=beta, temperature=temperature, reduction="sum",
    )
    ce = ce_sum()
    cases.append({
        "divergence": name, "beta": beta, "top_k": None,
        "divergence_sum": d.item(), "ce_sum": ce.item(),
        "loss_sum": (alpha * temperature**2 * d + (1 - alpha) * ce).item(),
    })
    dk, idx, t_top = topk_divergence(beta, K)
    cases.append({
        "divergence": name, "beta": beta, "top_k": K,
        "divergence_sum": dk.item(), "ce_sum": ce.item(),
        "loss_sum": (alpha * temperature**2 * dk + (1 - alpha) * ce).item(),
        "teacher_top_ids": idx[mask].tolist(), "teacher_top_logps": t_top[mask].tolist(),
    })

out = {
    "source": "TRL GKDTrainer.generalized_jsd_loss (trl %s) + F.cross_entropy" % __import__("trl").__version__,
    "temperature": temperature, "alpha": alpha,
    "student_logits": student.tolist(), "teacher_logits": teacher.tolist(),
    "labels": labels.tolist(), "cases": cases,
}
path = ROOT / "tests/fixtures/losses/distill.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print("wrote", path, [(c["divergence"], c["beta"], c["top_k"], round(c["loss_sum"], 5)) for c in cases])
