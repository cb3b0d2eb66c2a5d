//! An opt-in record of the distinct (operation, input shapes) signatures the model's forward
//! sees, on the CPU as anywhere: a JIT backend (CUDA) compiles and autotunes kernels per
//! shape, so the number of distinct signatures a job produces is the number of compilations
//! it will pay for. Recording is per thread (tests running side by side do not mix) and off
//! unless a [`Recording`] is alive on the thread or `BURNISH_SHAPE_AUDIT=1` is set.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::OnceLock;

/// An operation's name and its input dims, concatenated.
pub type Signature = (&'static str, Vec<usize>);

thread_local! {
    static SEEN: RefCell<Option<BTreeSet<Signature>>> = const { RefCell::new(None) };
}

fn env_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("BURNISH_SHAPE_AUDIT").is_ok_and(|v| v == "1"))
}

/// Note that `op` ran on inputs of these dims (concatenated); a no-op unless recording.
pub fn record(op: &'static str, dims: &[&[usize]]) {
    SEEN.with(|s| {
        let mut seen = s.borrow_mut();
        if seen.is_none() && !env_enabled() {
            return;
        }
        let key = (op, dims.iter().flat_map(|d| d.iter().copied()).collect());
        seen.get_or_insert_with(BTreeSet::new).insert(key);
    });
}

/// With `BURNISH_SHAPE_AUDIT=1`, print this thread's distinct signatures per operation to
/// stderr (the CLI calls it when a command ends; training and generation run on its thread).
pub fn report_if_requested() {
    if !env_enabled() {
        return;
    }
    let signatures = signatures();
    eprintln!(
        "shape audit: {} distinct (operation, input shapes) signatures",
        signatures.len()
    );
    let mut ops: Vec<&str> = signatures.iter().map(|(op, _)| *op).collect();
    ops.dedup();
    for op in ops {
        eprintln!("  {op}: {}", count(op));
    }
}

/// Signatures recorded on this thread so far, sorted.
pub fn signatures() -> Vec<Signature> {
    SEEN.with(|s| s.borrow().iter().flatten().cloned().collect())
}

/// Distinct signatures of `op` recorded on this thread so far.
pub fn count(op: &str) -> usize {
    SEEN.with(|s| {
        s.borrow()
            .iter()
            .flatten()
            .filter(|(o, _)| *o == op)
            .count()
    })
}

/// Records on this thread from creation until dropped, starting empty.
pub struct Recording(());

impl Recording {
    pub fn start() -> Self {
        SEEN.with(|s| *s.borrow_mut() = Some(BTreeSet::new()));
        Recording(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        SEEN.with(|s| *s.borrow_mut() = None);
    }
}
