//! moeq's own causal attention backward for Hopper (`kernels/sm90/attn_bwd.cu`: CuTe wgmma, two
//! warp groups a CTA, deterministic through an ordered dQ accumulation; docs/ARCHITECTURE.md
//! decision 36), taking cuDNN's forward output and statistics in place of cuDNN's deterministic
//! backward. **Off by default until measured**: `MOEQ_ATTN_BWD=sm90` (or [`set_enabled`])
//! turns it on; gpu-check compares it with the CPU wherever it serves, in both of its forms
//! (`staged`).
//!
//! It serves rows of one sample each (packed rows stay on cuDNN's ragged path), bf16 on a 9.0
//! device, positions a multiple of 128, no sliding window (sinks ride in the statistics), and
//! the head sizes compiled in (`moeq_sm90_attn_bwd_block`: 64/64, 128/128, 192/128,
//! 256/256).

use crate::util::switch::{EnvSwitch, Values, ON_OFF};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::CudaStorageSlice as S;
use candle_core::{bail, CudaDevice, DType, Result, Storage, Tensor};
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One call, as `Args` in kernels/sm90/attn_bwd.cu.
#[repr(C)]
struct Args {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    dout: u64,
    lse: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    delta: u64,
    dq_acc: u64,
    dk_acc: u64,
    dv_acc: u64,
    counters: u64,
    b: i32,
    s: i32,
    h: i32,
    kvh: i32,
    hd: i32,
    vd: i32,
    parts: i32,
    scale: f32,
    stage: i32,
}

// The C side asserts the same size.
const _: () = assert!(std::mem::size_of::<Args>() == 152);

extern "C" {
    fn moeq_sm90_attn_bwd_block(hd: i32, vd: i32) -> i32;
    fn moeq_sm90_attn_bwd_stages(hd: i32, vd: i32) -> i32;
    fn moeq_sm90_attn_bwd(args: *const Args, stream: *mut c_void) -> i32;
    fn moeq_sm90_attn_bwd_error(status: i32) -> *const c_char;
}

/// Query rows a tile (`kBlockM` in the kernel): the counters are per tile of this many.
const TILE: usize = 64;
/// Positions must be a multiple of this (the largest key block).
const ALIGN: usize = 128;
/// The CTAs a launch aims at, per SM, when it splits a kv head's query heads (the tail of the
/// last wave stays short; a first guess, to be tuned once measured).
const CTAS_PER_SM: usize = 4;

static ENABLED: EnvSwitch = EnvSwitch::new(
    "MOEQ_ATTN_BWD",
    false,
    Values {
        on: &["sm90"],
        off: &["cudnn", "off", "0"],
    },
);
static STAGED: EnvSwitch = EnvSwitch::new("MOEQ_ATTN_BWD_STAGE", true, ON_OFF);
/// Parts forced by gpu-check (0 = the heuristic).
static FORCED_PARTS: AtomicUsize = AtomicUsize::new(0);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Whether the kernel may serve: `set_enabled`'s, else `MOEQ_ATTN_BWD=sm90`.
pub fn enabled() -> bool {
    ENABLED.get()
}

pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether a step's dQ part goes out during the next step's first products (through shared
/// memory, where it fits: [`stages`]) rather than at once: `set_staged`'s, else
/// `MOEQ_ATTN_BWD_STAGE` (`0` for the unstaged form), else staged. Both forms give the same
/// bits; which is faster is for the measurement to say.
pub fn staged() -> bool {
    STAGED.get()
}

pub fn set_staged(on: bool) {
    STAGED.set(on);
}

/// Whether heads of `hd`/`vd` have the staged form (its shared memory fits: not at 256/256).
pub fn stages(hd: usize, vd: usize) -> bool {
    match (i32::try_from(hd), i32::try_from(vd)) {
        // SAFETY: a pure function of its arguments.
        (Ok(hd), Ok(vd)) => (unsafe { moeq_sm90_attn_bwd_stages(hd, vd) }) != 0,
        _ => false,
    }
}

/// Splits each kv head's query heads over `parts` CTAs (`None`: the heuristic) — gpu-check's
/// way to take both the split and the unsplit path at one shape.
pub fn force_parts(parts: Option<usize>) {
    FORCED_PARTS.store(parts.unwrap_or(0), Ordering::Relaxed);
}

/// Launches in this process (gpu-check asserts its rows took the kernel).
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// The key block of heads of `hd`/`vd`; `None` where no kernel is compiled for them.
fn block(hd: usize, vd: usize) -> Option<usize> {
    let (hd, vd) = (i32::try_from(hd).ok()?, i32::try_from(vd).ok()?);
    // SAFETY: a pure function of its arguments.
    let n = unsafe { moeq_sm90_attn_bwd_block(hd, vd) };
    (n > 0).then_some(n as usize)
}

/// Whether the kernel takes the backward of q `[B, S, H, hd]`, k `[B, S, KVH, hd]`, v `[B, S,
/// KVH, vd]` (rows of one sample each, no window): enabled, bf16 on a 9.0 device, S a multiple
/// of 128, H a multiple of KVH, head sizes compiled in, grid and offsets within their limits.
pub(crate) fn serves(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> bool {
    if !enabled() || window.is_some() {
        return false;
    }
    let candle_core::Device::Cuda(dev) = q.device() else {
        return false;
    };
    if [q, k, v].iter().any(|t| t.dtype() != DType::BF16) || capability(dev) != Some((9, 0)) {
        return false;
    }
    let (Ok((b, s, h, hd)), Ok((kb, ks, kvh, kd)), Ok((vb, vs, vh, vd))) =
        (q.dims4(), k.dims4(), v.dims4())
    else {
        return false;
    };
    (kb, vb, ks, vs, kd, vh) == (b, b, s, s, hd, kvh)
        && b > 0
        && s > 0
        && h > 0
        && s % ALIGN == 0
        && kvh > 0
        && h % kvh == 0
        && block(hd, vd).is_some()
        && b <= 65_535
        && h <= 65_535
        && (b * s)
            .checked_mul(h * hd.max(vd))
            .is_some_and(|n| n <= i32::MAX as usize)
}

fn capability(dev: &CudaDevice) -> Option<(i32, i32)> {
    dev.cuda_stream().context().compute_capability().ok()
}

/// CTAs a kv head's query heads are split over: the forced count if it divides the group, else
/// the fewest powers of two (dividing the group) that give the launch `CTAS_PER_SM` CTAs an SM
/// (one is resident at a time: the rest are waves, and the causal tail is a CTA's length).
fn parts(ctas: usize, group: usize, sms: usize) -> usize {
    let forced = FORCED_PARTS.load(Ordering::Relaxed);
    if forced > 0 && group % forced == 0 {
        return forced;
    }
    let mut p = 1;
    while ctas * p < CTAS_PER_SM * sms && group % (2 * p) == 0 {
        p *= 2;
    }
    p
}

type Stream = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>;

/// Device address of a bf16 or f32 tensor's first element.
fn address(t: &Tensor, stream: &Stream) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*st else {
        bail!("attention backward (sm90): tensor not on CUDA")
    };
    let p = match &c.slice {
        S::BF16(s) => s.slice(l.start_offset()..).device_ptr(stream).0,
        S::F32(s) => s.slice(l.start_offset()..).device_ptr(stream).0,
        _ => bail!("attention backward (sm90): bf16 or f32 tensors only"),
    };
    Ok(p)
}

/// Unwritten bf16 tensors of the shapes of `ts` on `dev`, for a kernel that writes every
/// element (the attention backwards' gradients).
pub(super) fn unwritten_like(dev: &CudaDevice, ts: [&Tensor; 3]) -> Result<[Tensor; 3]> {
    let one = |t: &Tensor| -> Result<Tensor> {
        // SAFETY: the caller's kernel writes every element before anything reads one.
        let slice = unsafe { dev.alloc::<half::bf16>(t.elem_count())? };
        Ok(super::cuda_tensor(S::BF16(slice), dev, t.shape().clone()))
    };
    Ok([one(ts[0])?, one(ts[1])?, one(ts[2])?])
}

/// `[dq, dk, dv]` of causal attention over rows of one sample each, from the forward's inputs,
/// cuDNN's output and statistics (`lse [B, H, S, 1]`, natural log, sinks in them) and the
/// output's gradient; the caller checked [`serves`].
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (out, dout, lse): (&Tensor, &Tensor, &Tensor),
    scale: f32,
) -> Result<[Tensor; 3]> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let candle_core::Device::Cuda(dev) = q.device() else {
        bail!("attention backward (sm90): not on CUDA")
    };
    let z = super::at_offset_zero;
    let (q, k, v) = (z(q)?, z(k)?, z(v)?);
    let (out, lse) = (z(out)?, z(lse)?);
    let dout = z(&dout.to_dtype(DType::BF16)?)?;
    let (b, s, h, hd) = q.dims4()?;
    let (kvh, vd) = (k.dim(2)?, v.dim(3)?);
    if out.dtype() != DType::BF16 || lse.dtype() != DType::F32 || lse.dims() != [b, h, s, 1] {
        bail!(
            "attention backward (sm90): takes cuDNN's bf16 output and f32 [B, H, S, 1] \
             statistics, got {:?} and {:?} {:?}",
            out.dtype(),
            lse.dtype(),
            lse.dims()
        );
    }
    let Some(bn) = block(hd, vd) else {
        bail!("attention backward (sm90): heads of {hd}/{vd} not compiled")
    };
    let stream = dev.cuda_stream();
    let sms = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| candle_core::Error::Msg(format!("attention backward (sm90): {e:?}")))?;
    let parts = parts((s / bn) * kvh * b, h / kvh, sms.max(1) as usize);
    let tiles = s / TILE;
    // The kernel writes every element of the gradients.
    let [dq, dk, dv] = unwritten_like(dev, [&q, &k, &v])?;
    // SAFETY (every allocation below): the kernels write each element before reading it — Δ
    // fully, the accumulators' rows by their first part, the counters zeroed by the launcher —
    // and everything is freed in stream order after the launch.
    let mut delta = unsafe { dev.alloc::<f32>(b * h * s)? };
    let mut dq_acc = unsafe { dev.alloc::<f32>(q.elem_count())? };
    let kv_acc = |n: usize| unsafe { dev.alloc::<f32>(if parts > 1 { n } else { 1 }) };
    let (mut dk_acc, mut dv_acc) = (kv_acc(k.elem_count())?, kv_acc(v.elem_count())?);
    // dQ's tiles, dK/dV's key blocks (a tile's worth each), the CTAs' ticket.
    let mut counters = unsafe { dev.alloc::<i32>((b * h + b * kvh) * tiles + 1)? };
    let args = Args {
        q: address(&q, &stream)?,
        k: address(&k, &stream)?,
        v: address(&v, &stream)?,
        out: address(&out, &stream)?,
        dout: address(&dout, &stream)?,
        lse: address(&lse, &stream)?,
        dq: address(&dq, &stream)?,
        dk: address(&dk, &stream)?,
        dv: address(&dv, &stream)?,
        delta: delta.device_ptr_mut(&stream).0,
        dq_acc: dq_acc.device_ptr_mut(&stream).0,
        dk_acc: dk_acc.device_ptr_mut(&stream).0,
        dv_acc: dv_acc.device_ptr_mut(&stream).0,
        counters: counters.device_ptr_mut(&stream).0,
        b: b as i32,
        s: s as i32,
        h: h as i32,
        kvh: kvh as i32,
        hd: hd as i32,
        vd: vd as i32,
        parts: parts as i32,
        scale,
        stage: staged().into(),
    };
    // SAFETY: `serves` checked shapes, dtypes and the device; every address is a live buffer of
    // the size `Args` documents, all on candle's stream, which the launch uses.
    let status = unsafe { moeq_sm90_attn_bwd(&args, stream.cu_stream() as *mut c_void) };
    if status != 0 {
        // SAFETY: a static NUL-terminated string.
        let why = unsafe { CStr::from_ptr(moeq_sm90_attn_bwd_error(status)) }.to_string_lossy();
        bail!(
            "attention backward (sm90) failed (status {status}: {why}); MOEQ_ATTN_BWD=off runs \
             cuDNN's backward instead"
        );
    }
    if LAUNCHES.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::info!(
            "attention backward: moeq's Hopper kernel (MOEQ_ATTN_BWD=sm90; {} parts a kv head, {})",
            parts,
            if staged() && stages(hd, vd) {
                "staged"
            } else {
                "unstaged"
            }
        );
    }
    Ok([dq, dk, dv])
}
