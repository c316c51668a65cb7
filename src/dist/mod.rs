//! Several processes training one adapter: who is who (the launchers' environment variables:
//! torchrun's `RANK` / `WORLD_SIZE` / `MASTER_ADDR` / `MASTER_PORT`, SLURM's `SLURM_PROCID` /
//! `SLURM_NTASKS` / `SLURM_NODELIST`), and the collectives the trainer needs (an averaging
//! all-reduce of the gradient buffer, a broadcast from rank 0).
//!
//! The collectives here run over TCP ([`tcp`]): it is the CPU backend, for CPU ranks and for
//! the tests that run real processes in CI. GPU ranks need NCCL, which this build does not
//! have; `lora run` refuses several CUDA ranks rather than copy gradients through the host.
//! `docs/distributed.md` says what each rank does.

pub mod launch;
pub mod tcp;

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Which launcher set the variables a [`World`] was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything that sets `RANK` and `WORLD_SIZE`, as torch.distributed does).
    Torchrun,
    /// `srun`: `SLURM_PROCID` / `SLURM_NTASKS`.
    Slurm,
}

/// This process's place in a job of several processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank on this machine (`LOCAL_RANK`, `SLURM_LOCALID`): the GPU it would use.
    pub local_rank: usize,
    /// Where rank 0 listens: `MASTER_ADDR`, or SLURM's first host.
    pub master_addr: String,
    /// The launcher's own port (`MASTER_PORT`; under SLURM, Lightning's rule when unset).
    pub master_port: u16,
    pub launcher: Launcher,
}

/// The port our collectives use when neither `[distributed] port` nor `LORA_DIST_PORT` says:
/// the one after the launcher's (torchrun's own store holds `MASTER_PORT`).
pub const PORT_OFFSET: u16 = 1;

impl World {
    /// Read the launcher's variables from `env`; `None` when this is a single process (no
    /// launcher, or a world of one).
    pub fn from_vars(env: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match env(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).with_context(|| format!("environment variable {k}={v:?} is not a whole number")),
            }
        };
        if let (Some(rank), Some(size)) = (num("RANK")?, num("WORLD_SIZE")?) {
            if size <= 1 {
                return Ok(None);
            }
            if rank >= size {
                bail!("RANK={rank} is not below WORLD_SIZE={size}");
            }
            let addr = env("MASTER_ADDR").context("WORLD_SIZE > 1 but MASTER_ADDR is unset (torchrun sets it; set it to rank 0's host)")?;
            let port = num("MASTER_PORT")?.context("WORLD_SIZE > 1 but MASTER_PORT is unset (torchrun sets it)")?;
            let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
            return Ok(Some(Self { rank, size, local_rank, master_addr: addr, master_port: port_u16(port, "MASTER_PORT")?, launcher: Launcher::Torchrun }));
        }
        if let (Some(rank), Some(size)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            if size <= 1 {
                return Ok(None);
            }
            let nodes = env("SLURM_NODELIST").or_else(|| env("SLURM_JOB_NODELIST")).context("SLURM_NTASKS > 1 but SLURM_NODELIST is unset")?;
            let addr = match env("MASTER_ADDR") {
                Some(a) => a,
                None => first_host(&nodes).with_context(|| format!("cannot read the first host of SLURM_NODELIST={nodes:?}"))?,
            };
            let port = match num("MASTER_PORT")? {
                Some(p) => port_u16(p, "MASTER_PORT")?,
                None => lightning_port(env("SLURM_JOB_ID").as_deref()),
            };
            let local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
            return Ok(Some(Self { rank, size, local_rank, master_addr: addr, master_port: port, launcher: Launcher::Slurm }));
        }
        Ok(None)
    }

    /// [`Self::from_vars`] on this process's environment.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

fn port_u16(p: usize, what: &str) -> Result<u16> {
    u16::try_from(p).ok().filter(|&p| p > 0).with_context(|| format!("{what}={p} is not a port number"))
}

/// PyTorch Lightning's port for a SLURM job: 15000 plus the last four digits of the job id
/// (12910 without one).
pub fn lightning_port(job_id: Option<&str>) -> u16 {
    match job_id.and_then(|id| {
        let digits: String = id.chars().filter(char::is_ascii_digit).collect();
        let tail = &digits[digits.len().saturating_sub(4)..];
        tail.parse::<u16>().ok()
    }) {
        Some(n) => 15000 + n,
        None => 12910,
    }
}

/// The first host of a SLURM node list: `node[01-04,07],gpu5` → `node01`, `a,b` → `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_item_end = {
        let mut depth = 0;
        let mut end = list.len();
        for (i, c) in list.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        end
    };
    let item = &list[..first_item_end];
    match item.split_once('[') {
        None => (!item.is_empty()).then(|| item.to_string()),
        Some((prefix, rest)) => {
            let inner = rest.strip_suffix(']')?;
            let first = inner.split(',').next()?;
            let start = first.split('-').next()?;
            Some(format!("{prefix}{start}"))
        }
    }
}

/// How long a collective waits for a rank before the job ends with its name: NCCL's
/// `NCCL_TIMEOUT`-like bound, `[distributed] timeout_s` (default 300 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The collectives of a job: rank 0 and the others, connected.
pub type Comm = tcp::TcpComm;

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        let w = World::from_vars(vars(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")])).unwrap().unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_port, w.launcher), (1, 2, 1, 29500, Launcher::Torchrun));
        assert_eq!(World::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(), None);
        assert_eq!(World::from_vars(vars(&[])).unwrap(), None);
        let s = World::from_vars(vars(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "3"), ("SLURM_NODELIST", "gpu[07-08]"), ("SLURM_JOB_ID", "4242123")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.rank, s.size, s.local_rank, s.master_addr.as_str(), s.master_port), (3, 16, 3, "gpu07", 17123));
        assert!(World::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])).is_err());
        assert!(World::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])).unwrap_err().to_string().contains("MASTER_ADDR"));
    }

    #[test]
    fn first_host_of_a_node_list() {
        assert_eq!(first_host("node[01-04,07],gpu5").as_deref(), Some("node01"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host("n[3,5]").as_deref(), Some("n3"));
        assert_eq!(lightning_port(Some("123")), 15123);
        assert_eq!(lightning_port(None), 12910);
    }
}
