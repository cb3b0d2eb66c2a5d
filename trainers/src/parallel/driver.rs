//! Start the replicas of this process (one thread per device), connect them to the job
//! (coordinator, orchestrator) and collect their outcome.

use anyhow::{anyhow, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::control::{ControlClient, ControlServer};
use super::replica::{Fault, Replica, Timeouts};
use super::topology::Topology;
use crate::options::{TrainOptions, TrainReport};
use crate::recipe::Recipe;
use crate::replicas::Replicas;
use crate::session::train_on;

/// How a data-parallel run is watched.
#[derive(Debug, Clone, Default)]
pub struct ParallelOptions {
    pub timeouts: Timeouts,
    /// A failure to inject (tests of the watchdog).
    pub fault: Option<Fault>,
}

/// burn-collective keeps one collective per backend per process: one data-parallel run at
/// a time (tests run in parallel threads).
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Keeps burn-collective's global orchestrator running (on process 0) until dropped.
struct Orchestrator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Orchestrator {
    fn start(port: u16) -> Result<Self> {
        // Fail here, clearly, if the port is taken (the orchestrator would only log it).
        std::net::TcpListener::bind(("0.0.0.0", port)).with_context(|| {
            format!("the collective orchestrator cannot listen on port {port} (set MASTER_PORT to a free port)")
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("collective-orchestrator".into())
            .spawn(move || {
                runtime.block_on(burn_collective::start_global_orchestrator_with_shutdown(
                    port,
                    async move {
                        let _ = rx.await;
                    },
                ))
            })?;
        Ok(Self { stop: Some(tx) })
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Run `body` once per device of `devices`, each in its own thread with its [`Replica`],
/// registered with the collective: this process's replicas of a data-parallel job. With
/// `topology`, this process is one of several, each with as many devices (ranks are
/// numbered process by process); process 0 hosts the watchdog's coordinator and
/// burn-collective's orchestrator. Returns this process's results in rank order; the first
/// failure of any rank stops every rank and is returned.
pub fn run_replicas<B, T, F>(
    devices: Vec<B::Device>,
    topology: Option<Topology>,
    popts: &ParallelOptions,
    body: F,
) -> Result<Vec<T>>
where
    B: AutodiffBackend,
    B::Device: 'static,
    T: Send + 'static,
    F: Fn(&mut Replica, &B::Device) -> Result<T> + Send + Sync + 'static,
{
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Forget what an earlier run in this process left (a run that failed mid-collective).
    burn_collective::reset_collective::<B::InnerBackend>();
    let local = devices.len();
    anyhow::ensure!(
        local > 0,
        "data-parallel training needs at least one device"
    );
    let (processes, process_rank) = topology
        .as_ref()
        .map_or((1, 0), |t| (t.processes, t.process_rank));
    let world = local * processes;
    let first_rank = process_rank * local;
    let timeouts = popts.timeouts;

    let (server, control_addr) = match &topology {
        None => {
            let s = ControlServer::start("127.0.0.1:0", world)?;
            let addr = s.addr().to_string();
            (Some(s), addr)
        }
        Some(t) => {
            let server = if t.process_rank == 0 {
                Some(ControlServer::start(
                    &format!("0.0.0.0:{}", t.control_port()),
                    world,
                )?)
            } else {
                None
            };
            (server, format!("{}:{}", t.master_addr, t.control_port()))
        }
    };
    let _orchestrator = match &topology {
        Some(t) if t.process_rank == 0 => Some(Orchestrator::start(t.orchestrator_port())?),
        _ => None,
    };

    let body = std::sync::Arc::new(body);
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    let mut handles = Vec::with_capacity(local);
    for (i, device) in devices.into_iter().enumerate() {
        let rank = first_rank + i;
        let tx = tx.clone();
        let body = body.clone();
        let control_addr = control_addr.clone();
        let topology = topology.clone();
        let fault = popts.fault;
        let multi_process = topology.is_some();
        let h = std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .stack_size(64 << 20)
            .spawn(move || {
                let run = || -> Result<T> {
                    let deadline = Instant::now() + timeouts.setup;
                    let control =
                        ControlClient::connect(&control_addr, rank, deadline, multi_process)?;
                    let mut replica =
                        Replica::new(rank, world, local, topology, control, timeouts, fault);
                    let res = replica
                        .register::<B::InnerBackend>(device.clone())
                        .and_then(|()| body(&mut replica, &device));
                    match &res {
                        Ok(_) => replica.finish::<B::InnerBackend>(),
                        Err(e) => replica.fail(e),
                    }
                    res
                };
                let _ = tx.send((rank, run()));
            })?;
        handles.push(h);
    }
    drop(tx);
    let mut results: Vec<(usize, T)> = Vec::with_capacity(local);
    for _ in 0..local {
        match rx.recv() {
            Ok((_, Err(e))) => return Err(e),
            Ok((rank, Ok(r))) => results.push((rank, r)),
            Err(_) => {
                return Err(anyhow!(
                    "a data-parallel rank ended without a result (it panicked)"
                ))
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    if let Some(s) = &server {
        // Ranks of other processes may still be finishing; keep the coordinator (and the
        // orchestrator) up for them.
        s.wait_all_finished(Duration::from_secs(60));
    }
    results.sort_by_key(|(r, _)| *r);
    Ok(results.into_iter().map(|(_, t)| t).collect())
}

/// Train `recipe` data-parallel (see [`run_replicas`]): only rank 0 is verbose, shows
/// progress, logs and writes. Returns the report of this process's first replica (rank
/// 0's on process 0).
pub fn train_data_parallel<B: AutodiffBackend>(
    recipe: &Recipe,
    opts: &TrainOptions<'static>,
    devices: Vec<B::Device>,
    topology: Option<Topology>,
    popts: &ParallelOptions,
) -> Result<TrainReport>
where
    B::Device: 'static,
{
    let recipe = recipe.clone();
    let (resume, show_progress, stop, verbose, stop_after_steps) = (
        opts.resume.clone(),
        opts.show_progress,
        opts.stop,
        opts.verbose,
        opts.stop_after_steps,
    );
    let reports = run_replicas::<B, _, _>(devices, topology, popts, move |replica, device| {
        let main = replica.is_main();
        let rank_opts = TrainOptions {
            resume: resume.clone(),
            show_progress: show_progress && main,
            stop,
            verbose: verbose && main,
            stop_after_steps,
        };
        train_on::<B>(
            &recipe,
            &rank_opts,
            device,
            Some(replica as &mut dyn Replicas<B>),
        )
    })?;
    Ok(reports.into_iter().next().expect("one report per device"))
}
