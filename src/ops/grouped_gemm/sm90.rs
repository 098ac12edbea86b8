//! Hopper's grouped GEMM (`kernels/sm90/grouped_gemm.cu`: CUTLASS's pointer-array kernel with
//! TMA and wgmma) for bf16 products `A·Bᵀ` and `A·B` written with β = 0, on GPUs of compute
//! capability 9.0. `applies` says when a call may take it; every other call stays on cuBLAS
//! (`super::cuda`), which is also its twin in `moeq gpu-check` (docs/ARCHITECTURE.md,
//! decision 25).

use super::{Gemm, Product};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, DType, Result};
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

extern "C" {
    fn moeq_sm90_grouped_scratch(layout: i32, variant: i32, groups: i32, sm_count: i32) -> usize;
    fn moeq_sm90_grouped_run(
        layout: i32,
        variant: i32,
        groups: i32,
        mnk: *const i32,
        ptrs: *const u64,
        alpha: f32,
        scratch: *mut c_void,
        scratch_len: usize,
        sm_count: i32,
        stream: *mut c_void,
    ) -> i32;
    fn moeq_sm90_last_error() -> *const c_char;
}

/// Which grouped GEMM bf16 expert products use on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The Hopper kernel where it applies, cuBLAS elsewhere (the default).
    Auto,
    /// cuBLAS always (the reference the Hopper kernel is checked against).
    Cublas,
}

/// 0 = not read yet, 1 = Auto, 2 = Cublas.
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// The kernel configurations compiled in (`kernels/sm90/grouped_gemm.cu`), by index.
pub const VARIANTS: [&str; 5] = [
    "ping-pong 128×128",
    "cooperative 128×256",
    "ping-pong 128×128, clusters of 2 along M",
    "cooperative 128×128",
    "cooperative 128×256, clusters of 2 along M",
];

/// The configuration every call takes unless one is forced (`forced`): cooperative 128×256,
/// fastest on the H200 at 2k, 8k and 16k tokens for gate_up's products (335 / 510 / 542 TFLOP/s
/// against 297 / 482 / 514 for ping-pong 128×128); on the H100 the fastest or within 4% of the
/// fastest for all four expert products (gate_up and down, forward and input gradient), whole
/// layers and 256 MiB chunks of experts alike, at 2k–16k tokens — no shape gains enough from
/// another to pick per shape (BENCHMARKS.md, "Expert GEMMs on Hopper" and "stop 59").
const DEFAULT_VARIANT: usize = 1;
/// `u8::MAX`: not read yet; `NOT_FORCED`: calls take `DEFAULT_VARIANT`.
const NOT_FORCED: u8 = u8::MAX - 1;
static FORCED: AtomicU8 = AtomicU8::new(u8::MAX);

/// The variant forced on every call, if any: `set_variant`'s, else `MOEQ_SM90_VARIANT`
/// (measurements and A/B runs).
pub fn forced() -> Option<usize> {
    let mut v = FORCED.load(Ordering::Relaxed);
    if v == u8::MAX {
        v = match std::env::var("MOEQ_SM90_VARIANT") {
            Err(_) => NOT_FORCED,
            Ok(s) => match s.parse::<u8>() {
                Ok(n) if (n as usize) < VARIANTS.len() => n,
                _ => {
                    tracing::warn!(
                        "MOEQ_SM90_VARIANT={s:?} names no compiled variant (0 to {}): the \
                         default, {DEFAULT_VARIANT} ({}), holds",
                        VARIANTS.len() - 1,
                        VARIANTS[DEFAULT_VARIANT]
                    );
                    NOT_FORCED
                }
            },
        };
        FORCED.store(v, Ordering::Relaxed);
    }
    (v != NOT_FORCED).then_some(v as usize)
}

/// Forces one variant on every call (`None`: back to `DEFAULT_VARIANT`).
pub fn set_variant(v: Option<usize>) {
    let v = v.map_or(NOT_FORCED, |v| v.min(VARIANTS.len() - 1) as u8);
    FORCED.store(v, Ordering::Relaxed);
}

/// The variant calls take: the forced one, else `DEFAULT_VARIANT`.
fn variant() -> usize {
    forced().unwrap_or(DEFAULT_VARIANT)
}

/// Launches of the Hopper kernel in this process (gpu-check asserts its twin check took it).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// The backend in force: `set_backend`'s, else `MOEQ_GROUPED_GEMM` (`cublas` or `auto`, for A/B
/// runs), else `Auto`.
pub fn backend() -> Backend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => Backend::Auto,
        2 => Backend::Cublas,
        _ => {
            let b = match std::env::var("MOEQ_GROUPED_GEMM").as_deref() {
                Ok("cublas") => Backend::Cublas,
                _ => Backend::Auto,
            };
            set_backend(b);
            b
        }
    }
}

pub fn set_backend(b: Backend) {
    BACKEND.store(
        match b {
            Backend::Auto => 1,
            Backend::Cublas => 2,
        },
        Ordering::Relaxed,
    );
}

/// Below this many columns or reduction steps a product wastes most of a 128×128×64 tile (the
/// rank-r LoRA products): cuBLAS keeps those.
const MIN_SIDE: usize = 64;

/// Whether the Hopper kernel takes this call: bf16, β = 0, A not transposed, a 9.0 device,
/// products whose rows (k for A and B, n for D) and bases are 16-byte aligned, as TMA needs.
pub(super) fn applies(
    dev: &CudaDevice,
    live: &[&Product],
    gemm: Gemm,
    beta: f32,
    dtype: DType,
    base: (u64, u64, u64),
) -> bool {
    let aligned = |base: u64, offset: usize| (base + 2 * offset as u64) % 16 == 0;
    backend() == Backend::Auto
        && dtype == DType::BF16
        && beta == 0.0
        && !gemm.trans_a
        && live.len() <= i32::MAX as usize
        && capability(dev) == Some((9, 0))
        && live.iter().all(|p| {
            p.n % 8 == 0
                && p.k % 8 == 0
                && p.n.min(p.k) >= MIN_SIDE
                && p.m.max(p.n).max(p.k) <= i32::MAX as usize
                && aligned(base.0, p.a)
                && aligned(base.1, p.b)
                && aligned(base.2, p.c)
        })
}

fn capability(dev: &CudaDevice) -> Option<(i32, i32)> {
    dev.cuda_stream().context().compute_capability().ok()
}

/// One launch of the Hopper kernel over `live` (bf16 elements at the `base` addresses).
pub(super) fn launch(
    dev: &CudaDevice,
    live: &[&Product],
    gemm: Gemm,
    base: (u64, u64, u64),
) -> Result<()> {
    use cudarc::driver::{sys::CUdevice_attribute, DevicePtr};
    let stream = dev.cuda_stream();
    let sm_count = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| candle_core::Error::Msg(format!("grouped_gemm: {e:?}")))?;
    let layout = if gemm.trans_b { 0 } else { 1 };
    let variant = variant() as i32;
    let groups = live.len() as i32;
    let mut mnk = Vec::with_capacity(3 * live.len());
    let mut ptrs = Vec::with_capacity(3 * live.len());
    for p in live {
        mnk.extend([p.m as i32, p.n as i32, p.k as i32]);
        ptrs.extend([
            base.0 + 2 * p.a as u64,
            base.1 + 2 * p.b as u64,
            base.2 + 2 * p.c as u64,
        ]);
    }
    // SAFETY: a pure size computation on the host.
    let bytes = unsafe { moeq_sm90_grouped_scratch(layout, variant, groups, sm_count) };
    // SAFETY: the kernel's tables and workspace; written by the call before any read.
    let scratch = unsafe { dev.alloc::<u8>(bytes)? };
    let (ps, _gs) = scratch.device_ptr(&stream);
    // SAFETY: `applies` and the caller's `validate` checked every product against its buffer and
    // TMA's alignment; the host arrays outlive the call (their bytes are staged before it
    // returns) and the scratch is freed in stream order after the kernel.
    let status = unsafe {
        moeq_sm90_grouped_run(
            layout,
            variant,
            groups,
            mnk.as_ptr(),
            ptrs.as_ptr(),
            gemm.alpha as f32,
            ps as *mut c_void,
            bytes,
            sm_count,
            stream.cu_stream() as *mut c_void,
        )
    };
    if status != 0 {
        // SAFETY: the runtime returns a static NUL-terminated string.
        let why = unsafe { CStr::from_ptr(moeq_sm90_last_error()) }.to_string_lossy();
        bail!("grouped_gemm: the Hopper kernel failed (status {status}, CUDA: {why})");
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
