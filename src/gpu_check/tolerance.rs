//! The tolerance of every gpu-check comparison, as data: one row per (op, dtype, pass) with
//! rtol, the atol rule and the reason. A comparison passes when `|got − want| ≤ atol +
//! rtol·|want|` everywhere (nccl-check: `max|got − want| ≤ k·max|want|`). Comparisons look their
//! row up by key; a key with no row is an error, never a default. Plain data with no CUDA in it,
//! so `moeq gpu-check --tolerances` prints it from any build.
//!
//! Numbers are f64 so nccl-check reads its tolerances unchanged; the op comparisons use them as
//! f32 (each is the f32 literal it reads as: a test checks).

use std::fmt::{self, Write};

/// Which check runs the comparisons of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Custom ops vs their CPU references (`gpu_check::ops`; the CPU test suite runs them too).
    Ops,
    /// CUDA quantization vs the CPU reference (`gpu_check::quant`; CUDA builds only).
    Quant,
    /// The whole training step (`gpu_check::train_step`; the CPU test suite runs it too).
    Train,
    /// NCCL collectives vs the CPU collective (`gpu_check::nccl`, `moeq nccl-check`).
    Nccl,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Ops => "ops",
            Check::Quant => "quant",
            Check::Train => "train",
            Check::Nccl => "nccl",
        }
    }
}

/// Which output of an op a row covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// Gradients (or a kernel of the backward pass).
    Backward,
    /// Integer outputs, copies and bit patterns: any difference fails.
    Exact,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::Exact => "exact",
        })
    }
}

/// The absolute part of a tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Atol {
    Abs(f64),
    /// A multiple of the reference's largest magnitude.
    OfMax(f64),
    /// The larger of `Abs(.0)` and `OfMax(.1)`.
    AbsOrOfMax(f64, f64),
}

impl Atol {
    /// The atol against a reference whose largest magnitude is `max_ref`, in f32 as the
    /// comparison computes it.
    pub fn resolve(self, max_ref: f32) -> f32 {
        match self {
            Atol::Abs(a) => a as f32,
            Atol::OfMax(k) => k as f32 * max_ref,
            Atol::AbsOrOfMax(a, k) => (a as f32).max(k as f32 * max_ref),
        }
    }

    pub fn needs_max(self) -> bool {
        !matches!(self, Atol::Abs(_))
    }
}

impl fmt::Display for Atol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match *self {
            Atol::Abs(a) => num(a),
            Atol::OfMax(k) => format!("{}·max|ref|", num(k)),
            Atol::AbsOrOfMax(a, k) => format!("max({}, {}·max|ref|)", num(a), num(k)),
        };
        f.pad(&s)
    }
}

/// A number as the table shows it: `2^-7` and `1.5·2^-7` for the storage steps, `1e-5`
/// otherwise.
fn num(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let e = x.log2().floor() as i32;
    let m = x / 2f64.powi(e);
    if e <= -4 && (m * 4.0).fract() == 0.0 {
        return if m == 1.0 {
            format!("2^{e}")
        } else {
            format!("{m}·2^{e}")
        };
    }
    if e >= -3 {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub check: Check,
    pub op: &'static str,
    /// The compared dtype (`f32`, `bf16`, `f16`, `u32`), or `any` for a row that holds for
    /// every dtype.
    pub dtype: &'static str,
    pub pass: Pass,
    pub rtol: f64,
    pub atol: Atol,
    pub why: &'static str,
}

/// No row for a comparison's key.
#[derive(Debug, thiserror::Error)]
#[error("gpu-check: no tolerance for {op} {dtype} {pass} (add a row with its reason to TOLERANCES in src/gpu_check/tolerance.rs)")]
pub struct MissingTolerance {
    pub op: String,
    pub dtype: String,
    pub pass: Pass,
}

impl From<MissingTolerance> for candle_core::Error {
    fn from(e: MissingTolerance) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// The row of `op` in `dtype` (or its `any` row) for `pass`.
pub fn lookup(op: &str, dtype: &str, pass: Pass) -> Result<&'static Tolerance, MissingTolerance> {
    let find = |d: &str| {
        TOLERANCES
            .iter()
            .find(|t| t.op == op && t.dtype == d && t.pass == pass)
    };
    find(dtype)
        .or_else(|| find("any"))
        .ok_or_else(|| MissingTolerance {
            op: op.into(),
            dtype: dtype.into(),
            pass,
        })
}

/// The table as `moeq gpu-check` prints it: a header line, then one line per row.
pub fn table() -> String {
    let w = TOLERANCES
        .iter()
        .map(|t| t.op.chars().count())
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<w$} {:<5} {:<8} {:<9} {:<24} why",
        "check", "op", "dtype", "pass", "rtol", "atol"
    );
    for t in TOLERANCES {
        let _ = writeln!(
            s,
            "{:<6} {:<w$} {:<5} {:<8} {:<9} {:<24} {}",
            t.check.as_str(),
            t.op,
            t.dtype,
            t.pass,
            num(t.rtol),
            t.atol,
            t.why
        );
    }
    s
}

const NF4_F32: &str = "sums of 256 (forward) or 384 (backward) products: f32 accumulation order \
    differs between cuBLAS and the CPU gemm (≈1e-6 relative)";
const NF4_BF16: &str = "one bf16 rounding of the outputs and of the bf16 weight copy (≈1e-2 \
    relative to the output scale)";
const LORA: &str = "nf4_linear's sums plus rank-16 products: nf4_linear's tolerance";
const SWIGLU_F32: &str = "rounded once from f32 against an f32 reference: a few f32 ulps (CUDA's \
    expf and Rust's exp differ by up to 2 ulp)";
const SWIGLU_HALF: &str = "rounded once from f32 against an f32 reference: one storage ulp (an \
    f32 value that differs in its last bit may round to the neighbouring storage value)";
const SWIGLU_BWD: &str = "~6 rounded elementwise ops (exp, recip, products) an ulp or two apart \
    on the device: two storage ulps, at least 1e-4 where f32 ulps add up (2.9e-6 abs on H100)";
const SWIGLU_D_GATE: &str = "as d_up, and silu' crosses zero (gate ≈ −1.28): a cancellation of \
    O(1) terms, so also 1e-6 of the largest magnitude (an elementwise bound failed at 1.3×)";
const MODEL_F32: &str = "cuBLAS/CPU accumulation order and transcendental ulps";
const MODEL_BF16: &str = "one storage rounding per op on the device side against an f32 reference";
const DELTA_F32: &str = "T rank-1 updates of each state element in f32, sums of Dk or Dv products \
    in another order, expf vs exp and FMA contraction on the device; dg sums Dk·Dv products that \
    cancel, so the absolute part is of the largest magnitude (CPU twin vs autograd: ≤ 1e-6)";
const DELTA_BF16: &str = "the reference gets the same bf16-rounded inputs: o, dq, dk, dv, dbeta \
    are rounded once to bf16 (≤ 2^-8 of the value, two such steps allowed), the state, dg and \
    d state stay f32 (the f32 row's absolute part)";
const CHUNKWISE_F32: &str = "the chunked form against the recurrence: a chunk's terms go through \
    a triangular inverse (by doubling, or by substitution in the chunk op) and matmuls (cuBLAS, or \
    the chunk op's own products) instead of T rank-1 updates, sums in another order (CPU chunked vs recurrent: ≤ 1e-5 forward, 1e-4 gradients)";
const CHUNKWISE_BF16: &str = "as the token-by-token op's bf16 rows: the inputs are the same \
    bf16-rounded values, o, dq, dk, dv, dbeta rounded once to bf16 (two steps allowed)";
const CONV_F32: &str = "the same f32 products and sums as the reference (no FMA on the device), \
    expf vs exp in SiLU and its gradient (ulps); d weight sums B·T products in another order";
const CONV_BF16: &str =
    "an ulp of expf can tip a bf16 rounding of y or of d v (2^-8 of the value); \
    d x and d weight round once more after a sum over d v: two steps allowed";
const PREP_F32: &str = "the same equations, sums of Dk squares and products over lanes against \
    the reference's order, the norm's backward written out (x·(x·d)/‖x‖³ against d/‖x‖ cancels: \
    the absolute part is of the largest magnitude)";
const PREP_BF16: &str = "f32 outputs of the same bf16 inputs (as f32); d conv: the op rounds \
    once, autograd rounds each value head's gradient to bf16 and sums them in bf16 (two steps \
    allowed)";
const GATED_NORM_F32: &str = "sums of D squares in another order, expf vs exp in SiLU and \
    σ (ulps); dx's r·(g − x·r·mean) cancels, so the absolute part is of the largest magnitude";
const GATED_NORM_BF16: &str = "the reference's three bf16 roundings (n, p, y): an f32 ulp of the \
    sum of squares can tip n's rounding, which carries into p and y: two bf16 steps of y (up to \
    2^-6 of the value; the CPU twin met 1.5× one step over 8,192 rows); the gradients round \
    once where autograd rounds at each bf16 tensor (two steps allowed)";
const OUTER_F32: &str = "sums of ≤ 900 products in another order";
const OUTER_BF16: &str = "plus one rounding of the output on each side: one bf16 step, up to 2^-7 \
    of the value (H100 met 0.88 of it); 1.5·2^-7 leaves room for f32 sums' last bits";
const SM90_GEMM: &str = "one rounding of an f32 sum to bf16 (at most 2^-8 of the value) against \
    f32 on the CPU; sums of ≤ 2,048 products in another order add ~1e-6 of the largest value";
const CE_DLOGITS_F32: &str = "a row's log-sum-exp summed in another order moves by up to ~1e-5, \
    which scales every probability by e^Δ (1e-5 failed once at 1.04× on H100)";
const CE_DLOGITS_BF16: &str = "one bf16 rounding step";
const CE_LOSS: &str = "a row's sums in another order: 4e-6 to 1e-5 over runs on random logits";
const ADAMW: &str =
    "the fused update performs the tensor ops' f32 operations in their order, each \
    rounded on its own (no FMA contraction): any difference is a bug";
const ATTN_FWD_RERUN: &str = "the same attention forward on the same inputs (no atomics): any \
    difference fails (the recompute runs it again: recompute_attention)";
const ATTN_RERUN: &str = "the Hopper attention backward adds its dQ and dK/dV parts in a fixed \
    order: a rerun over the same inputs gives the same bits, any difference is a race";
const ATTN_VS_CUDNN: &str = "two bf16 gradients from f32 sums in different orders (both round P \
    and dS to bf16 for their products, at different points)";
const ROUTING_PLAN: &str = "integer outputs (tokens, slots, inverse, counts): any difference \
    fails";
const ADD: &str = "one rounding of the exact sum on both sides (bf16 sums rounded through f32 round alike: 24 ≥ 2·8 + 2 bits)";
const IN_K_PIECES: &str = "the same kernels moving or computing the same values into other \
    addresses (rows laid wider, a view's columns)";
const ROWS_BY_TOKEN: &str =
    "the same values moved (weighted rows: w·x in f32, rounded once) in another order of reads";
const ROUTER: &str =
    "exp(x − max) / Σ in f32 on both sides: expf ulps and the sum's order (≈ 1e-7 relative)";
const ROUTER_BWD: &str = "f32 sums over ≤ 1,024 terms in another order (a warp's tree against \
     candle's), then one rounding to the logits' dtype (bf16: 2⁻⁸ relative)";
const ROUTER_TOP: &str =
    "expert ids from logits at least a bf16 spacing apart: any difference fails";
const ROUTER_GRAPH: &str = "the same kernel's values on every path (a graph's ops only carry the \
    gradient: values + (graph − graph)): any difference fails";
const EMBEDDING: &str = "a copy of the host rows: any difference fails";
const GENERATED: &str = "both round the same f32 formula to bf16; ln/cos may differ in the last \
    f32 bit, one bf16 step (≤ 2^-7) when a value sits on a rounding boundary";
const QUANT: &str = "the reference's arithmetic (bitsandbytes): equal byte for byte, compared as \
    bit patterns so NaN and -0.0 count";
const TRAIN_F32: &str = "cuBLAS vs CPU accumulation order through the layers and the recompute";
const TRAIN_BF16: &str = "both sides round to bf16 after every op from f32 sums in other orders: \
    an ulp (0.4%) here and there; vs the CPU in bf16, not f32 (top-k flips near ties)";
const DECODE_F32: &str = "the cached decoding's logits through every layer: cuBLAS vs CPU \
    accumulation order, as the train step's loss";
const DECODE_BF16: &str = "bf16 after every op on both sides, sums in other orders: as the train \
    step's bf16 rows, of the largest logit";
const TRAIN_TAPED: &str =
    "a layer's taped forward (arch::backward) runs the plain forward's kernels on the same values";
const TRAIN_KEPT: &str = "gradient_checkpointing: false runs the same kernels on the same values";
const TRAIN_OFFLOADED: &str = "the same tensors, copied to host memory and back";
const TRAIN_ATTENTION: &str =
    "the recompute's attention forward: the same kernel on the same inputs as the first";
const TRAIN_CHUNKS: &str =
    "each expert's products of the separate passes (same rows, weights, order), by chunks";
const WRITTEN_F32: &str =
    "the same functions; f32 sums in other orders (chunked vs whole-vocabulary \
    softmax, gradients summed inside products): 1e-4 of the tensor's largest, as the CPU test";
const WRITTEN_BF16: &str = "the hand-written backward rounds a summed gradient once per product \
    (β = 1), autograd after each add: an ulp (0.4%) here and there, as the train step's bf16 row";
const NCCL_SUM_F32: &str = "rank order (reference) vs NCCL's ring/tree order, rounded once: ≤ \
    (ranks − 1)·2^-24 of the summands for ≤ 8 ranks";
const NCCL_SUM_BF16: &str = "each of NCCL's up to ranks − 1 additions rounds to bf16 (half an ulp \
    is 2^-9 ≈ 2e-3)";
const NCCL_SAME: &str = "every rank must hold the same bits";
const NCCL_MOVE: &str = "data movement: bit-exact";
const NCCL_BARRIER: &str = "no data: passes when every rank returns (the line reports the time)";

const fn row(
    check: Check,
    op: &'static str,
    dtype: &'static str,
    pass: Pass,
    rtol: f64,
    atol: Atol,
    why: &'static str,
) -> Tolerance {
    Tolerance {
        check,
        op,
        dtype,
        pass,
        rtol,
        atol,
        why,
    }
}

use Atol::{Abs, AbsOrOfMax, OfMax};
use Check::{Nccl, Ops, Quant, Train};
use Pass::{Backward, Exact, Forward};

/// Every tolerance, in the order the checks run.
#[rustfmt::skip]
pub const TOLERANCES: &[Tolerance] = &[
    //  check  op                          dtype   pass      rtol          atol                    why
    row(Ops,   "nf4_linear",               "f32",  Forward,  1e-5,         OfMax(1e-5),            NF4_F32),
    row(Ops,   "nf4_linear",               "f32",  Backward, 1e-5,         OfMax(1e-5),            NF4_F32),
    row(Ops,   "nf4_linear",               "bf16", Forward,  1e-2,         OfMax(1e-2),            NF4_BF16),
    row(Ops,   "nf4_linear",               "bf16", Backward, 1e-2,         OfMax(1e-2),            NF4_BF16),
    row(Ops,   "lora_linear",              "f32",  Forward,  1e-5,         OfMax(1e-5),            LORA),
    row(Ops,   "lora_linear",              "f32",  Backward, 1e-5,         OfMax(1e-5),            LORA),
    row(Ops,   "lora_linear",              "bf16", Forward,  1e-2,         OfMax(1e-2),            LORA),
    row(Ops,   "lora_linear",              "bf16", Backward, 1e-2,         OfMax(1e-2),            LORA),
    row(Ops,   "swiglu",                   "f32",  Forward,  1e-5,         Abs(1e-7),              SWIGLU_F32),
    row(Ops,   "swiglu",                   "bf16", Forward,  1.0 / 128.0,  Abs(1e-6),              SWIGLU_HALF),
    row(Ops,   "swiglu",                   "f16",  Forward,  1.0 / 1024.0, Abs(1e-6),              SWIGLU_HALF),
    row(Ops,   "swiglu d_gate",            "f32",  Backward, 1e-4,         AbsOrOfMax(1e-7, 1e-6), SWIGLU_D_GATE),
    row(Ops,   "swiglu d_gate",            "bf16", Backward, 2.0 / 128.0,  AbsOrOfMax(1e-6, 1e-6), SWIGLU_D_GATE),
    row(Ops,   "swiglu d_gate",            "f16",  Backward, 2.0 / 1024.0, AbsOrOfMax(1e-6, 1e-6), SWIGLU_D_GATE),
    row(Ops,   "swiglu d_up",              "f32",  Backward, 1e-4,         Abs(1e-7),              SWIGLU_BWD),
    row(Ops,   "swiglu d_up",              "bf16", Backward, 2.0 / 128.0,  Abs(1e-6),              SWIGLU_BWD),
    row(Ops,   "swiglu d_up",              "f16",  Backward, 2.0 / 1024.0, Abs(1e-6),              SWIGLU_BWD),
    row(Ops,   "rms_norm",                 "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "rms_norm",                 "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "rms_norm",                 "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "rms_norm",                 "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "rope",                     "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "rope",                     "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "rope",                     "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "rope",                     "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "norm_rope",                "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "norm_rope",                "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "norm_rope",                "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "norm_rope",                "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "grouped_nf4",              "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "grouped_nf4",              "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "grouped_nf4",              "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "grouped_nf4",              "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "grouped_lora",             "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "grouped_lora",             "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "grouped_lora",             "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "grouped_lora",             "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "swiglu_packed",            "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "swiglu_packed",            "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "swiglu_packed",            "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "swiglu_packed",            "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "clamped_glu",              "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "clamped_glu",              "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "clamped_glu",              "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "clamped_glu",              "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "masked_softmax",           "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "masked_softmax",           "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "masked_softmax",           "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "masked_softmax",           "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "attention",                "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "attention",                "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "attention",                "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "attention",                "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "attention_block",          "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "attention_block",          "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "attention_block",          "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "attention_block",          "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "delta_chunkwise",          "f32",  Forward,  1e-4,         OfMax(1e-4),            CHUNKWISE_F32),
    row(Ops,   "delta_chunkwise",          "f32",  Backward, 1e-4,         OfMax(2e-4),            CHUNKWISE_F32),
    row(Ops,   "delta_chunkwise",          "bf16", Forward,  2.0 / 256.0,  OfMax(1e-4),            CHUNKWISE_BF16),
    row(Ops,   "delta_chunkwise",          "bf16", Backward, 2.0 / 256.0,  OfMax(2e-4),            CHUNKWISE_BF16),
    row(Ops,   "delta_chunk",              "f32",  Forward,  1e-4,         OfMax(1e-4),            CHUNKWISE_F32),
    row(Ops,   "delta_chunk",              "f32",  Backward, 1e-4,         OfMax(2e-4),            CHUNKWISE_F32),
    row(Ops,   "delta_chunk",              "bf16", Forward,  2.0 / 256.0,  OfMax(1e-4),            CHUNKWISE_BF16),
    row(Ops,   "delta_chunk",              "bf16", Backward, 2.0 / 256.0,  OfMax(2e-4),            CHUNKWISE_BF16),
    row(Ops,   "delta_rule",               "f32",  Forward,  1e-4,         OfMax(1e-4),            DELTA_F32),
    row(Ops,   "delta_rule",               "f32",  Backward, 1e-4,         OfMax(1e-4),            DELTA_F32),
    row(Ops,   "delta_rule",               "bf16", Forward,  2.0 / 256.0,  OfMax(1e-4),            DELTA_BF16),
    row(Ops,   "delta_rule",               "bf16", Backward, 2.0 / 256.0,  OfMax(1e-4),            DELTA_BF16),
    row(Ops,   "conv_silu",                "f32",  Forward,  1e-5,         OfMax(1e-5),            CONV_F32),
    row(Ops,   "conv_silu",                "f32",  Backward, 1e-5,         OfMax(1e-5),            CONV_F32),
    row(Ops,   "conv_silu",                "bf16", Forward,  2.0 / 256.0,  OfMax(1e-5),            CONV_BF16),
    row(Ops,   "conv_silu",                "bf16", Backward, 2.0 / 256.0,  OfMax(2.0 / 256.0),     CONV_BF16),
    row(Ops,   "delta_prep",               "f32",  Forward,  1e-5,         OfMax(1e-6),            PREP_F32),
    row(Ops,   "delta_prep",               "f32",  Backward, 1e-5,         OfMax(1e-5),            PREP_F32),
    row(Ops,   "delta_prep",               "bf16", Forward,  1e-5,         OfMax(1e-6),            PREP_BF16),
    row(Ops,   "delta_prep",               "bf16", Backward, 2.0 / 256.0,  OfMax(2.0 / 256.0),     PREP_BF16),
    row(Ops,   "gated_norm",               "f32",  Forward,  1e-5,         OfMax(1e-6),            GATED_NORM_F32),
    row(Ops,   "gated_norm",               "f32",  Backward, 1e-5,         OfMax(1e-5),            GATED_NORM_F32),
    row(Ops,   "gated_norm",               "bf16", Forward,  4.0 / 256.0,  OfMax(1e-5),            GATED_NORM_BF16),
    row(Ops,   "gated_norm",               "bf16", Backward, 2.0 / 256.0,  OfMax(2.0 / 256.0),     GATED_NORM_BF16),
    row(Ops,   "gather_rows/combine_rows", "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "gather_rows/combine_rows", "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "gather_rows/combine_rows", "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "gather_rows/combine_rows", "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "routed_experts",           "f32",  Forward,  1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "routed_experts",           "f32",  Backward, 1e-5,         OfMax(1e-5),            MODEL_F32),
    row(Ops,   "routed_experts",           "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "routed_experts",           "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "thin_gemm",                "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "thin_gemm",                "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "lora in K",                "bf16", Forward,  2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "lora in K",                "bf16", Backward, 2e-2,         OfMax(2e-2),            MODEL_BF16),
    row(Ops,   "lora in K pieces",         "any",  Exact,    0.0,          Abs(0.0),               IN_K_PIECES),
    row(Ops,   "grouped_outer",            "f32",  Backward, 0.0,          OfMax(1e-5),            OUTER_F32),
    row(Ops,   "grouped_outer",            "bf16", Backward, 1.5 / 128.0,  OfMax(1e-5),            OUTER_BF16),
    row(Ops,   "grouped_gemm sm90",        "bf16", Forward,  1.0 / 256.0,  OfMax(1e-5),            SM90_GEMM),
    row(Ops,   "cross_entropy_rows",       "f32",  Backward, 3e-5,         Abs(1e-7),              CE_DLOGITS_F32),
    row(Ops,   "cross_entropy_rows",       "f32",  Forward,  1e-5,         Abs(1e-5),              CE_LOSS),
    row(Ops,   "cross_entropy_rows",       "bf16", Backward, 1.0 / 128.0,  Abs(1e-7),              CE_DLOGITS_BF16),
    row(Ops,   "cross_entropy_rows",       "bf16", Forward,  1e-5,         Abs(1e-5),              CE_LOSS),
    row(Ops,   "adamw",                    "f32",  Exact,    0.0,          Abs(0.0),               ADAMW),
    row(Ops,   "attention backward rerun", "bf16", Exact,    0.0,          Abs(0.0),               ATTN_RERUN),
    row(Ops,   "attention forward rerun",  "bf16", Exact,    0.0,          Abs(0.0),               ATTN_FWD_RERUN),
    row(Ops,   "attention backward vs cuDNN", "bf16", Backward, 2e-2,      OfMax(2e-2),            ATTN_VS_CUDNN),
    row(Ops,   "routing plan",             "u32",  Exact,    0.0,          Abs(0.5),               ROUTING_PLAN),
    row(Ops,   "embedding rows",           "any",  Exact,    0.0,          Abs(0.0),               EMBEDDING),
    row(Ops,   "routing rows token-major", "any",  Exact,    0.0,          Abs(0.0),               ROWS_BY_TOKEN),
    row(Ops,   "add",                      "any",  Exact,    0.0,          Abs(0.0),               ADD),
    row(Ops,   "router probs",             "f32",  Forward,  1e-6,         Abs(1e-9),              ROUTER),
    row(Ops,   "router backward",          "f32",  Backward, 1e-5,         OfMax(1e-5),            ROUTER_BWD),
    row(Ops,   "router backward",          "bf16", Backward, 1e-2,         OfMax(1e-2),            ROUTER_BWD),
    row(Ops,   "router top-k",             "u32",  Exact,    0.0,          Abs(0.5),               ROUTER_TOP),
    row(Ops,   "router graph = plain",     "f32",  Exact,    0.0,          Abs(0.0),               ROUTER_GRAPH),
    row(Ops,   "generated weights",        "bf16", Forward,  1.0 / 128.0,  Abs(0.0),               GENERATED),
    row(Quant, "quantize_on_gpu",          "any",  Exact,    0.0,          Abs(0.0),               QUANT),
    row(Quant, "dequantize",               "any",  Exact,    0.0,          Abs(0.0),               QUANT),
    row(Quant, "dequantize_absmax_on_gpu", "any",  Exact,    0.0,          Abs(0.0),               QUANT),
    row(Train, "train step",               "f32",  Forward,  1e-4,         Abs(0.0),               TRAIN_F32),
    row(Train, "train step",               "f32",  Backward, 0.0,          OfMax(1e-4),            TRAIN_F32),
    row(Train, "train step",               "bf16", Forward,  5e-2,         Abs(0.0),               TRAIN_BF16),
    row(Train, "train step",               "bf16", Backward, 0.0,          OfMax(5e-2),            TRAIN_BF16),
    row(Train, "decode",                   "f32",  Forward,  0.0,          OfMax(1e-4),            DECODE_F32),
    row(Train, "decode",                   "bf16", Forward,  0.0,          OfMax(5e-2),            DECODE_BF16),
    row(Train, "kept = recomputed",        "any",  Exact,    0.0,          Abs(0.0),               TRAIN_KEPT),
    row(Train, "chunks = separate passes", "any",  Exact,    0.0,          Abs(0.0),               TRAIN_CHUNKS),
    row(Train, "attention rerun = kept",   "any",  Exact,    0.0,          Abs(0.0),               TRAIN_ATTENTION),
    row(Train, "offloaded = recomputed",   "any",  Exact,    0.0,          Abs(0.0),               TRAIN_OFFLOADED),
    row(Train, "taped = plain forward",    "any",  Exact,    0.0,          Abs(0.0),               TRAIN_TAPED),
    row(Train, "written = autograd",       "f32",  Backward, 0.0,          OfMax(1e-4),            WRITTEN_F32),
    row(Train, "written = autograd",       "bf16", Backward, 0.0,          OfMax(5e-2),            WRITTEN_BF16),
    row(Nccl,  "all_reduce_sum",           "f32",  Forward,  0.0,          OfMax(1e-6),            NCCL_SUM_F32),
    row(Nccl,  "all_reduce_sum",           "bf16", Forward,  0.0,          OfMax(1e-2),            NCCL_SUM_BF16),
    row(Nccl,  "all_reduce_sum identical", "any",  Exact,    0.0,          Abs(0.0),               NCCL_SAME),
    row(Nccl,  "all_gather",               "any",  Exact,    0.0,          Abs(0.0),               NCCL_MOVE),
    row(Nccl,  "broadcast",                "any",  Exact,    0.0,          Abs(0.0),               NCCL_MOVE),
    row(Nccl,  "all_to_all",               "any",  Exact,    0.0,          Abs(0.0),               NCCL_MOVE),
    row(Nccl,  "exchange_counts",          "any",  Exact,    0.0,          Abs(0.0),               NCCL_MOVE),
    row(Nccl,  "barrier",                  "any",  Exact,    0.0,          Abs(0.0),               NCCL_BARRIER),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_is_an_error() {
        let e = lookup("rms_norm", "f16", Pass::Forward).unwrap_err();
        assert!(
            e.to_string()
                .contains("no tolerance for rms_norm f16 forward"),
            "{e}"
        );
        assert!(lookup("no such op", "f32", Pass::Exact).is_err());
        assert_eq!(lookup("rope", "bf16", Pass::Backward).unwrap().rtol, 2e-2);
        // An `any` row answers for every dtype.
        assert_eq!(
            lookup("embedding rows", "bf16", Pass::Exact).unwrap().dtype,
            "any"
        );
    }

    #[test]
    fn keys_are_unique_and_any_rows_stand_alone() {
        for (i, a) in TOLERANCES.iter().enumerate() {
            for b in &TOLERANCES[i + 1..] {
                let same_op = a.op == b.op && a.pass == b.pass;
                assert!(
                    !(same_op && (a.dtype == b.dtype || a.dtype == "any" || b.dtype == "any")),
                    "{} {} {}: two rows",
                    a.op,
                    a.dtype,
                    a.pass
                );
            }
        }
    }

    /// The comparisons compute in f32: each number must be exactly the f32 literal it reads
    /// as, so the table gives the values the checks used before it existed.
    #[test]
    fn numbers_are_the_f32_literals_they_read_as() {
        for t in TOLERANCES {
            let (a, k) = match t.atol {
                Atol::Abs(a) => (a, 0.0),
                Atol::OfMax(k) => (0.0, k),
                Atol::AbsOrOfMax(a, k) => (a, k),
            };
            for x in [t.rtol, a, k] {
                assert_eq!(
                    x.to_string().parse::<f32>().unwrap(),
                    x as f32,
                    "{} {x}",
                    t.op
                );
            }
            assert!(!t.why.is_empty());
        }
    }

    #[test]
    fn the_table_prints_a_header_and_every_row() {
        let s = table();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), TOLERANCES.len() + 1);
        assert!(lines[0].starts_with("check  op"));
        assert!(s.contains("2^-7"), "{s}");
        assert!(s.contains("1.5·2^-7"), "{s}");
        assert!(s.contains("max(1e-7, 1e-6·max|ref|)"), "{s}");
    }
}
