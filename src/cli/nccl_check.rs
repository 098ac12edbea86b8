//! `moeq nccl-check`: every collective of the NCCL communicator against the CPU collective
//! (`TcpComm`, the reference) on random data, on every rank of the job. One process per GPU:
//! run it alone (world 1) or under `moeq-launch --nproc N -- moeq nccl-check` (or torchrun).
//! Exit code 0 only if every comparison on every rank is within tolerance. This file joins the
//! job and prints; the comparisons are `gpu_check::nccl`, their tolerances (data movement
//! bit-exact, f32 sums 1e-6 and bf16 sums 1e-2 of the largest result) rows of
//! `gpu_check::tolerance::TOLERANCES`.

use super::CliError;

#[derive(clap::Args, Debug)]
pub struct NcclCheckArgs {
    /// Seed of the random data (each rank draws its own streams from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Instead (one rank): queue a receive nobody sends, so the GPU waits in NCCL as behind a
    /// dead peer, and check that aborting the communicator (what a stopped rank does before it
    /// exits) releases it and that later collectives fail cleanly.
    #[arg(long)]
    stuck: bool,
}

#[cfg(not(feature = "nccl"))]
pub fn run(_args: NcclCheckArgs) -> Result<(), CliError> {
    Err(CliError::Input(
        "nccl-check: this moeq was built without NCCL; rebuild with `cargo build --release --features cuda,nccl`".into(),
    ))
}

#[cfg(feature = "nccl")]
pub fn run(args: NcclCheckArgs) -> Result<(), CliError> {
    imp::run(args)
}

#[cfg(feature = "nccl")]
mod imp {
    use super::{CliError, NcclCheckArgs};
    use crate::distributed::nccl::NcclComm;
    use crate::distributed::store::{StoreClient, StoreOptions, StoreServer};
    use crate::distributed::{resolve, Communicator, EnvSource, RankFlags, TcpComm};
    use crate::gpu_check::nccl::Collectives;
    use candle_core::{Device, Tensor};
    use std::time::Duration;

    /// The job token when MOEQ_JOB_TOKEN is not set (a check on one machine).
    const DEFAULT_TOKEN: &str = "moeq-nccl-check";

    /// `--stuck`: a receive with no send holds the GPU; `abort_comm` must release it within
    /// 30 s, and a collective after it must fail with the abort named.
    fn stuck(nccl: &NcclComm, gpu: &Device) -> std::result::Result<(), CliError> {
        use std::time::Instant;
        let fail = |m: String| CliError::Failed(format!("nccl-check --stuck: {m}"));
        nccl.queue_stuck_receive()
            .map_err(|e| fail(format!("queueing the receive: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gpu.clone();
        std::thread::spawn(move || {
            let _ = tx.send(g.synchronize().map_err(|e| e.to_string()));
        });
        if let Ok(r) = rx.recv_timeout(Duration::from_secs(3)) {
            return Err(fail(format!(
                "the receive with no send did not hold the GPU (synchronize returned {r:?})"
            )));
        }
        println!("nccl-check --stuck: the GPU waits in ncclRecv (3 s): aborting the communicator");
        let t = Instant::now();
        if !nccl.abort_comm() {
            return Err(fail("the communicator could not be aborted".into()));
        }
        let released = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| fail("ncclCommAbort did not release the GPU within 30 s".into()))?;
        println!(
            "nccl-check --stuck: released {:.2} s after ncclCommAbort (synchronize: {})",
            t.elapsed().as_secs_f64(),
            match &released {
                Ok(()) => "ok".to_string(),
                Err(e) => e.clone(),
            }
        );
        match nccl.barrier() {
            Err(e) if e.to_string().contains("aborted") => {
                println!("nccl-check --stuck: a barrier after the abort fails: {e}");
                Ok(())
            }
            other => Err(fail(format!("a barrier after the abort gave {other:?}"))),
        }
    }

    pub fn run(args: NcclCheckArgs) -> std::result::Result<(), CliError> {
        let env =
            resolve(&RankFlags::default(), &|k| std::env::var(k).ok()).map_err(CliError::input)?;
        let token = std::env::var("MOEQ_JOB_TOKEN").unwrap_or_else(|_| DEFAULT_TOKEN.into());
        let single = env.source == EnvSource::Single;
        // One process alone picks a free port; a job uses its master address.
        let addr = if single {
            "127.0.0.1:0".to_string()
        } else {
            format!("{}:{}", env.master_addr, env.master_port)
        };
        let server = if env.rank == 0 {
            let s = StoreServer::start(&addr, StoreOptions::new(env.world_size, &token))
                .map_err(CliError::failed)?;
            Some(s)
        } else {
            None
        };
        let connect_to = match &server {
            Some(s) if single => s.addr.to_string(),
            _ => addr,
        };
        let connect = || {
            StoreClient::connect(
                &connect_to,
                &token,
                env.rank as u32,
                Duration::from_secs(120),
            )
            .map_err(CliError::failed)
        };
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| {
            CliError::Failed(format!("nccl-check: cannot count CUDA devices: {e:?}"))
        })?;
        if count < 1 {
            return Err(CliError::Failed("nccl-check: no CUDA device".into()));
        }
        let ordinal = env.local_rank % count as usize;
        let gpu = Device::new_cuda(ordinal).map_err(CliError::failed)?;
        println!(
            "nccl-check: rank {} of {} (local rank {}) on cuda:{ordinal}, NCCL {}",
            env.rank,
            env.world_size,
            env.local_rank,
            nccl_version()
        );
        let nccl = NcclComm::new(connect()?, env.rank, env.world_size, &gpu)
            .map_err(|e| CliError::Failed(format!("nccl-check: {e}")))?;
        if args.stuck {
            if env.world_size != 1 {
                return Err(CliError::Input(
                    "nccl-check --stuck runs on one rank (no launcher)".into(),
                ));
            }
            return stuck(&nccl, &gpu);
        }
        let tcp = TcpComm::new(connect()?, env.rank);
        let checks = Collectives {
            nccl: &nccl,
            tcp: &tcp,
            gpu,
            rank: env.rank,
            world: env.world_size,
            seed: args.seed,
        };
        let lines = match checks.run_all() {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("nccl-check: {e}");
                nccl.abort(&msg);
                return Err(CliError::Failed(msg));
            }
        };
        let mut failed = 0usize;
        for l in &lines {
            println!("{l}");
            failed += usize::from(!l.passed());
        }
        // The verdict of the whole job, so every rank exits the same way.
        let all_failed = tcp
            .all_reduce_sum(&Tensor::new(&[failed as f32], &Device::Cpu).map_err(CliError::failed)?)
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(CliError::failed)?
            .first()
            .copied()
            .unwrap_or(f32::NAN);
        tcp.barrier().map_err(CliError::failed)?;
        println!(
            "nccl-check: world {}: {} passed, {failed} failed on rank {}; {all_failed} failed on all ranks",
            env.world_size,
            lines.len() - failed,
            env.rank
        );
        // The checks ran to the end (their verdict is the exit code): leaving is no failure.
        tcp.finish();
        nccl.finish();
        drop(tcp);
        drop(nccl);
        if let Some(s) = server {
            s.wait_all_left(Duration::from_secs(30));
        }
        if all_failed != 0.0 {
            return Err(CliError::Failed(format!(
                "nccl-check: {all_failed} comparison(s) failed across the job"
            )));
        }
        Ok(())
    }

    fn nccl_version() -> String {
        match cudarc::nccl::result::get_nccl_version() {
            Ok(v) => format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            Err(_) => "(version unknown)".into(),
        }
    }
}
