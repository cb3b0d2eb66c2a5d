//! Data-parallel training: one model replica per device, each training on its share of
//! every global batch; gradients are summed with burn-collective before each optimizer
//! step, so every replica applies the same update. Replicas are threads of one process
//! (burn-collective's local level) and, across processes and machines, one process per
//! group of devices (its global level: an orchestrator on rank 0's machine, tensors sent
//! peer to peer over websockets). Every collective runs under a watchdog (see [`control`]).

pub mod control;
mod driver;
mod gradients;
mod replica;
pub mod topology;

pub use driver::{run_replicas, train_data_parallel, ParallelOptions};
pub use gradients::shard_range;
pub use replica::{Fault, FaultKind, Replica, Timeouts};
pub use topology::Topology;
