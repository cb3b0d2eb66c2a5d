//! The watchdog's coordinator: a small line protocol over TCP, beside the collective layer
//! (it carries no tensors). Every rank keeps one connection to the coordinator (hosted by
//! process 0) and says, before each collective, which one it enters. When a collective times
//! out, the waiting rank asks the coordinator who has not arrived and tells every rank to
//! stop, naming the missing rank, its step and the operation; when a rank's connection drops
//! (the process died or was killed) the coordinator tells the others at once. Without it a
//! missing peer leaves every other rank blocked in the collective forever.
//!
//! Messages, one per line, client to coordinator: `HELLO rank`, `AT seq step op`, `BYE`,
//! `ABORT text`, `QUERY`; coordinator to client: `ABORT text`, `DEAD rank`, `STATE json`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the coordinator knows of one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankState {
    /// Collectives entered so far (the one it is in, or last left).
    pub seq: u64,
    /// The optimizer step it was at (0 = setup, before the first step).
    pub step: u64,
    /// The collective it entered last.
    pub op: String,
    pub status: RankStatus,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankStatus {
    /// Not connected yet.
    #[default]
    Absent,
    Alive,
    /// Said goodbye after finishing.
    Finished,
    /// Its connection closed without a goodbye.
    Dead,
}

impl RankState {
    /// `step 3, all_reduce(gradients)` / `setup, register`.
    pub fn describe(&self) -> String {
        if self.seq == 0 {
            return "before its first collective".into();
        }
        let at = if self.step == 0 {
            "setup".to_string()
        } else {
            format!("step {}", self.step)
        };
        format!("{at}, {}", self.op)
    }
}

struct ServerState {
    ranks: Vec<RankState>,
    /// Write halves, for broadcasts.
    conns: Vec<Option<TcpStream>>,
    /// The first abort, replayed to ranks that connect later.
    abort: Option<String>,
}

impl ServerState {
    fn broadcast(&mut self, line: &str, except: Option<usize>) {
        for (r, c) in self.conns.iter_mut().enumerate() {
            if Some(r) == except {
                continue;
            }
            if let Some(s) = c {
                if writeln!(s, "{line}").is_err() {
                    *c = None;
                }
            }
        }
    }
}

/// The coordinator; it serves until the process exits.
pub struct ControlServer {
    addr: SocketAddr,
    state: Arc<Mutex<ServerState>>,
}

impl ControlServer {
    /// Listen on `bind` (`0.0.0.0:PORT`, or `127.0.0.1:0` for a single process) for `world`
    /// ranks.
    pub fn start(bind: &str, world: usize) -> Result<Self> {
        let listener = TcpListener::bind(bind).with_context(|| {
            format!("the data-parallel coordinator cannot listen on {bind} (is the port in use? set MASTER_PORT)")
        })?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ServerState {
            ranks: vec![RankState::default(); world],
            conns: (0..world).map(|_| None).collect(),
            abort: None,
        }));
        let shared = state.clone();
        std::thread::Builder::new()
            .name("dp-coordinator".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let state = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("dp-coordinator-conn".into())
                        .spawn(move || serve_connection(stream, state));
                }
            })?;
        Ok(Self { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait (up to `timeout`) until every rank has finished or died: the process hosting
    /// the coordinator must outlive the ranks still finishing elsewhere, or they would take
    /// its exit for a failure.
    pub fn wait_all_finished(&self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st
                .ranks
                .iter()
                .all(|r| matches!(r.status, RankStatus::Finished | RankStatus::Dead))
            {
                return;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn lock(s: &Mutex<ServerState>) -> std::sync::MutexGuard<'_, ServerState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve_connection(stream: TcpStream, state: Arc<Mutex<ServerState>>) {
    let _ = stream.set_nodelay(true);
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut rank: Option<usize> = None;
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let (cmd, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let mut st = lock(&state);
        match cmd {
            "HELLO" => {
                let Some(r) = rest
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|r| *r < st.ranks.len())
                else {
                    break;
                };
                rank = Some(r);
                st.ranks[r].status = RankStatus::Alive;
                let Ok(mut w) = stream.try_clone() else { break };
                if let Some(a) = &st.abort {
                    let _ = writeln!(w, "ABORT {a}");
                }
                st.conns[r] = Some(w);
            }
            "AT" => {
                let mut it = rest.splitn(3, ' ');
                let (Some(r), Some(seq), Some(step), Some(op)) = (
                    rank,
                    it.next().and_then(|v| v.parse().ok()),
                    it.next().and_then(|v| v.parse().ok()),
                    it.next(),
                ) else {
                    continue;
                };
                st.ranks[r] = RankState {
                    seq,
                    step,
                    op: op.to_string(),
                    status: RankStatus::Alive,
                };
            }
            "BYE" => {
                if let Some(r) = rank {
                    st.ranks[r].status = RankStatus::Finished;
                }
            }
            "ABORT" => {
                if st.abort.is_none() {
                    st.abort = Some(rest.to_string());
                }
                st.broadcast(&format!("ABORT {rest}"), rank);
            }
            "QUERY" => {
                let json = serde_json::to_string(&st.ranks).unwrap_or_default();
                if let Some(Some(w)) = rank.map(|r| &mut st.conns[r]) {
                    let _ = writeln!(w, "STATE {json}");
                }
            }
            _ => {}
        }
    }
    if let Some(r) = rank {
        let mut st = lock(&state);
        st.conns[r] = None;
        if st.ranks[r].status == RankStatus::Alive {
            st.ranks[r].status = RankStatus::Dead;
            let last = st.ranks[r].describe();
            st.broadcast(&format!("DEAD {r} {last}"), Some(r));
        }
    }
}

/// Why a rank must stop, as the coordinator said it.
#[derive(Default)]
struct Inbox {
    abort: Mutex<Option<String>>,
}

impl Inbox {
    fn set(&self, msg: String) {
        let mut a = self.abort.lock().unwrap_or_else(|e| e.into_inner());
        if a.is_none() {
            *a = Some(msg);
        }
    }
}

/// One rank's connection to the coordinator.
pub struct ControlClient {
    rank: usize,
    writer: Mutex<TcpStream>,
    inbox: Arc<Inbox>,
    replies: Mutex<Receiver<Vec<RankState>>>,
    /// Set after `BYE`: a late abort no longer concerns this rank.
    done: Arc<AtomicBool>,
}

/// How long a process that was told to stop gives its own rank to notice (and stop
/// through its normal error path) before the watchdog ends the process itself.
const ABORT_GRACE: Duration = Duration::from_secs(5);

impl ControlClient {
    /// Connect as `rank`, retrying until `deadline` (the coordinator may start later).
    /// With `exit_on_abort`, a stop order ends the whole process after a grace period, so
    /// a rank stuck outside any collective (a stalled one) stops too.
    pub fn connect(
        addr: &str,
        rank: usize,
        deadline: Instant,
        exit_on_abort: bool,
    ) -> Result<Self> {
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    bail!("rank {rank} cannot reach the data-parallel coordinator at {addr}: {e} (is rank 0 running? are MASTER_ADDR/MASTER_PORT right?)")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        writeln!(writer, "HELLO {rank}")?;
        let inbox = Arc::new(Inbox::default());
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        {
            let inbox = inbox.clone();
            let done = done.clone();
            std::thread::Builder::new()
                .name(format!("dp-watchdog-{rank}"))
                .spawn(move || read_loop(stream, tx, inbox, done, exit_on_abort))?;
        }
        Ok(Self {
            rank,
            writer: Mutex::new(writer),
            inbox,
            replies: Mutex::new(rx),
            done,
        })
    }

    fn send(&self, line: &str) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(w, "{line}");
    }

    /// Entering collective number `seq` (`op`) at `step`.
    pub fn arrive(&self, seq: u64, step: u64, op: &str) {
        self.send(&format!("AT {seq} {step} {op}"));
    }

    /// Why this rank must stop, once another rank (or the coordinator) said so.
    pub fn abort_message(&self) -> Option<String> {
        self.inbox
            .abort
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tell every rank to stop.
    pub fn abort(&self, msg: &str) {
        self.send(&format!("ABORT {}", msg.replace('\n', " ")));
    }

    /// Every rank's state, as the coordinator sees it (`None` if it does not answer).
    pub fn states(&self, timeout: Duration) -> Option<Vec<RankState>> {
        let rx = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        while rx.try_recv().is_ok() {}
        self.send("QUERY");
        rx.recv_timeout(timeout).ok()
    }

    /// Finished: the coordinator no longer counts this rank as missing.
    pub fn bye(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.send("BYE");
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
}

impl Drop for ControlClient {
    /// Close the connection itself (the reader thread holds a second handle to it), so the
    /// coordinator sees this rank leave even when its thread ends by panicking.
    fn drop(&mut self) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

fn read_loop(
    stream: TcpStream,
    replies: Sender<Vec<RankState>>,
    inbox: Arc<Inbox>,
    done: Arc<AtomicBool>,
    exit_on_abort: bool,
) {
    let mut reason = None;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let (cmd, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "STATE" => {
                if let Ok(s) = serde_json::from_str(rest) {
                    let _ = replies.send(s);
                }
            }
            "ABORT" => {
                reason = Some(rest.to_string());
                break;
            }
            "DEAD" => {
                let (rank, last) = rest.split_once(' ').unwrap_or((rest, "?"));
                reason = Some(format!(
                    "watchdog: rank {rank} died (its process ended without finishing; last seen at {last}); stopping every rank"
                ));
                break;
            }
            _ => {}
        }
    }
    if done.load(Ordering::SeqCst) {
        return;
    }
    let msg = reason.unwrap_or_else(|| {
        "lost the data-parallel coordinator (rank 0's process exited or the network failed); stopping".into()
    });
    inbox.set(msg.clone());
    if exit_on_abort {
        std::thread::sleep(ABORT_GRACE);
        if !done.load(Ordering::SeqCst) {
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}

/// Wait for `rx` like a collective's result, until `timeout`: a stop order from the
/// coordinator ends the wait early. `Err(None)` = timed out.
pub(crate) fn wait_watched<T>(
    rx: &Receiver<T>,
    client: &ControlClient,
    timeout: Duration,
) -> std::result::Result<T, Option<String>> {
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Some(
                    "the collective layer failed (its worker ended without an answer)".into(),
                ))
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(m) = client.abort_message() {
            return Err(Some(m));
        }
        if start.elapsed() >= timeout {
            return Err(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn coordinator_tracks_arrivals_and_reports_deaths() {
        let server = ControlServer::start("127.0.0.1:0", 3).unwrap();
        let addr = server.addr().to_string();
        let c0 = ControlClient::connect(&addr, 0, far(), false).unwrap();
        let c1 = ControlClient::connect(&addr, 1, far(), false).unwrap();
        let c2 = ControlClient::connect(&addr, 2, far(), false).unwrap();
        c0.arrive(4, 2, "all_reduce(gradients)");
        c1.arrive(4, 2, "all_reduce(gradients)");
        c2.arrive(3, 1, "all_reduce(gradients)");
        // Each connection has its own thread on the coordinator: wait for all three.
        let t = Instant::now();
        let s = loop {
            let s = c0.states(Duration::from_secs(5)).unwrap();
            if s.iter().map(|r| r.seq).collect::<Vec<_>>() == [4, 4, 3] {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{s:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(s[2].describe(), "step 1, all_reduce(gradients)");
        assert_eq!(s[1].status, RankStatus::Alive);
        drop(c2);
        let t = Instant::now();
        // The notice reaches each surviving rank on its own connection: wait for both.
        while (c0.abort_message().is_none() || c1.abort_message().is_none())
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(c0.abort_message().unwrap().contains("rank 2 died"));
        assert!(c1.abort_message().unwrap().contains("rank 2 died"));
    }

    #[test]
    fn aborts_reach_the_other_ranks_and_late_joiners() {
        let server = ControlServer::start("127.0.0.1:0", 2).unwrap();
        let addr = server.addr().to_string();
        let c0 = ControlClient::connect(&addr, 0, far(), false).unwrap();
        c0.abort("watchdog: rank 1 did not arrive");
        // Make sure the abort was processed before rank 1 connects.
        assert!(c0.states(Duration::from_secs(5)).is_some());
        let c1 = ControlClient::connect(&addr, 1, far(), false).unwrap();
        let t = Instant::now();
        while c1.abort_message().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            c1.abort_message().unwrap(),
            "watchdog: rank 1 did not arrive"
        );
        assert!(c0.abort_message().is_none());
        c0.bye();
        c1.bye();
    }
}
