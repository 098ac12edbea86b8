//! The gated delta rule in chunks as one custom op with a written-out backward: the chunked
//! equations of [`super::delta_rule`] (module doc: A, U = (I + A)⁻¹βv, W, V', O) with each
//! chunk's terms in one CUDA block (`kernels/delta_chunk.cu`) and the pass over chunks in
//! [`super::delta_carry_op`]'s kernels; CPU twin in `delta_chunk_op/twin.rs`. Same packed inputs
//! and output as [`super::delta_rule_op`] (`qkv` [B, T, H, 2Dk + Dv] = q̂ | k̂ | v, `gb`
//! [B, T, H, 2], `s0` [B, H, Dk, Dv] → `out` [B, H, T + Dk, Dv]: o rows, then the final state),
//! so the layer takes either.
//!
//! Forward, per head, chunks of C positions (the last one zero-padded, as `chunked`):
//!
//! ```text
//! prep  (every chunk at once)  c = cumsum g; A = strict_lower(β_i (k_i·k_j) e^(c_i − c_j));
//!                              T = (I + A)⁻¹ by forward substitution; U = T diag(β) v;
//!                              W = T diag(β e^c) k; K̃ = e^(c_C − c) ⊙ k; decay e^(c_C)
//! carry (chunk after chunk)    V'_n = U_n − W_n S_n;  S_{n+1} = e^(c_C) S_n + K̃_nᵀ V'_n
//! out   (every chunk at once)  O = (q ⊙ e^c) S_n + ((q kᵀ) ⊙ Γ) V'_n   (Γ with its diagonal)
//! ```
//!
//! Backward (from the carry the forward kept under [`super::delta_rule_op::keeping_checkpoints`],
//! else the forward's prep and carry rerun first):
//!
//! ```text
//! out_bwd   dQe = dO S_nᵀ;  F = (dO V'ᵀ) ⊙ Γ;  dq = e^c ⊙ dQe + F k;  dk = Fᵀ q;
//!           dV' = ((q kᵀ) ⊙ Γ)ᵀ dO;  dS_n = (q ⊙ e^c)ᵀ dO;  dc_i = Σ dQe_i·Qe_i + Σ_j F_ij (q_i·k_j)
//!           − Σ_j F_ji (q_j·k_i)
//! carry_bwd the totals: dU_n = dV'_n + K̃_n G_{n+1}, G_n = dS_n + e^(c_C) G_{n+1} − W_nᵀ dU_n
//! prep_bwd  dK̃ = V' G_{n+1}ᵀ; dW = −dU S_nᵀ; dT = dU (βv)ᵀ + dW (βe^c k)ᵀ; dA = −Tᵀ dT Tᵀ;
//!           d(βv) = Tᵀ dU; d(βe^c k) = Tᵀ dW; then dk, dv, dβ and dc through every term where
//!           k, v, β and c occur; dg_j = Σ_{i ≥ j} dc_i inside the chunk
//! ```
//!
//! Extra memory per call, f32: the carry's inputs and outputs, B·H·(N·C·(2Dk + Dv) +
//! (N·C + (N + 1)·Dk)·Dv) — ≈ 200 MB per sample of 2,048 positions at H = 32, Dk = Dv = 128 —
//! and twice its output in the backward.

mod twin;

use candle_core::{bail, CustomOp3, DType, Device, Result, Tensor};

/// The largest key and value head the kernels take (shared memory per block).
const MAX_HEAD: usize = 128;

/// Whether the CUDA kernels take key heads of `dk` and value heads of `dv` (the twin takes any).
pub fn kernel_takes(dk: usize, dv: usize) -> bool {
    (1..=MAX_HEAD).contains(&dk) && (1..=MAX_HEAD).contains(&dv) && dk % 4 == 0
}

/// The op's sizes (checked against each other) and its chunking.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    t: usize,
    h: usize,
    dk: usize,
    dv: usize,
    /// Positions per chunk.
    c: usize,
    /// Chunks per head.
    n: usize,
}

impl Geo {
    fn of(qkv: &Tensor, gb: &Tensor, s0: &Tensor, c: usize) -> Result<Geo> {
        let super::delta_rule_op::Geo { b, t, h, dk, dv } =
            super::delta_rule_op::Geo::of(qkv, gb, s0)?;
        if c == 0 || t == 0 {
            bail!("delta_chunk op: chunk {c} and length {t} must be at least 1");
        }
        let n = t.div_ceil(c);
        Ok(Geo {
            b,
            t,
            h,
            dk,
            dv,
            c,
            n,
        })
    }

    fn w(&self) -> usize {
        2 * self.dk + self.dv
    }

    fn bh(&self) -> usize {
        self.b * self.h
    }

    /// Rows of `out` per head.
    fn rows(&self) -> usize {
        self.t + self.dk
    }

    /// Rows of the carry's `us` per head: per chunk C rows of U and its decay row, then S_0.
    fn us_rows(&self) -> usize {
        self.n * (self.c + 1) + self.dk
    }

    /// Rows of the carry's output per head: V' per chunk, then S_0..S_N.
    fn cout_rows(&self) -> usize {
        self.n * self.c + (self.n + 1) * self.dk
    }

    /// Index of position t of head bh = b·H + h in the [B, T, H, ·] tensors.
    fn tok(&self, bh: usize, t: usize) -> usize {
        (bh / self.h * self.t + t) * self.h + bh % self.h
    }
}

/// The op over packed inputs (contiguous f32, as [`super::delta_rule_op`] packs them) in
/// chunks of `chunk` positions: `out` [B, H, T + Dk, Dv]. Graph recorded when an input tracks
/// one.
pub fn apply(qkv: &Tensor, gb: &Tensor, s0: &Tensor, chunk: usize) -> Result<Tensor> {
    let at0 = super::at_offset_zero;
    let (qkv, gb, s0) = (at0(qkv)?, at0(gb)?, at0(s0)?);
    if super::records_graph(&[&qkv, &gb, &s0]) {
        let op = DeltaChunkOp {
            c: chunk,
            keep: super::delta_rule_op::keeping(),
            saved: std::sync::Mutex::new(None),
        };
        qkv.apply_op3(&gb, &s0, op)
    } else {
        forward(&qkv, &gb, &s0, chunk)
    }
}

struct DeltaChunkOp {
    c: usize,
    /// Whether the CUDA forward keeps the carry's inputs and output in `saved` for the backward
    /// (recorded under [`super::delta_rule_op::keeping_checkpoints`], as the layer recompute
    /// does): B·H·(N·C·(2Dk + Dv) + (N·C + (N + 1)·Dk)·Dv) f32, ≈ 200 MB per sample of 2,048
    /// positions at H = 32, Dk = Dv = 128.
    keep: bool,
    saved: std::sync::Mutex<Option<Carried>>,
}

impl DeltaChunkOp {
    fn forward(&self, qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Tensor> {
        let g = Geo::of(qkv, gb, s0, self.c)?;
        let x = carried(g, qkv, gb, s0)?;
        let out = output(g, qkv, gb, &x)?;
        if self.keep && qkv.device().is_cuda() {
            if let Ok(mut saved) = self.saved.lock() {
                *saved = Some(x);
            }
        }
        Ok(out)
    }
}

impl CustomOp3 for DeltaChunkOp {
    fn name(&self) -> &'static str {
        "delta_chunk"
    }

    super::tensor_forward!(3, "delta_chunk", forward);

    fn bwd(
        &self,
        qkv: &Tensor,
        gb: &Tensor,
        s0: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: delta rule", qkv.device());
        let dout = super::at_offset_zero(&dout.to_dtype(DType::F32)?)?;
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let [dqkv, dgb, ds0] = backward(qkv, gb, s0, &dout, self.c, saved)?;
        Ok((Some(dqkv), Some(dgb), Some(ds0)))
    }
}

/// The carry's packed inputs (`wk` [BH, N, C, 2Dk], `us` [BH, N·(C+1) + Dk, Dv]) and its output.
struct Carried {
    wk: Tensor,
    us: Tensor,
    cout: Tensor,
}

fn carried(g: Geo, qkv: &Tensor, gb: &Tensor, s0: &Tensor) -> Result<Carried> {
    let (wk, us) = match qkv.device() {
        Device::Cpu => {
            let (qkv, gb, s0) = (vec(qkv)?, vec(gb)?, vec(s0)?);
            let mut wk = vec![0f32; g.bh() * g.n * g.c * 2 * g.dk];
            let mut us = vec![0f32; g.bh() * g.us_rows() * g.dv];
            for bh in 0..g.bh() {
                for n in 0..g.n {
                    twin::prep(&g, bh, n, [&qkv, &gb, &s0], &mut wk, &mut us);
                }
            }
            let cpu = &Device::Cpu;
            (
                Tensor::from_vec(wk, (g.bh(), g.n, g.c, 2 * g.dk), cpu)?,
                Tensor::from_vec(us, (g.bh(), g.us_rows(), g.dv), cpu)?,
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::prep(g, qkv, gb, s0)?,
        _ => bail!("delta_chunk op: CPU or CUDA only"),
    };
    let cout = super::delta_carry_op::run(&wk, &us, None)?;
    Ok(Carried { wk, us, cout })
}

/// `out` [B, H, T + Dk, Dv] of the packed inputs (contiguous from offset 0), no graph.
fn forward(qkv: &Tensor, gb: &Tensor, s0: &Tensor, c: usize) -> Result<Tensor> {
    let g = Geo::of(qkv, gb, s0, c)?;
    output(g, qkv, gb, &carried(g, qkv, gb, s0)?)
}

/// `out` from the carry's output.
fn output(g: Geo, qkv: &Tensor, gb: &Tensor, x: &Carried) -> Result<Tensor> {
    match qkv.device() {
        Device::Cpu => {
            let (qkv, gb, cout) = (vec(qkv)?, vec(gb)?, vec(&x.cout)?);
            let mut out = vec![0f32; g.bh() * g.rows() * g.dv];
            for bh in 0..g.bh() {
                for n in 0..g.n {
                    twin::out(&g, bh, n, [&qkv, &gb, &cout], &mut out);
                }
            }
            Tensor::from_vec(out, (g.b, g.h, g.rows(), g.dv), &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::out(g, qkv, gb, &x.cout),
        _ => bail!("delta_chunk op: CPU or CUDA only"),
    }
}

/// [d qkv, d gb, d s0] for the gradient `dout` of `out`; `saved`: what the forward kept, else
/// its prep and carry rerun.
fn backward(
    qkv: &Tensor,
    gb: &Tensor,
    s0: &Tensor,
    dout: &Tensor,
    c: usize,
    saved: Option<Carried>,
) -> Result<[Tensor; 3]> {
    let g = Geo::of(qkv, gb, s0, c)?;
    let x = match saved {
        Some(x) => {
            super::delta_rule_op::count_kept_read();
            x
        }
        None => carried(g, qkv, gb, s0)?,
    };
    let (dqkv, dgb, cgrad) = match qkv.device() {
        Device::Cpu => {
            let (qkv_v, gb_v, dout, cout) = (vec(qkv)?, vec(gb)?, vec(dout)?, vec(&x.cout)?);
            let mut dqkv = vec![0f32; qkv_v.len()];
            let mut cdout = vec![0f32; cout.len()];
            let mut dc = vec![0f32; g.bh() * g.n * g.c];
            for bh in 0..g.bh() {
                for n in 0..g.n {
                    let io = [&qkv_v[..], &gb_v[..], &dout[..], &cout[..]];
                    twin::out_bwd(&g, bh, n, io, &mut dqkv, &mut cdout, &mut dc);
                }
            }
            let cpu = &Device::Cpu;
            let cdout = Tensor::from_vec(cdout, x.cout.shape(), cpu)?;
            let cgrad = super::delta_carry_op::run(&x.wk, &x.us, Some(&cdout))?;
            let cg = vec(&cgrad)?;
            let mut dgb = vec![0f32; gb_v.len()];
            for bh in 0..g.bh() {
                for n in 0..g.n {
                    let io = [&qkv_v[..], &gb_v[..], &cout[..], &cg[..], &dc[..]];
                    twin::prep_bwd(&g, bh, n, io, &mut dqkv, &mut dgb);
                }
            }
            (
                Tensor::from_vec(dqkv, qkv.shape(), cpu)?,
                Tensor::from_vec(dgb, gb.shape(), cpu)?,
                cgrad,
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(g, qkv, gb, dout, &x)?,
        _ => bail!("delta_chunk op: CPU or CUDA only"),
    };
    let ds0 = cgrad
        .narrow(1, g.n * g.c, g.dk)?
        .reshape((g.b, g.h, g.dk, g.dv))?
        .contiguous()?;
    Ok([dqkv, dgb, ds0])
}

fn vec(x: &Tensor) -> Result<Vec<f32>> {
    x.flatten_all()?.to_vec1()
}

#[cfg(feature = "cuda")]
mod cuda;
