//! One rank of a data-parallel job: its place in the job, its collectives (burn-collective
//! under a watchdog) and its data-parallel step.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_collective::{
    all_reduce, finish_collective, register, AllReduceStrategy, CollectiveConfig, CollectiveError,
    PeerId, ReduceOperation,
};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::control::{wait_watched, ControlClient, RankStatus};
use super::topology::Topology;

/// Largest tensor one all-reduce carries (elements); bigger ones go in several. Each
/// global all-reduce sends its slices as single websocket messages, capped at 512 MiB.
const MAX_BUCKET: usize = 1 << 26;

/// A failure injected on purpose, to test the watchdog: `kill:RANK:STEP` (the rank's
/// process kills itself with SIGKILL) or `stall:RANK:STEP` (the rank stops forever), just
/// before the gradient all-reduce of optimizer step STEP (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    pub step: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Stall,
}

impl FromStr for Fault {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let [kind, rank, step] = parts[..] else {
            bail!("a fault is KIND:RANK:STEP (kill:1:2, stall:1:2), not `{s}`");
        };
        let kind = match kind {
            "kill" => FaultKind::Kill,
            "stall" => FaultKind::Stall,
            other => bail!("unknown fault `{other}`: kill or stall"),
        };
        Ok(Self {
            kind,
            rank: rank.parse().context("fault rank")?,
            step: step.parse().context("fault step")?,
        })
    }
}

/// Timeouts of the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Any collective of the training loop (gradients, stop flags).
    pub step: Duration,
    /// Registration and the setup barrier, where ranks wait for rank 0 to prepare the
    /// data, build or load the model and precompute caches.
    pub setup: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            step: Duration::from_secs(600),
            setup: Duration::from_secs(1800),
        }
    }
}

/// One rank: a model replica on one device, in a job of `world` replicas.
pub struct Replica {
    /// This replica's rank in the job (0 logs, shows progress and writes checkpoints).
    pub rank: usize,
    pub world: usize,
    /// Replicas in this process (they share burn-collective's local level).
    local_devices: usize,
    /// Set when the job spans several processes (burn-collective's global level).
    topology: Option<Topology>,
    control: ControlClient,
    pub timeouts: Timeouts,
    fault: Option<Fault>,
    /// Collectives entered so far, and the optimizer step being computed (0 = setup).
    seq: u64,
    pub(crate) step: u64,
    /// Whether any rank asked to stop (Ctrl-C), as of the last gradient all-reduce.
    stop_agreed: bool,
    /// Whether this rank already told the others to stop.
    aborted: bool,
    /// Time spent in collectives (waiting for the other ranks included), for benchmarks:
    /// all of them, and the gradient all-reduces of the steps alone (and their count).
    pub collective_time: Duration,
    pub gradient_sync_time: Duration,
    pub gradient_syncs: u64,
}

impl Replica {
    pub(crate) fn new(
        rank: usize,
        world: usize,
        local_devices: usize,
        topology: Option<Topology>,
        control: ControlClient,
        timeouts: Timeouts,
        fault: Option<Fault>,
    ) -> Self {
        Self {
            rank,
            world,
            local_devices,
            topology,
            control,
            timeouts,
            fault,
            seq: 0,
            step: 0,
            stop_agreed: false,
            aborted: false,
            collective_time: Duration::ZERO,
            gradient_sync_time: Duration::ZERO,
            gradient_syncs: 0,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// Whether a rank asked to stop; every rank sees the same answer after each step.
    pub fn stop_agreed(&self) -> bool {
        self.stop_agreed
    }

    pub(crate) fn set_stop_agreed(&mut self, v: bool) {
        self.stop_agreed = v;
    }

    /// Join the collective (every rank of the process registers; across processes,
    /// through the orchestrator on rank 0's machine). `B` is the backend gradients live on
    /// (the inner backend of the autodiff one).
    pub(crate) fn register<B: Backend>(&mut self, device: B::Device) -> Result<()>
    where
        B::Device: 'static,
    {
        let mut config = CollectiveConfig::default().with_num_devices(self.local_devices);
        if let Some(t) = &self.topology {
            let host = t.node_host()?;
            let addr = |s: String| {
                burn_communication::Address::from_str(&s).expect("an address is any string")
            };
            config = config
                .with_num_nodes(t.processes as u32)
                .with_global_address(addr(format!(
                    "ws://{}:{}",
                    t.master_addr,
                    t.orchestrator_port()
                )))
                .with_node_address(addr(format!("ws://{host}:{}", t.data_port)))
                .with_data_service_port(t.data_port)
                .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
        }
        let peer = self.peer();
        let timeout = self.timeouts.setup;
        self.collective("register", timeout, move || {
            register::<B>(peer, device, config)
        })
    }

    /// Leave the collective after a run that finished (across processes this closes the
    /// connections to the orchestrator and the peers cleanly), then tell the coordinator.
    /// Best effort: the run is over whatever happens here.
    pub fn finish<B: Backend>(&mut self) {
        let peer = self.peer();
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("collective-finish-{}", self.rank))
            .spawn(move || {
                let _ = tx.send(finish_collective::<B>(peer));
            });
        if spawned.is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
        self.control.bye();
    }

    /// Tell every rank to stop because this one failed (unless the failure came from
    /// them, or this rank said so already).
    pub fn fail(&mut self, err: &anyhow::Error) {
        if self.control.abort_message().is_none() {
            self.abort(&format!("rank {} failed: {err:#}", self.rank));
        }
    }

    fn abort(&mut self, msg: &str) {
        if !self.aborted {
            self.aborted = true;
            self.control.abort(msg);
        }
    }

    /// Wait until every rank gets here (an all-reduce of nothing).
    pub fn barrier<B: Backend>(
        &mut self,
        what: &str,
        device: &B::Device,
        timeout: Duration,
    ) -> Result<()> {
        let t = Tensor::<B, 1>::zeros([self.world], device);
        self.all_reduce_sum(t, &format!("barrier({what})"), timeout)
            .map(|_| ())
    }

    /// Element-wise sum of `t` over all ranks; every rank gets the same result.
    pub fn all_reduce_sum<B: Backend>(
        &mut self,
        t: Tensor<B, 1>,
        op: &str,
        timeout: Duration,
    ) -> Result<Tensor<B, 1>> {
        let n = t.dims()[0];
        let buckets = n.div_ceil(MAX_BUCKET).max(1);
        if buckets == 1 {
            return self.all_reduce_one(t, op, timeout);
        }
        let mut out = Vec::with_capacity(buckets);
        for b in 0..buckets {
            let (lo, hi) = (b * n / buckets, (b + 1) * n / buckets);
            out.push(self.all_reduce_one(t.clone().slice(lo..hi), op, timeout)?);
        }
        Ok(Tensor::cat(out, 0))
    }

    fn all_reduce_one<B: Backend>(
        &mut self,
        t: Tensor<B, 1>,
        op: &str,
        timeout: Duration,
    ) -> Result<Tensor<B, 1>> {
        let peer = self.peer();
        let prim = t.into_primitive().tensor();
        let out = self.collective(op, timeout, move || {
            all_reduce::<B>(peer, prim, ReduceOperation::Sum)
        })?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Run a blocking collective call under the watchdog: say where this rank is, wait for
    /// the result, and stop every rank (naming the missing ones) when it does not come
    /// within `timeout` or another rank says stop.
    fn collective<T: Send + 'static>(
        &mut self,
        op: &str,
        timeout: Duration,
        call: impl FnOnce() -> std::result::Result<T, CollectiveError> + Send + 'static,
    ) -> Result<T> {
        self.seq += 1;
        self.control.arrive(self.seq, self.step, op);
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("collective-{}", self.rank))
            .spawn(move || {
                let _ = tx.send(call());
            })?;
        let res = wait_watched(&rx, &self.control, timeout);
        self.collective_time += started.elapsed();
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let failed = format!(
                    "rank {} was in {op} at {}, which failed in the collective layer: {e:?}",
                    self.rank,
                    self.at()
                );
                // A peer that died fails the collective; the coordinator says which one,
                // usually within milliseconds.
                let waited = Instant::now();
                while waited.elapsed() < Duration::from_secs(2) {
                    if let Some(told) = self.control.abort_message() {
                        bail!("{told}; {failed}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let msg = failed;
                self.abort(&msg);
                bail!(msg)
            }
            Err(Some(told)) => bail!("{told}"),
            Err(None) => {
                let msg = self.missing_message(op, timeout);
                self.abort(&msg);
                bail!(msg)
            }
        }
    }

    fn at(&self) -> String {
        if self.step == 0 {
            "setup".into()
        } else {
            format!("step {}", self.step)
        }
    }

    /// Who did not arrive, as the coordinator sees it.
    fn missing_message(&self, op: &str, timeout: Duration) -> String {
        let head = format!(
            "watchdog: {op} at {} timed out after {}s on rank {}",
            self.at(),
            timeout.as_secs_f64(),
            self.rank
        );
        let tail =
            "stopping every rank (raise --collective-timeout if a rank is legitimately this slow)";
        let Some(states) = self.control.states(Duration::from_secs(5)) else {
            return format!(
                "{head}; the coordinator did not answer, so the missing rank is unknown; {tail}"
            );
        };
        let missing: Vec<String> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq < self.seq || s.status != RankStatus::Alive)
            .map(|(r, s)| match s.status {
                RankStatus::Absent => format!("rank {r} never connected"),
                RankStatus::Dead => format!("rank {r} died (last seen at {})", s.describe()),
                _ => format!("rank {r} did not arrive (last seen at {})", s.describe()),
            })
            .collect();
        if missing.is_empty() {
            format!("{head}: every rank arrived, but the collective layer did not complete; {tail}")
        } else {
            format!("{head}: {}; {tail}", missing.join(", "))
        }
    }

    /// Injected failures, for the watchdog's tests.
    pub(crate) fn maybe_fail(&self, step: u64) {
        let Some(f) = self.fault else { return };
        if f.rank != self.rank || f.step != step {
            return;
        }
        match f.kind {
            FaultKind::Kill => {
                eprintln!(
                    "rank {}: injected fault: killing this process at step {step}",
                    self.rank
                );
                // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            FaultKind::Stall => {
                eprintln!(
                    "rank {}: injected fault: stalling forever at step {step}",
                    self.rank
                );
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}
