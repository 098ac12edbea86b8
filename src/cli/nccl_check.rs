//! `moeq nccl-check`: every collective of the NCCL communicator against the CPU collective
//! (`TcpComm`, the reference) on random data, on every rank of the job. One process per GPU:
//! run it alone (world 1) or under `moeq-launch --nproc N -- moeq nccl-check` (or torchrun).
//! Exit code 0 only if every comparison on every rank is within tolerance.
//!
//! Tolerances. Data movement (all_gather, broadcast, all_to_all, exchange_counts) must be
//! bit-exact. Sums: the reference adds the ranks' values in rank order in f32 and rounds once;
//! NCCL adds in its ring/tree order in the tensor's dtype. f32 sums of ≤ 8 ranks then differ
//! only by summation order: ≤ (ranks − 1)·2⁻²⁴ of the summands' magnitude, so 1e-6 relative to
//! the largest result. bf16: each of NCCL's up to ranks − 1 additions rounds to bf16 (half an
//! ulp is 2⁻⁹ ≈ 2e-3 relative), so 1e-2.

use super::CliError;

#[derive(clap::Args, Debug)]
pub struct NcclCheckArgs {
    /// Seed of the random data (each rank draws its own streams from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    use crate::dist::comm::tensor_bytes;
    use crate::dist::nccl::NcclComm;
    use crate::dist::store::{StoreClient, StoreOptions, StoreServer};
    use crate::dist::{resolve, Communicator, EnvSource, RankFlags, TcpComm};
    use candle_core::{DType, Device, Result, Tensor};
    use rand::{Rng, RngCore};
    use std::time::{Duration, Instant};

    /// The job token when MOEQ_JOB_TOKEN is not set (a check on one machine).
    const DEFAULT_TOKEN: &str = "moeq-nccl-check";

    /// One comparison: `err` is a relative error (tolerance checks) or a count of
    /// mismatched elements (exact checks, `tol` 0).
    struct Line {
        what: String,
        err: f64,
        tol: f64,
        exact: bool,
        note: String,
    }

    impl Line {
        fn passed(&self) -> bool {
            self.err.is_finite() && self.err <= self.tol
        }
    }

    impl std::fmt::Display for Line {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let verdict = if self.passed() { "PASS" } else { "FAIL" };
            if self.exact {
                write!(
                    f,
                    "{verdict:<5} {:<52} mismatched {:>3} elements (exact)",
                    self.what, self.err
                )?;
            } else {
                write!(
                    f,
                    "{verdict:<5} {:<52} max rel err {:.3e} (tol {:.0e})",
                    self.what, self.err, self.tol
                )?;
            }
            if !self.note.is_empty() {
                write!(f, "  {}", self.note)?;
            }
            Ok(())
        }
    }

    /// Random CPU data of `dtype`, never all zeros: normal floats, full-range integers.
    fn random(rng: &mut rand_chacha::ChaCha8Rng, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        match dtype {
            DType::U32 => {
                Tensor::from_vec((0..n).map(|_| rng.next_u32()).collect(), dims, &Device::Cpu)
            }
            DType::I64 => Tensor::from_vec(
                (0..n).map(|_| rng.next_u64() as i64).collect(),
                dims,
                &Device::Cpu,
            ),
            DType::U8 => Tensor::from_vec(
                (0..n).map(|_| rng.random::<u8>()).collect(),
                dims,
                &Device::Cpu,
            ),
            float => {
                let v: Vec<f32> = (0..n)
                    .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
                    .collect();
                Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(float)
            }
        }
    }

    /// Elements whose bytes differ; every element when the shapes or dtypes differ.
    fn mismatches(got: &Tensor, want: &Tensor) -> Result<f64> {
        if got.dims() != want.dims() || got.dtype() != want.dtype() {
            return Ok(f64::INFINITY);
        }
        let size = want.dtype().size_in_bytes();
        let (g, w) = (tensor_bytes(got)?, tensor_bytes(want)?);
        Ok(g.chunks(size)
            .zip(w.chunks(size))
            .filter(|(a, b)| a != b)
            .count() as f64)
    }

    /// max |got − want| / max |want|.
    fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
        if got.dims() != want.dims() {
            return Ok(f64::INFINITY);
        }
        let g = got
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?;
        let w = want.to_dtype(DType::F64)?.flatten_all()?;
        let diff = (g - &w)?.abs()?.max(0)?.to_scalar::<f64>()?;
        let scale = w.abs()?.max(0)?.to_scalar::<f64>()?;
        Ok(if scale > 0.0 { diff / scale } else { diff })
    }

    struct Ctx<'a> {
        nccl: &'a NcclComm,
        tcp: &'a TcpComm,
        gpu: Device,
        rank: usize,
        world: usize,
        seed: u64,
    }

    impl Ctx<'_> {
        fn rng(&self, purpose: &str) -> rand_chacha::ChaCha8Rng {
            crate::data::rng_stream(
                self.seed,
                &format!("nccl-check/{purpose}"),
                self.rank as u64,
            )
        }

        fn exact(
            &self,
            what: String,
            got: &[Tensor],
            want: &[Tensor],
            note: String,
        ) -> Result<Line> {
            let mut err = if got.len() == want.len() {
                0.0
            } else {
                f64::INFINITY
            };
            for (g, w) in got.iter().zip(want) {
                err += mismatches(&g.to_device(&Device::Cpu)?, w)?;
            }
            Ok(Line {
                what,
                err,
                tol: 0.0,
                exact: true,
                note,
            })
        }

        fn all_reduce(&self, dtype: DType, tol: f64) -> Result<Vec<Line>> {
            let mut rng = self.rng(&format!("all_reduce/{dtype:?}"));
            let x = random(&mut rng, &[38, 19], dtype)?;
            // The input is a candle kernel's output at a storage offset: the collective must
            // wait for the kernel and honour the offset.
            let on_gpu = x.to_device(&self.gpu)?.affine(2.0, 0.0)?.narrow(0, 1, 37)?;
            let want = self
                .tcp
                .all_reduce_sum(&x.affine(2.0, 0.0)?.narrow(0, 1, 37)?)?;
            let got = self.nccl.all_reduce_sum(&on_gpu)?;
            let mut lines = vec![Line {
                what: format!("all_reduce_sum {dtype:?} [37, 19] (offset input)"),
                err: rel_err(&got, &want)?,
                tol,
                exact: false,
                note: String::new(),
            }];
            // Every rank must hold the same bits.
            let mine = got.to_device(&Device::Cpu)?;
            let all = self.tcp.all_gather(&mine)?;
            let mut diff = 0.0;
            for other in &all {
                diff += mismatches(other, &all[0])?;
            }
            lines.push(Line {
                what: format!("all_reduce_sum {dtype:?} identical on every rank"),
                err: diff,
                tol: 0.0,
                exact: true,
                note: String::new(),
            });
            Ok(lines)
        }

        fn all_reduce_host(&self) -> Result<Line> {
            let x = random(&mut self.rng("all_reduce/host"), &[5, 7], DType::F32)?;
            let got = self.nccl.all_reduce_sum(&x)?;
            let want = self.tcp.all_reduce_sum(&x)?;
            let on_host = got.device().is_cpu();
            Ok(Line {
                what: "all_reduce_sum F32 [5, 7] host tensor".into(),
                err: if on_host {
                    rel_err(&got, &want)?
                } else {
                    f64::INFINITY
                },
                tol: 1e-6,
                exact: false,
                note: if on_host {
                    String::new()
                } else {
                    "result not on the host".into()
                },
            })
        }

        /// `rows(r)` rows of shape `rest` on rank r.
        fn all_gather(
            &self,
            name: &str,
            dtype: DType,
            rows: impl Fn(usize) -> usize,
            rest: &[usize],
        ) -> Result<Line> {
            let mut dims = vec![rows(self.rank)];
            dims.extend_from_slice(rest);
            let x = random(&mut self.rng(&format!("all_gather/{name}")), &dims, dtype)?;
            let want = self.tcp.all_gather(&x)?;
            let got = self.nccl.all_gather(&x.to_device(&self.gpu)?)?;
            let sizes: Vec<usize> = (0..self.world).map(&rows).collect();
            self.exact(
                format!("all_gather {dtype:?} {name} rows {sizes:?}"),
                &got,
                &want,
                String::new(),
            )
        }

        fn broadcast(&self, dtype: DType, dims: &[usize], root: usize) -> Result<Line> {
            let x = random(&mut self.rng(&format!("broadcast/{dtype:?}")), dims, dtype)?;
            let want = self.tcp.broadcast(&x, root)?;
            let got = self.nccl.broadcast(&x.to_device(&self.gpu)?, root)?;
            self.exact(
                format!("broadcast {dtype:?} {dims:?} from rank {root}"),
                &[got],
                &[want],
                String::new(),
            )
        }

        /// `count(s, d)` rows go from rank s to rank d.
        fn all_to_all(
            &self,
            name: &str,
            dtype: DType,
            count: impl Fn(usize, usize) -> usize,
            rest: &[usize],
        ) -> Result<Line> {
            let send: Vec<usize> = (0..self.world).map(|d| count(self.rank, d)).collect();
            let recv: Vec<usize> = (0..self.world).map(|s| count(s, self.rank)).collect();
            let mut dims = vec![send.iter().sum()];
            dims.extend_from_slice(rest);
            let x = random(&mut self.rng(&format!("all_to_all/{name}")), &dims, dtype)?;
            let want = self.tcp.all_to_all(&x, &send, &recv)?;
            let got = self
                .nccl
                .all_to_all(&x.to_device(&self.gpu)?, &send, &recv)?;
            self.exact(
                format!("all_to_all {dtype:?} {name}"),
                &[got],
                &[want],
                format!("send {send:?} recv {recv:?}"),
            )
        }

        fn exchange_counts(&self) -> Result<Line> {
            let mut rng = self.rng("exchange_counts");
            let send: Vec<Vec<u64>> = (0..self.world)
                .map(|d| {
                    let len = (self.rank + 2 * d + 1) % 4;
                    (0..len).map(|_| rng.next_u64() >> 20).collect()
                })
                .collect();
            let want = self.tcp.exchange_counts(&send)?;
            let got = self.nccl.exchange_counts(&send)?;
            let err = if got.len() != want.len() {
                f64::INFINITY
            } else {
                got.iter()
                    .zip(&want)
                    .map(|(g, w)| {
                        if g.len() != w.len() {
                            f64::INFINITY
                        } else {
                            g.iter().zip(w).filter(|(a, b)| a != b).count() as f64
                        }
                    })
                    .sum()
            };
            let lens: Vec<usize> = want.iter().map(|w| w.len()).collect();
            Ok(Line {
                what: "exchange_counts (host I64 through all_to_all)".into(),
                err,
                tol: 0.0,
                exact: true,
                note: format!("received lengths {lens:?}"),
            })
        }

        fn barrier(&self) -> Result<Line> {
            let t = Instant::now();
            for _ in 0..3 {
                self.nccl.barrier()?;
            }
            Ok(Line {
                what: "barrier ×3".into(),
                err: 0.0,
                tol: 0.0,
                exact: true,
                note: format!("{:.2} ms each", t.elapsed().as_secs_f64() * 1e3 / 3.0),
            })
        }

        fn all(&self) -> Result<Vec<Line>> {
            let w = self.world;
            let mut lines = self.all_reduce(DType::F32, 1e-6)?;
            lines.extend(self.all_reduce(DType::BF16, 1e-2)?);
            lines.push(self.all_reduce_host()?);
            // Rank 1 (when there is one) has no rows.
            lines.push(self.all_gather(
                "uneven",
                DType::F32,
                |r| if r == 1 { 0 } else { 2 * r + 3 },
                &[24],
            )?);
            lines.push(self.all_gather("even", DType::BF16, |_| 4, &[8, 3])?);
            // Rank 0 has no rows (on one rank: nothing at all).
            lines.push(self.all_gather("rank 0 empty", DType::U8, |r| r, &[5])?);
            lines.push(self.broadcast(DType::F32, &[16, 33], w - 1)?);
            lines.push(self.broadcast(DType::I64, &[40], 0)?);
            lines.push(self.all_to_all("uneven", DType::F32, |s, d| (s + 2 * d) % 4 + 1, &[24])?);
            // Rank 0 sends nothing, rank w−1 receives nothing (on one rank: nothing moves).
            lines.push(self.all_to_all(
                "0 sends / last receives nothing",
                DType::BF16,
                |s, d| {
                    if s == 0 || d == w - 1 {
                        0
                    } else {
                        (s + d) % 3 + 1
                    }
                },
                &[6, 2],
            )?);
            lines.push(self.all_to_all(
                "1-D uneven",
                DType::U32,
                |s, d| (3 * s + d) % 5 + 1,
                &[],
            )?);
            lines.push(self.all_to_all("uneven", DType::I64, |s, d| (s * d) % 3 + 2, &[3])?);
            lines.push(self.exchange_counts()?);
            lines.push(self.barrier()?);
            Ok(lines)
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
        let tcp = TcpComm::new(connect()?, env.rank);
        let ctx = Ctx {
            nccl: &nccl,
            tcp: &tcp,
            gpu,
            rank: env.rank,
            world: env.world_size,
            seed: args.seed,
        };
        let lines = match ctx.all() {
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
