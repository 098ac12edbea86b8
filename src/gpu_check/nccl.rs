//! NCCL collectives against the CPU collective (`TcpComm`, the reference) on random data, on
//! every rank of the job, for `moeq nccl-check` (`cli/nccl_check.rs` joins the job and prints).
//! Data movement (all_gather, broadcast, all_to_all, exchange_counts) must be bit-exact; a sum
//! is compared as max|got − want| / max|want| against the `OfMax` factor of its row in
//! `tolerance::TOLERANCES`.

use super::tolerance::{lookup, Atol, Pass, Tolerance};
use crate::data::rng_stream;
use crate::distributed::comm::tensor_bytes;
use crate::distributed::nccl::NcclComm;
use crate::distributed::{Communicator, TcpComm};
use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, RngCore};
use std::time::Instant;

/// One comparison: `err` is a relative error (tolerance checks) or a count of
/// mismatched elements (exact checks, `tol` 0).
pub struct Line {
    pub what: String,
    pub err: f64,
    pub tol: f64,
    pub exact: bool,
    pub note: String,
}

impl Line {
    /// A line within the tolerance of `row`: an exact row's `Abs` (0), or a sum's `OfMax`
    /// factor with rtol 0.
    fn new(what: String, err: f64, row: &'static Tolerance, note: String) -> Result<Line> {
        let (tol, exact) = match (row.pass, row.rtol, row.atol) {
            (Pass::Exact, _, Atol::Abs(a)) => (a, true),
            (Pass::Forward, 0.0, Atol::OfMax(k)) => (k, false),
            _ => candle_core::bail!(
                "nccl-check: the row of {} {} compares max|diff| / max|ref|: it needs rtol 0 and \
                 atol OfMax (or an exact row with Abs)",
                row.op,
                row.dtype
            ),
        };
        Ok(Line {
            what,
            err,
            tol,
            exact,
            note,
        })
    }

    pub fn passed(&self) -> bool {
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

/// This rank's side of the job: both communicators over the same ranks, its GPU, and the seed
/// of the random data (each rank draws its own streams from it).
pub struct Collectives<'a> {
    pub nccl: &'a NcclComm,
    pub tcp: &'a TcpComm,
    pub gpu: Device,
    pub rank: usize,
    pub world: usize,
    pub seed: u64,
}

/// The exact row of a data-movement collective.
fn exact_row(op: &str) -> Result<&'static Tolerance> {
    Ok(lookup(op, "any", Pass::Exact)?)
}

/// The row of a sum in `dtype`.
fn sum_row(dtype: DType) -> Result<&'static Tolerance> {
    Ok(lookup("all_reduce_sum", dtype.as_str(), Pass::Forward)?)
}

impl Collectives<'_> {
    fn rng(&self, purpose: &str) -> rand_chacha::ChaCha8Rng {
        rng_stream(
            self.seed,
            &format!("nccl-check/{purpose}"),
            self.rank as u64,
        )
    }

    fn exact(
        &self,
        what: String,
        op: &str,
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
        Line::new(what, err, exact_row(op)?, note)
    }

    fn all_reduce(&self, dtype: DType) -> Result<Vec<Line>> {
        let mut rng = self.rng(&format!("all_reduce/{dtype:?}"));
        let x = random(&mut rng, &[38, 19], dtype)?;
        // The input is a candle kernel's output at a storage offset: the collective must
        // wait for the kernel and honour the offset.
        let on_gpu = x.to_device(&self.gpu)?.affine(2.0, 0.0)?.narrow(0, 1, 37)?;
        let want = self
            .tcp
            .all_reduce_sum(&x.affine(2.0, 0.0)?.narrow(0, 1, 37)?)?;
        let got = self.nccl.all_reduce_sum(&on_gpu)?;
        let mut lines = vec![Line::new(
            format!("all_reduce_sum {dtype:?} [37, 19] (offset input)"),
            rel_err(&got, &want)?,
            sum_row(dtype)?,
            String::new(),
        )?];
        // Every rank must hold the same bits.
        let mine = got.to_device(&Device::Cpu)?;
        let all = self.tcp.all_gather(&mine)?;
        let mut diff = 0.0;
        for other in &all {
            diff += mismatches(other, &all[0])?;
        }
        lines.push(Line::new(
            format!("all_reduce_sum {dtype:?} identical on every rank"),
            diff,
            exact_row("all_reduce_sum identical")?,
            String::new(),
        )?);
        Ok(lines)
    }

    fn all_reduce_host(&self) -> Result<Line> {
        let x = random(&mut self.rng("all_reduce/host"), &[5, 7], DType::F32)?;
        let got = self.nccl.all_reduce_sum(&x)?;
        let want = self.tcp.all_reduce_sum(&x)?;
        let on_host = got.device().is_cpu();
        Line::new(
            "all_reduce_sum F32 [5, 7] host tensor".into(),
            if on_host {
                rel_err(&got, &want)?
            } else {
                f64::INFINITY
            },
            sum_row(DType::F32)?,
            if on_host {
                String::new()
            } else {
                "result not on the host".into()
            },
        )
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
            "all_gather",
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
            "broadcast",
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
            "all_to_all",
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
        Line::new(
            "exchange_counts (host I64 through all_to_all)".into(),
            err,
            exact_row("exchange_counts")?,
            format!("received lengths {lens:?}"),
        )
    }

    fn barrier(&self) -> Result<Line> {
        let t = Instant::now();
        for _ in 0..3 {
            self.nccl.barrier()?;
        }
        Line::new(
            "barrier ×3".into(),
            0.0,
            exact_row("barrier")?,
            format!("{:.2} ms each", t.elapsed().as_secs_f64() * 1e3 / 3.0),
        )
    }

    /// Every comparison on this rank, in the order `moeq nccl-check` prints them.
    pub fn run_all(&self) -> Result<Vec<Line>> {
        let w = self.world;
        let mut lines = self.all_reduce(DType::F32)?;
        lines.extend(self.all_reduce(DType::BF16)?);
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
        lines.push(self.all_to_all("1-D uneven", DType::U32, |s, d| (3 * s + d) % 5 + 1, &[])?);
        lines.push(self.all_to_all("uneven", DType::I64, |s, d| (s * d) % 3 + 2, &[3])?);
        lines.push(self.exchange_counts()?);
        lines.push(self.barrier()?);
        Ok(lines)
    }
}
