//! Peak memory of the loss alone, chunked against unchunked (issue 18): one forward and
//! backward of the SFT token log-probs or the distillation loss over `positions` rows of a
//! Qwen2.5-0.5B-shaped head (hidden 896, vocabulary 151,936, frozen as under LoRA), from
//! hidden states that need a gradient. Prints one JSON line; `scripts/bench/loss_memory.sh`
//! runs the matrix, one process per case so each peak is its own.
//! `cargo run --release --example loss_memory -- sft|kd chunked|plain POSITIONS`
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use models::backend::CpuTrain;
use models::chunked_head::{chunk_positions, head_rows, logits_rows, Aux, RowObjective};
use trainers::distill::{kd_sums, KdLoss, KdObjective, TeacherTargets};

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

const HIDDEN: usize = 896;
const VOCAB: usize = 151_936;

fn mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("a memory line")
        / 1024.0
}

fn random<B: Backend>(rows: usize, cols: usize, scale: f64, device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(
        [rows, cols],
        burn::tensor::Distribution::Normal(0.0, scale),
        device,
    )
}

/// The loss summed over rows, chunked or through whole logits.
fn loss<B: Backend, O: RowObjective>(
    hidden: Tensor<B, 2>,
    head: Tensor<B, 2>,
    aux: Aux<B>,
    objective: &O,
    chunked: bool,
) -> (Tensor<B, 1>, Vec<Tensor<B, 1>>) {
    let rows = match chunked {
        true => head_rows(hidden, head, aux, objective, 1.0, chunk_positions(VOCAB)),
        false => logits_rows(hidden.matmul(head), &aux, objective, 1.0),
    };
    (rows.value, rows.metrics)
}

fn run<B: AutodiffBackend>(kind: &str, chunked: bool, n: usize) {
    let device = Default::default();
    B::seed(&device, 0);
    let head = random::<B>(HIDDEN, VOCAB, 0.02, &device);
    let hidden = random::<B>(n, HIDDEN, 1.0, &device).require_grad();
    let labels: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % VOCAB as i64).collect();
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), &device);
    let teacher_head = random::<B>(HIDDEN, VOCAB, 0.02, &device);
    let teacher_hidden = random::<B::InnerBackend>(n, HIDDEN, 1.0, &device).into_data();
    // Settle the inputs, then measure the peak above them.
    let _ = hidden.clone().sum().into_scalar();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let base = mb("VmRSS:");
    let t = std::time::Instant::now();
    let total = match kind {
        "kd" => {
            let p = KdLoss {
                alpha: 0.5,
                temperature: 2.0,
                beta: 0.5,
            };
            let teacher = TeacherTargets::Hidden(teacher_hidden);
            let (objective, aux) = KdObjective::new(p, labels, &teacher, Some(teacher_head));
            let (value, metrics) = loss(hidden.clone(), head, aux, &objective, chunked);
            let rows = models::chunked_head::RowOutputs { value, metrics };
            kd_sums(rows, &None).0
        }
        _ => {
            let objective = models::chunked_head::TargetLogps { entropy: false };
            let aux = models::chunked_head::TargetLogps::aux(labels);
            loss(hidden.clone(), head, aux, &objective, chunked)
                .0
                .sum()
                .neg()
        }
    };
    let value = total.clone().into_scalar().elem::<f64>();
    let grads = total.backward();
    let g = hidden.grad(&grads).expect("a hidden gradient");
    let norm = g.powf_scalar(2.0).sum().sqrt().into_scalar().elem::<f64>();
    println!(
        "{{\"loss\": \"{kind}\", \"chunked\": {chunked}, \"positions\": {n}, \"vocab\": {VOCAB}, \
         \"chunk\": {}, \"peak_above_inputs_mb\": {:.1}, \"seconds\": {:.2}, \"value\": {value:.4}, \
         \"grad_norm\": {norm:.4}}}",
        chunk_positions(VOCAB),
        mb("VmHWM:") - base,
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: loss_memory sft|kd chunked|plain POSITIONS";
    let (Some(kind), Some(mode), Some(n)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let Ok(n) = n.parse::<usize>() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    run::<CpuTrain>(kind, mode == "chunked", n);
}
