//! Atomic file writes: the one implementation lives in `models::atomic`.

pub use models::atomic::{write, write_dir, AtomicFile};
