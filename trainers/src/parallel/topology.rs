//! Where a process sits in a multi-process job, read from the variables torchrun, Slurm's
//! `srun` and `burnish launch` set.

use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};

/// The default rendezvous port (torchrun's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// One process of a job of several. Each process trains one replica per device it drives
/// (usually one); the job's ranks are numbered process by process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Processes in the job (torchrun's `WORLD_SIZE`) and this one's index (`RANK`).
    pub processes: usize,
    pub process_rank: usize,
    /// This process's index on its machine (`LOCAL_RANK`): picks its GPU and its port.
    pub local_rank: usize,
    /// Host of process 0, which runs the collective orchestrator and the watchdog's
    /// coordinator (`MASTER_ADDR`), and the first of the ports the job uses there
    /// (`MASTER_PORT`; the next one is the coordinator's).
    pub master_addr: String,
    pub master_port: u16,
    /// Port of this process's tensor service (peers download gradient slices from it):
    /// `BURNISH_DATA_PORT`, else `MASTER_PORT + 2 + LOCAL_RANK`.
    pub data_port: u16,
    /// Address the other machines reach this one at: `BURNISH_NODE_ADDR`, else the local
    /// address of the route to `MASTER_ADDR`.
    pub node_addr: Option<String>,
}

impl Topology {
    /// The job this process belongs to, from its environment; `None` when it is not one
    /// process of several.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any variable source. torchrun's variables win; Slurm's
    /// count only inside an `srun` step (`SLURM_STEP_NUM_TASKS`), not in the batch script.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let (processes, process_rank, local_rank) = if let Some(w) = num("WORLD_SIZE")? {
            let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            (w, rank, num("LOCAL_RANK")?.unwrap_or(0))
        } else if let Some(w) = num("SLURM_STEP_NUM_TASKS")? {
            let rank = num("SLURM_PROCID")?
                .context("SLURM_STEP_NUM_TASKS is set but SLURM_PROCID is not")?;
            (w, rank, num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(None);
        };
        if processes <= 1 {
            return Ok(None);
        }
        if process_rank >= processes {
            bail!("rank {process_rank} is out of range for a world of {processes} processes");
        }
        let master_addr = get("MASTER_ADDR")
            .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"))
            .context("MASTER_ADDR is not set: the address of the machine running rank 0")?;
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .with_context(|| format!("MASTER_PORT={p} is not a port"))?,
            None => DEFAULT_MASTER_PORT,
        };
        let data_port = match get("BURNISH_DATA_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .with_context(|| format!("BURNISH_DATA_PORT={p} is not a port"))?,
            None => master_port
                .checked_add(2 + local_rank as u16)
                .context("MASTER_PORT is too high to leave room for the data ports above it")?,
        };
        Ok(Some(Self {
            processes,
            process_rank,
            local_rank,
            master_addr,
            master_port,
            data_port,
            node_addr: get("BURNISH_NODE_ADDR"),
        }))
    }

    /// Port of the collective orchestrator, on process 0's machine.
    pub fn orchestrator_port(&self) -> u16 {
        self.master_port
    }

    /// Port of the watchdog's coordinator, on process 0's machine.
    pub fn control_port(&self) -> u16 {
        self.master_port.wrapping_add(1)
    }

    /// The address peers reach this process at: the configured one, or the local side of
    /// the route to the master (loopback when the master is local).
    pub fn node_host(&self) -> Result<String> {
        if let Some(a) = &self.node_addr {
            return Ok(a.clone());
        }
        let master = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve MASTER_ADDR {}", self.master_addr))?
            .next()
            .with_context(|| format!("MASTER_ADDR {} resolves to nothing", self.master_addr))?;
        if master.ip().is_loopback() {
            return Ok(master.ip().to_string());
        }
        // Connecting a UDP socket sends nothing; it only picks the route's local address.
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect(master)?;
        let ip: IpAddr = sock.local_addr()?.ip();
        Ok(ip.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() {
        let t = Topology::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "30000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.processes, t.process_rank, t.local_rank), (4, 3, 1));
        assert_eq!(
            (t.orchestrator_port(), t.control_port(), t.data_port),
            (30000, 30001, 30003)
        );
    }

    #[test]
    fn slurm_variables_only_inside_a_step() {
        let batch_script = [("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")];
        assert_eq!(Topology::from_vars(vars(&batch_script)).unwrap(), None);
        let t = Topology::from_vars(vars(&[
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.processes, t.process_rank), (2, 1));
        assert_eq!(
            (t.master_addr.as_str(), t.master_port),
            ("10.1.2.3", DEFAULT_MASTER_PORT)
        );
    }

    #[test]
    fn one_process_is_no_job_and_bad_values_are_named() {
        let one = [("WORLD_SIZE", "1"), ("RANK", "0")];
        assert_eq!(Topology::from_vars(vars(&one)).unwrap(), None);
        let e = Topology::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "h"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = Topology::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0")])).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }
}
