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
    /// Instead (one rank): run collectives in a loop while another thread aborts the
    /// communicator (what a stopped rank does before it exits): the loop's next collective must
    /// fail naming the abort, within seconds, without a crash or a deadlock.
    #[arg(long)]
    abort: bool,
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

    /// `--abort`: all-reduces on this thread, `abort_comm` from another after one second; the
    /// next collective must fail naming the abort within 10 s of it.
    fn abort(nccl: &NcclComm, gpu: &Device) -> std::result::Result<(), CliError> {
        use std::time::Instant;
        let fail = |m: String| CliError::Failed(format!("nccl-check --abort: {m}"));
        let x = Tensor::ones(1 << 20, candle_core::DType::F32, gpu).map_err(CliError::failed)?;
        let start = Instant::now();
        let (done, err, aborted_at) = std::thread::scope(|s| {
            let aborter = s.spawn(|| {
                std::thread::sleep(Duration::from_secs(1));
                (nccl.abort_comm(), Instant::now())
            });
            let mut done = 0usize;
            let err = loop {
                match nccl
                    .all_reduce_sum(&x)
                    .and_then(|y| y.sum_all()?.to_scalar::<f32>())
                {
                    Ok(_) => done += 1,
                    // The message, without the backtrace candle may append.
                    Err(e) => break e.to_string().lines().next().unwrap_or("").to_string(),
                }
                if start.elapsed() > Duration::from_secs(30) {
                    break "no collective failed in 30 s".to_string();
                }
            };
            (done, err, aborter.join().ok())
        });
        let Some((true, at)) = aborted_at else {
            return Err(fail("the communicator could not be aborted".into()));
        };
        let after = at.elapsed();
        println!(
            "nccl-check --abort: {done} all-reduces, then ncclCommAbort from another thread; the next one failed {:.2} s later: {err}",
            after.as_secs_f64()
        );
        if done == 0 || !err.contains("aborted") || after > Duration::from_secs(10) {
            return Err(fail(format!("expected all-reduces, then a failure naming the abort within 10 s; got {done}, '{err}' after {after:?}")));
        }
        Ok(())
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
        if args.abort {
            if env.world_size != 1 {
                return Err(CliError::Input(
                    "nccl-check --abort runs on one rank (no launcher)".into(),
                ));
            }
            let r = abort(&nccl, &gpu);
            // The check ran to its end: leaving is no failure of the job.
            nccl.finish();
            return r;
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
