//! The distillation loss as a per-row objective of the student's logits, computed through
//! the LM head in chunks of positions (`models::chunked_head`): neither the student's
//! `[positions, vocab]` log-probs nor the teacher's exist beyond one chunk. The teacher's
//! side of a chunk comes from its final hidden states and its head (its logits are
//! recomputed per chunk), from cached top-k log-probs, or (a teacher head with a bias or
//! an adapter) from its whole log-prob table.
//!
//! `loss = alpha * T^2 * D(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels)` per
//! position, with D the forward KL, the reverse KL or GKD's generalised JSD (`beta`; 0 is
//! forward, 1 reverse KL). The chunked op needs each row's gradient with respect to its
//! logits, written out below next to each divergence.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::IndexingUpdateOp;

use models::chunked_head::{row_logsumexp, Aux, RowObjective, RowOutputs, Rows};

use crate::logprobs::keep_real;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdLoss {
    pub alpha: f64,
    pub temperature: f64,
    /// 0: forward KL(teacher || student); 1: reverse KL; between: generalised JSD.
    pub beta: f64,
}

/// What the teacher says about a batch's trained positions, in their row-major order.
#[derive(Debug, Clone)]
pub enum TeacherTargets {
    /// The teacher's final hidden states `[positions, hidden]`: its logits are recomputed
    /// chunk by chunk from its LM head.
    Hidden(TensorData),
    /// Log-probs over the whole vocabulary at temperature T, `[positions, vocab]`: only for
    /// a teacher whose head is not a plain weight (a bias or an adapter on it).
    Full(TensorData),
    /// The k most likely ids and their log-probs at temperature 1, `[positions, k]` each.
    TopK {
        ids: Vec<i32>,
        logps: Vec<f32>,
        k: usize,
    },
}

/// Where a chunk's teacher log-probs come from (the tensors are in [`Aux`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Teacher {
    /// `floats`: hidden `[n, d_t]`, head `[d_t, vocab]`.
    Hidden,
    /// `floats`: log-probs at temperature T `[n, vocab]`.
    Full,
    /// `floats`: log-probs at temperature 1 `[n, k]`; `ints[1]`: their ids `[n, k]`.
    TopK,
}

/// The loss per trained position; metrics: the divergence and the cross-entropy.
#[derive(Debug, Clone, Copy)]
pub struct KdObjective {
    loss: KdLoss,
    teacher: Teacher,
}

impl KdObjective {
    /// The objective and its tensors for a batch: `targets` `[n]`, the teacher's targets, and
    /// the teacher's head `[d_t, vocab]` (needed for [`TeacherTargets::Hidden`]).
    pub fn new<B: Backend>(
        loss: KdLoss,
        targets: Tensor<B, 1, Int>,
        teacher: &TeacherTargets,
        teacher_head: Option<Tensor<B, 2>>,
    ) -> (Self, Aux<B>) {
        let device = targets.device();
        let n = targets.dims()[0];
        let mut ints = vec![targets.reshape([n, 1])];
        let (kind, floats) = match teacher {
            TeacherTargets::Hidden(hidden) => {
                let head = teacher_head.expect("a teacher with hidden-state targets has a head");
                let hidden = Tensor::<B, 2>::from_data(hidden.clone(), &device);
                (Teacher::Hidden, vec![hidden, models::half::as_f32(head)])
            }
            TeacherTargets::Full(logps) => (
                Teacher::Full,
                vec![Tensor::<B, 2>::from_data(logps.clone(), &device)],
            ),
            TeacherTargets::TopK { ids, logps, k } => {
                ints.push(Tensor::from_data(
                    TensorData::new(ids.clone(), [n, *k]),
                    &device,
                ));
                let logps = Tensor::from_data(TensorData::new(logps.clone(), [n, *k]), &device);
                (Teacher::TopK, vec![logps])
            }
        };
        let objective = Self {
            loss,
            teacher: kind,
        };
        (objective, Aux { floats, ints })
    }
}

impl RowObjective for KdObjective {
    fn metric_count(&self) -> usize {
        2
    }

    fn rows<X: Backend>(
        &self,
        aux: &Aux<X>,
        z: Tensor<X, 2>,
        (start, end): (usize, usize),
        grad: bool,
    ) -> Rows<X> {
        let KdLoss {
            alpha,
            temperature: t,
            beta,
        } = self.loss;
        let c = end - start;
        let rows = |x: &Tensor<X, 2>| x.clone().slice(s![start..end]);
        let labels = aux.ints[0].clone().slice(s![start..end]);
        let lse = row_logsumexp(&z);
        let ce = (lse.clone() - z.clone().gather(1, labels.clone())).reshape([c]);
        let tempered = |x: Tensor<X, 2>| if t == 1.0 { x } else { x.div_scalar(t) };
        let u = tempered(z.clone());
        let (ls, lt, ids) = match self.teacher {
            Teacher::Hidden => {
                let zt = rows(&aux.floats[0]).matmul(aux.floats[1].clone());
                (log_softmax(u, 1), log_softmax(tempered(zt), 1), None)
            }
            Teacher::Full => (log_softmax(u, 1), rows(&aux.floats[0]), None),
            Teacher::TopK => {
                // The student's distribution restricted to the teacher's k tokens.
                let ids = aux.ints[1].clone().slice(s![start..end]);
                let top = tempered(rows(&aux.floats[0]));
                (
                    log_softmax(u.gather(1, ids.clone()), 1),
                    log_softmax(top, 1),
                    Some(ids),
                )
            }
        };
        let (div, d_div) = divergence(ls, lt, beta, grad);
        let value = div.clone().mul_scalar(alpha * t * t) + ce.clone().mul_scalar(1.0 - alpha);
        let dz = d_div.map(|g| {
            // d(T^2 D(u = z / T)) / dz = T dD/du, scattered back from the top-k columns.
            let g = g.mul_scalar(alpha * t);
            let g = match ids {
                None => g,
                Some(ids) => {
                    Tensor::zeros(z.dims(), &z.device()).scatter(1, ids, g, IndexingUpdateOp::Add)
                }
            };
            if alpha == 1.0 {
                return g;
            }
            // dCE/dz = softmax(z) - onehot(label).
            let minus = Tensor::full([c, 1], -1.0, &z.device());
            let d_ce =
                (z.detach() - lse.detach())
                    .exp()
                    .scatter(1, labels, minus, IndexingUpdateOp::Add);
            g + d_ce.mul_scalar(1.0 - alpha)
        });
        Rows {
            value,
            metrics: vec![div.detach(), ce.detach()],
            dz,
        }
    }
}

/// `D` of each row of `[c, m]` log-prob tensors (student `ls`, teacher `lt`), `[c]`, and
/// with `grad` its gradient with respect to the student's logits `u` (`ls = log_softmax(u)`).
/// With `g = dD/dp_s`, that gradient is `p_s (g - <p_s, g>)`:
/// - forward KL, `D = sum p_t (l_t - l_s)`: `p_s - p_t`;
/// - reverse KL, `D = sum p_s (l_s - l_t)`: `p_s (l_s - l_t - D)`;
/// - JSD with `m = (1 - beta) p_s + beta p_t`, `D = beta KL(p_t || m) + (1 - beta) KL(p_s || m)`:
///   `g = (1 - beta) log(p_s / m)`, so `(1 - beta) p_s (l_s - l_m - KL(p_s || m))`.
fn divergence<B: Backend>(
    ls: Tensor<B, 2>,
    lt: Tensor<B, 2>,
    beta: f64,
    grad: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    let c = ls.dims()[0];
    let kl = |p_log: Tensor<B, 2>, q_log: Tensor<B, 2>| {
        (p_log.clone().exp() * (p_log - q_log)).sum_dim(1)
    };
    let flat = |x: Tensor<B, 2>| x.reshape([c]);
    if beta == 0.0 {
        let d = kl(lt.clone(), ls.clone());
        return (flat(d), grad.then(|| ls.exp() - lt.exp()));
    }
    if beta == 1.0 {
        let d = kl(ls.clone(), lt.clone());
        let g = grad.then(|| ls.clone().exp() * (ls - lt - d.clone()));
        return (flat(d), g);
    }
    // log m = log((1 - beta) p_s + beta p_t), with the max taken out for stability.
    let a = ls.clone().add_scalar((1.0 - beta).ln());
    let b = lt.clone().add_scalar(beta.ln());
    let m = a.clone().max_pair(b.clone());
    let lm = m.clone() + ((a - m.clone()).exp() + (b - m).exp()).log();
    let kl_s = kl(ls.clone(), lm.clone());
    let d = kl(lt, lm.clone()).mul_scalar(beta) + kl_s.clone().mul_scalar(1.0 - beta);
    let g = grad.then(|| (ls.clone().exp() * (ls - lm - kl_s)).mul_scalar(1.0 - beta));
    (flat(d), g)
}

/// The summed loss, divergence and cross-entropy of a batch's rows; rows where `mask` is 0
/// (bucket padding) count for nothing.
pub fn kd_sums<B: Backend>(
    rows: RowOutputs<B>,
    mask: &Option<Tensor<B, 1>>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let mut metrics = rows.metrics.into_iter();
    let sum = |x: Option<Tensor<B, 1>>| keep_real(x.expect("two metrics"), mask).sum();
    let div = sum(metrics.next());
    let ce = sum(metrics.next());
    (sum(Some(rows.value)), div, ce)
}

/// [`kd_sums`] from whole `[n, vocab]` student logits: the unchunked computation.
pub fn kd_loss_sum<B: Backend>(
    student_logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    mask: &Option<Tensor<B, 1>>,
    teacher: &TeacherTargets,
    teacher_head: Option<Tensor<B, 2>>,
    p: &KdLoss,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let (objective, aux) = KdObjective::new(*p, targets, teacher, teacher_head);
    kd_sums(
        models::chunked_head::logits_rows(student_logits, &aux, &objective, 1.0),
        mask,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::backend::AutodiffBackend;
    use models::backend::{CpuTrain, CpuTrainCheckpointed};
    use models::chunked_head::head_rows;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const N: usize = 13;
    const D: usize = 6;
    const V: usize = 29;
    const D_TEACHER: usize = 5;
    const K: usize = 4;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect()
    }

    fn teacher(kind: &str) -> TeacherTargets {
        match kind {
            "hidden" => {
                TeacherTargets::Hidden(TensorData::new(values(N * D_TEACHER, 3), [N, D_TEACHER]))
            }
            "full" => {
                let raw = Tensor::<models::backend::Cpu, 2>::from_data(
                    TensorData::new(values(N * V, 4), [N, V]),
                    &Default::default(),
                );
                TeacherTargets::Full(log_softmax(raw.mul_scalar(2.0), 1).into_data())
            }
            _ => {
                // Distinct ids per row, log-probs in decreasing order, as top-k gives them.
                let ids = (0..N * K).map(|i| ((i / K) * 5 + (i % K) * 7) as i32 % V as i32);
                let mut logps = values(N * K, 5);
                for row in logps.chunks_mut(K) {
                    row.sort_by(|a, b| b.total_cmp(a));
                    row.iter_mut().for_each(|x| *x -= 2.0);
                }
                TeacherTargets::TopK {
                    ids: ids.collect(),
                    logps,
                    k: K,
                }
            }
        }
    }

    type Outcome = (Vec<f32>, Vec<f32>, Vec<f32>);

    /// Loss, divergence and CE sums, and the gradients of the loss with respect to the
    /// hidden states and the head; `chunk` None is the unchunked computation.
    fn run<B: AutodiffBackend>(
        chunk: Option<usize>,
        kind: &str,
        p: KdLoss,
        head_tracked: bool,
    ) -> Outcome {
        let device = Default::default();
        let h = Tensor::<B, 2>::from_data(TensorData::new(values(N * D, 1), [N, D]), &device)
            .require_grad();
        let mut w = Tensor::<B, 2>::from_data(TensorData::new(values(D * V, 2), [D, V]), &device);
        if head_tracked {
            w = w.require_grad();
        }
        let head_t = Tensor::<B, 2>::from_data(
            TensorData::new(values(D_TEACHER * V, 6), [D_TEACHER, V]),
            &device,
        );
        let labels: Vec<i64> = (0..N as i64).map(|i| (i * 11) % V as i64).collect();
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [N]), &device);
        // The last row is bucket padding.
        let mut m = vec![1f32; N];
        m[N - 1] = 0.0;
        let mask = Some(Tensor::<B, 1>::from_data(TensorData::new(m, [N]), &device));
        let targets = teacher(kind);
        let (loss, div, ce) = match chunk {
            None => kd_loss_sum(
                h.clone().matmul(w.clone()),
                labels,
                &mask,
                &targets,
                Some(head_t),
                &p,
            ),
            Some(c) => {
                let (objective, aux) = KdObjective::new(p, labels, &targets, Some(head_t));
                kd_sums(
                    head_rows(h.clone(), w.clone(), aux, &objective, 1.0, c),
                    &mask,
                )
            }
        };
        let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f32>();
        let sums = vec![scalar(loss.clone()), scalar(div), scalar(ce)];
        let grads = loss.backward();
        let host = |t: Tensor<B::InnerBackend, 2>| t.to_data().iter::<f32>().collect::<Vec<_>>();
        let gh = host(h.grad(&grads).expect("hidden gradient"));
        let gw = w.grad(&grads).map(host).unwrap_or_default();
        (sums, gh, gw)
    }

    fn assert_close(a: &Outcome, b: &Outcome, label: &str) {
        for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            assert_eq!(x.len(), y.len(), "{label}");
            for (p, q) in x.iter().zip(y) {
                assert!(
                    (p - q).abs() <= 1e-6 * (1.0 + q.abs()),
                    "{label}: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn chunked_distillation_equals_the_unchunked_loss_and_gradients() {
        for kind in ["hidden", "full", "top_k"] {
            for beta in [0.0, 1.0, 0.4] {
                for (alpha, temperature) in [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)] {
                    let p = KdLoss {
                        alpha,
                        temperature,
                        beta,
                    };
                    for tracked in [false, true] {
                        let reference = run::<CpuTrain>(None, kind, p, tracked);
                        assert_eq!(reference.2.is_empty(), !tracked);
                        assert!(reference.1.iter().any(|g| g.abs() > 1e-4));
                        for chunk in [1, 4, N, 64] {
                            let label = format!("{kind} {p:?} head {tracked} chunk {chunk}");
                            let got = run::<CpuTrain>(Some(chunk), kind, p, tracked);
                            assert_close(&got, &reference, &label);
                            let got = run::<CpuTrainCheckpointed>(Some(chunk), kind, p, tracked);
                            assert_close(&got, &reference, &label);
                        }
                    }
                }
            }
        }
    }
}
