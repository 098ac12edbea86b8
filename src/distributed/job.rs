//! Joining a multi-process job: rank 0 hosts the rendezvous store at the master address,
//! every rank connects with the job token, starts heartbeats and builds its communicator
//! (NCCL for a GPU run in an `nccl` build, the CPU collective otherwise).
//!
//! Environment: `MOEQ_JOB_TOKEN` (set by moeq-launch; under torchrun or srun without it, a
//! token is derived from the job id, with a warning that it is not secret),
//! `MOEQ_RENDEZVOUS_TIMEOUT` (seconds to wait for rank 0's store, default 300),
//! `MOEQ_COLLECTIVE_TIMEOUT` (seconds a collective may wait for the other ranks, default 300).

use super::env::DistEnv;
use super::store::{StoreClient, StoreOptions, StoreServer};
use super::{Communicator, TcpComm};
use crate::config::DeviceChoice;
use crate::util::device;
use std::sync::Arc;
use std::time::Duration;

/// Where this process stands in the job: its collectives and its GPU slot on the node.
pub struct RankCtx {
    pub comm: Arc<dyn Communicator>,
    pub local_rank: usize,
    /// Started as part of a job (launcher, torchrun, srun): the distributed path runs even
    /// with one rank, so its collectives are exercised the same way on any world size.
    pub joined: bool,
}

impl RankCtx {
    pub fn solo() -> RankCtx {
        RankCtx {
            comm: Arc::new(super::Solo),
            local_rank: 0,
            joined: false,
        }
    }
}

pub struct Job {
    env: DistEnv,
    token: String,
    addr: String,
    server: Option<StoreServer>,
}

fn secs(var: &str, default: u64) -> Result<Duration, String> {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{var}='{v}' is not a positive number of seconds")),
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

/// The job token: MOEQ_JOB_TOKEN, else derived from the launcher's job id.
fn token() -> Result<String, String> {
    if let Ok(t) = std::env::var("MOEQ_JOB_TOKEN") {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    for var in ["TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"] {
        if let Ok(id) = std::env::var(var) {
            tracing::warn!(
                "MOEQ_JOB_TOKEN is not set: the store's token is derived from {var} (not secret); export MOEQ_JOB_TOKEN=$(openssl rand -hex 16) on every rank"
            );
            return Ok(format!("{var}:{id}"));
        }
    }
    Err("MOEQ_JOB_TOKEN is not set: start the ranks with moeq-launch, or export the same MOEQ_JOB_TOKEN on every rank".into())
}

impl Job {
    /// Hosts the store (rank 0) and checks that it can be reached; rank 0 binds the master
    /// address only. Under torchrun, its own store holds MASTER_PORT, so moeq's is on the next port.
    pub fn join(env: &DistEnv) -> Result<Job, String> {
        let token = token()?;
        let port = if std::env::var_os("TORCHELASTIC_RUN_ID").is_some() {
            env.master_port
                .checked_add(1)
                .ok_or("MASTER_PORT 65535 leaves no port for moeq's store")?
        } else {
            env.master_port
        };
        let addr = format!("{}:{port}", env.master_addr);
        let server = if env.rank == 0 {
            let mut opts = StoreOptions::new(env.world_size, &token);
            opts.heartbeat_timeout = secs("MOEQ_HEARTBEAT_TIMEOUT", 60)?;
            opts.join_timeout = secs("MOEQ_RENDEZVOUS_TIMEOUT", 300)?;
            Some(StoreServer::start(&addr, opts).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Job {
            env: env.clone(),
            token,
            addr,
            server,
        })
    }

    fn client(&self) -> Result<StoreClient, String> {
        let wait = secs("MOEQ_RENDEZVOUS_TIMEOUT", 300)?;
        let mut c = StoreClient::connect(&self.addr, &self.token, self.env.rank as u32, wait)
            .map_err(|e| e.to_string())?;
        c.set_timeout(secs("MOEQ_COLLECTIVE_TIMEOUT", 300)?);
        Ok(c)
    }

    /// This rank's communicator for the trainer.
    pub fn rank_ctx(&self, choice: &DeviceChoice) -> Result<RankCtx, String> {
        let mut client = self.client()?;
        super::store::WATCH.set_rank(self.env.rank);
        client
            .start_heartbeat(
                &self.token,
                Duration::from_secs(1),
                Some(&super::store::WATCH),
            )
            .map_err(|e| e.to_string())?;
        let comm: Arc<dyn Communicator> = self.communicator(choice, client)?;
        tracing::info!(
            "joined the job as rank {} of {} (store {}, {})",
            self.env.rank,
            self.env.world_size,
            self.addr,
            if self.uses_nccl(choice) {
                "NCCL"
            } else {
                "CPU collective"
            }
        );
        Ok(RankCtx {
            comm,
            local_rank: self.env.local_rank,
            joined: true,
        })
    }

    fn uses_nccl(&self, choice: &DeviceChoice) -> bool {
        cfg!(feature = "nccl") && *choice != DeviceChoice::Cpu && device::visible_gpus() > 0
    }

    #[allow(unused_variables)]
    fn communicator(
        &self,
        choice: &DeviceChoice,
        client: StoreClient,
    ) -> Result<Arc<dyn Communicator>, String> {
        #[cfg(feature = "nccl")]
        if self.uses_nccl(choice) {
            let device = device::device_for_rank(choice, self.env.local_rank)?;
            let comm =
                super::nccl::NcclComm::new(client, self.env.rank, self.env.world_size, &device)
                    .map_err(|e| e.to_string())?;
            return Ok(Arc::new(comm));
        }
        Ok(Arc::new(TcpComm::new(client, self.env.rank)))
    }

    /// Rank 0 keeps the store up until every rank has left (or the job failed).
    pub fn finish(self) {
        if let Some(s) = &self.server {
            s.wait_all_left(Duration::from_secs(30));
        }
    }
}
