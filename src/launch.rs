//! `burnish launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A
//! --master-port P] -- train --recipe R ...`: start this machine's ranks of a data-parallel
//! job (torchrun's environment: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
//! forward signals to them, and when one fails, stop the others and exit with the failed
//! rank's code after repeating its last lines of output.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
pub struct Args {
    /// Ranks (processes) to start on this machine: one per GPU, each training on
    /// `cuda:LOCAL_RANK` with `--device cuda`.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines in the job, and this one's index (0 runs the coordinator).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of machine 0, reachable from every machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// First of the ports the job uses on machine 0 (the next one too, and on every
    /// machine the ports above for each rank's tensor service).
    #[arg(long, default_value_t = trainers::parallel::topology::DEFAULT_MASTER_PORT)]
    pub master_port: u16,
    /// Lines of a failed rank's output repeated at the end.
    #[arg(long, default_value_t = 30)]
    pub tail_lines: usize,
    /// Once a rank failed: seconds the others get to stop by themselves (their watchdog
    /// notices within moments and says why), then after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
    /// The burnish command every rank runs, after `--` (`train --recipe R ...`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Under a launcher (`BURNISH_LAUNCHER_PID`), end this rank if the launcher goes away (it
/// was killed outright and could not stop its ranks).
pub fn watch_launcher() {
    let Some(pid) = std::env::var("BURNISH_LAUNCHER_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("launcher-watch".into())
        .spawn(move || loop {
            if std::os::unix::process::parent_id() != pid {
                eprintln!("error: the launcher (pid {pid}) is gone; stopping this rank");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(500));
        });
}

type Tail = Arc<Mutex<VecDeque<String>>>;

/// Copy a rank's stream to ours line by line, prefixed with its rank, keeping the last
/// lines for the failure report.
fn forward(
    stream: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    tail: Tail,
    keep: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            t.push_back(line);
            while t.len() > keep {
                t.pop_front();
            }
        }
    })
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The shell's view of an exit: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!(
            "was killed by signal {s}{}",
            match s {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            }
        ),
        _ => format!("ended ({status})"),
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.nproc_per_node == 0 || a.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if a.node_rank >= a.nnodes {
        bail!(
            "--node-rank {} is out of range for --nnodes {}",
            a.node_rank,
            a.nnodes
        );
    }
    if a.command.first().map(String::as_str) != Some("train") {
        bail!("launch runs `train` on every rank: burnish launch ... -- train --recipe R.toml");
    }
    let world = a.nproc_per_node * a.nnodes;
    let exe = std::env::current_exe().context("cannot find the burnish executable")?;

    let interrupt = Arc::new(AtomicBool::new(false));
    let terminate = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupt.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, terminate.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGHUP, terminate.clone())?;

    let (done_tx, done_rx) = mpsc::channel::<(usize, ExitStatus)>();
    let mut pids = Vec::with_capacity(a.nproc_per_node);
    let mut tails: Vec<Tail> = Vec::new();
    let mut forwarders = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let mut child = Command::new(&exe)
            .args(&a.command)
            .env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("GROUP_RANK", a.node_rank.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string())
            .env("BURNISH_LAUNCHER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches the launcher only,
            // which forwards it once (twice would mean "quit without saving").
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let prefix = format!("[rank{rank}] ");
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        forwarders.push(forward(
            out,
            prefix.clone(),
            false,
            tail.clone(),
            a.tail_lines,
        ));
        forwarders.push(forward(err, prefix, true, tail.clone(), a.tail_lines));
        tails.push(tail);
        pids.push(child.id());
        let tx = done_tx.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send((local, status));
            }
        });
    }
    drop(done_tx);
    eprintln!(
        "burnish launch: started ranks {}..{} of {world} (pids {pids:?}), coordinator {}:{}",
        a.node_rank * a.nproc_per_node,
        (a.node_rank + 1) * a.nproc_per_node - 1,
        a.master_addr,
        a.master_port
    );

    let mut alive = vec![true; pids.len()];
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; pids.len()];
    let mut failed: Option<usize> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut interrupted = false;
    let mut terminated = false;
    let grace = Duration::from_secs_f64(a.grace.max(0.0));
    let send_all = |alive: &[bool], sig: i32| {
        for (pid, _) in pids.iter().zip(alive).filter(|(_, a)| **a) {
            signal(*pid, sig);
        }
    };
    while alive.iter().any(|a| *a) {
        if interrupt.swap(false, Ordering::SeqCst) {
            interrupted = true;
            send_all(&alive, libc::SIGINT);
        }
        if terminate.swap(false, Ordering::SeqCst) {
            interrupted = true;
            send_all(&alive, libc::SIGTERM);
        }
        if let Some(t) = stopping_since {
            if t.elapsed() >= 2 * grace {
                send_all(&alive, libc::SIGKILL);
                stopping_since = None;
            } else if t.elapsed() >= grace && !terminated {
                send_all(&alive, libc::SIGTERM);
                terminated = true;
            }
        }
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok((local, status)) => {
                alive[local] = false;
                statuses[local] = Some(status);
                if !status.success() && failed.is_none() {
                    failed = Some(local);
                    if !interrupted {
                        // One rank failed: the others cannot finish without it.
                        stopping_since = Some(Instant::now());
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    for f in forwarders {
        let _ = f.join();
    }
    let Some(local) = failed else {
        return Ok(());
    };
    let status = statuses[local].expect("a failed rank has a status");
    let rank = a.node_rank * a.nproc_per_node + local;
    let code = exit_code(status);
    if interrupted && code == 130 {
        std::process::exit(130);
    }
    let mut e = std::io::stderr().lock();
    let _ = writeln!(
        e,
        "burnish launch: rank {rank} (pid {}) {} first, and the job stopped. Its last lines:",
        pids[local],
        describe(status)
    );
    for line in tails[local]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(e, "  [rank{rank}] {line}");
    }
    drop(e);
    std::process::exit(code);
}
