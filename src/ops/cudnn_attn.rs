//! cuDNN's fused causal attention (`kernels/cudnn/sdpa.cpp`, through cudnn-frontend) for bf16
//! batches. cuDNN is opened at run time — `MOEQ_CUDNN_LIB` (a folder holding
//! `libcudnn_graph.so.9`, or the file), else the loader's search path — and when it is missing
//! or refuses a shape, moeq's own kernels (`super::flash_attn`) serve instead
//! (docs/ARCHITECTURE.md, decision 26). gpu-check compares both with the CPU.
//!
//! Packed rows take cuDNN's ragged layout (Hopper and newer): every sample and padding run of the
//! micro-batch is one sequence, placed by offsets and masked by its length
//! (`super::attention::Ragged`, built once per micro-batch by [`ragged`]).
//!
//! The log-sum-exp a forward leaves for its backward is `[B, heads, S, 1]` here (`[sequences,
//! heads, longest, 1]` for packed rows) and `[B, S, heads]` from moeq's kernels:
//! `attention_backward` dispatches on it, so a forward and its backward always run on the same
//! kernels.
//!
//! gpt-oss: a sliding window of `W` keys is cuDNN's diagonal band with left bound `W` (it keeps
//! key `j` for query `i` when `j + W > i`, i.e. `i − j < W`: the frontend's
//! `sliding_window_mask`, top-left aligned, per sequence when ragged), on the forward's and the
//! backward's graphs alike. Sinks go through the statistics (natural-log lse, the frontend's
//! default) as for moeq's kernels (`super::attn_sinks`): the graphs never see them.

use super::attention::{Ragged, WindowSinks};
use super::attn_sinks::{fold_sinks, Stats};
use crate::util::switch::{EnvSwitch, ON_OFF};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::CudaStorageSlice as S;
use candle_core::{CudaDevice, DType, Result, Storage, Tensor};
use std::collections::HashSet;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// One call's shape, as `Shape` in kernels/cudnn/sdpa.cpp.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    b: i64,
    s: i64,
    h: i64,
    kvh: i64,
    d: i64,
    dv: i64,
    scale: f32,
    backward: i32,
    deterministic: i32,
    device: i32,
    ragged: i32,
    /// Ragged: the tokens of all sequences, at most (sizes cuDNN's workspace by them).
    total: i64,
    /// Keys a query sees (the diagonal band's left bound); 0: no window.
    window: i64,
}

extern "C" {
    fn moeq_cudnn_load(path: *const c_char) -> i64;
    fn moeq_sdpa_plan(shape: *const Shape, workspace: *mut i64) -> i32;
    fn moeq_sdpa_run(
        shape: *const Shape,
        ptrs: *const *mut c_void,
        workspace: *mut c_void,
        stream: *mut c_void,
    ) -> i32;
    fn moeq_cudnn_last_error() -> *const c_char;
}

fn last_error() -> String {
    // SAFETY: the wrapper returns its thread's NUL-terminated message, valid until its next call.
    unsafe { CStr::from_ptr(moeq_cudnn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Which kernels causal attention of whole rows uses on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// cuDNN where it is loaded and takes the shape, moeq's kernels elsewhere (the default).
    Auto,
    /// moeq's kernels always (the A/B reference).
    Moeq,
}

/// 0 = not read yet, 1 = Auto, 2 = Moeq.
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// The backend in force: `set_backend`'s, else `MOEQ_ATTENTION` (`moeq` or `auto`, for A/B
/// runs), else `Auto`.
pub fn backend() -> Backend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => Backend::Auto,
        2 => Backend::Moeq,
        _ => {
            let b = match std::env::var("MOEQ_ATTENTION").as_deref() {
                Ok("moeq") => Backend::Moeq,
                _ => Backend::Auto,
            };
            set_backend(b);
            b
        }
    }
}

pub fn set_backend(b: Backend) {
    let v = match b {
        Backend::Auto => 1,
        Backend::Moeq => 2,
    };
    BACKEND.store(v, Ordering::Relaxed);
}

static DETERMINISTIC: EnvSwitch = EnvSwitch::new("MOEQ_CUDNN_DETERMINISTIC", true, ON_OFF);

/// Whether the backward accumulates dq in a fixed order, so reruns are bit-identical (cuDNN's
/// dP-workspace algorithm, its bf16 `[rows, heads, S, S]` workspace bounded by `dp_limit`):
/// `set_deterministic`'s, else `MOEQ_CUDNN_DETERMINISTIC` (`0` or `1`), else yes — as fast as
/// the atomic algorithm at 4 × 2,048 positions on the H200 (BENCHMARKS.md, "Attention on cuDNN").
pub fn deterministic() -> bool {
    DETERMINISTIC.get()
}

pub fn set_deterministic(d: bool) {
    DETERMINISTIC.set(d);
}

/// A run's `full_determinism`, unless `MOEQ_CUDNN_DETERMINISTIC` names a setting (A/B runs).
pub fn set_deterministic_unless_env(d: bool) {
    DETERMINISTIC.set_unless_env(d);
}

/// The dP workspace one deterministic backward call may take: 512 MiB, two rows of 2,048
/// positions × 32 heads (whole batches took 1.1 / 2.5 GB more peak memory at 4 / 8 rows; two
/// rows a call against one: +1.8% / +2.1% tokens/s at mbs 4 / 8; launch/bench/NOTES.md item 48).
pub const DP_WORKSPACE: i64 = 512 << 20;
/// 0 = not read yet: `set_dp_workspace`'s, else `MOEQ_CUDNN_DP_MB` (A/B), else `DP_WORKSPACE`.
static DP_LIMIT: AtomicI64 = AtomicI64::new(0);

fn dp_limit() -> i64 {
    if DP_LIMIT.load(Ordering::Relaxed) == 0 {
        let mb = std::env::var("MOEQ_CUDNN_DP_MB").map(|v| v.parse::<i64>());
        let bytes = mb
            .ok()
            .and_then(|mb| mb.ok()?.checked_mul(1 << 20))
            .filter(|&b| b > 0);
        let (v, r) = (bytes.unwrap_or(DP_WORKSPACE), Ordering::Relaxed);
        let _ = DP_LIMIT.compare_exchange(0, v, r, r);
    }
    DP_LIMIT.load(Ordering::Relaxed)
}

/// Sets the dP workspace bound (gpu-check: to split a small batch into calls; 0: the default).
pub fn set_dp_workspace(bytes: i64) {
    DP_LIMIT.store(bytes, Ordering::Relaxed);
}

/// Calls that ran on cuDNN in this process (gpu-check asserts its twin took it).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// cuDNN's version once loaded (e.g. 91900), or why it is not.
pub fn library() -> &'static std::result::Result<i64, String> {
    static LIB: OnceLock<std::result::Result<i64, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let path = std::env::var("MOEQ_CUDNN_LIB")
            .ok()
            .filter(|p| !p.is_empty());
        let c = path.as_deref().map(CString::new).transpose();
        let Ok(c) = c else {
            return Err("MOEQ_CUDNN_LIB holds a NUL byte".into());
        };
        // SAFETY: a NUL-terminated path or null; the wrapper copies it.
        let v = unsafe { moeq_cudnn_load(c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())) };
        if v > 0 {
            tracing::info!(
                "attention: cuDNN {}.{}.{} fused kernels",
                v / 10000,
                v / 100 % 100,
                v % 100
            );
            Ok(v)
        } else {
            let why = last_error();
            tracing::info!(
                "attention: moeq's kernels (cuDNN not loaded: {why}; set MOEQ_CUDNN_LIB to the \
                 folder holding libcudnn_graph.so.9 to use it)"
            );
            Err(why)
        }
    })
}

/// Shapes cuDNN refused (planned once, then left to moeq's kernels).
static REFUSED: Mutex<Option<HashSet<[i64; 9]>>> = Mutex::new(None);

fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev),
        _ => candle_core::bail!("cuDNN attention: not on CUDA"),
    }
}

fn major(dev: &CudaDevice) -> i32 {
    match dev.cuda_stream().context().compute_capability() {
        Ok((major, _)) => major,
        Err(_) => 0,
    }
}

impl Shape {
    /// q `[B, S, H, D]`, k `[B, S, KVH, D]`, v `[B, S, KVH, DV]`; packed rows as `ragged`'s
    /// sequences; a window no shorter than the (longest) sequence is none.
    fn of(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (scale, window): (f32, Option<usize>),
        backward: bool,
        ragged: Option<&Ragged>,
    ) -> Result<Self> {
        let (b, s, h, d) = q.dims4()?;
        let (_, _, kvh, _) = k.dims4()?;
        let dv = v.dim(3)?;
        let (b, s) = match ragged {
            Some(r) => (r.seqs, r.max_len),
            None => (b, s),
        };
        let device = cuda_device(q)?.cuda_stream().context().ordinal() as i32;
        let i = |x: usize| x as i64;
        Ok(Shape {
            b: i(b),
            s: i(s),
            h: i(h),
            kvh: i(kvh),
            d: i(d),
            dv: i(dv),
            scale,
            backward: backward as i32,
            deterministic: deterministic() as i32,
            device,
            ragged: ragged.is_some() as i32,
            total: if ragged.is_some() {
                q.dim(0)? * q.dim(1)?
            } else {
                0
            } as i64,
            window: window.filter(|&w| w < s).map_or(0, i),
        })
    }

    fn key(&self) -> [i64; 9] {
        [
            self.window,
            self.total,
            self.b,
            self.s,
            self.h,
            self.kvh,
            self.d,
            self.dv,
            i64::from(self.scale.to_bits()) << 8
                | i64::from(self.deterministic) << 1
                | i64::from(self.ragged),
        ]
    }

    /// Builds the graph (once) and returns the workspace a run needs.
    fn plan(&self) -> std::result::Result<usize, String> {
        let mut ws = 0i64;
        // SAFETY: a plain struct read by the wrapper; `ws` outlives the call.
        if unsafe { moeq_sdpa_plan(self, &mut ws) } != 0 {
            return Err(last_error());
        }
        Ok(ws.max(0) as usize)
    }
}

/// Packed rows (`segments [B·S]`, the sample of each position) in cuDNN's ragged layout, on
/// `device`; `None` where cuDNN would not serve them (not CUDA, backend `Moeq`, cuDNN not
/// loaded, compute capability under 9.0, element offsets past int32).
pub fn ragged(
    segments: &[u32],
    (b, s): (usize, usize),
    (heads, kv_heads, head_dim): (usize, usize, usize),
    device: &candle_core::Device,
) -> Result<Option<Ragged>> {
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(None);
    };
    if backend() != Backend::Auto || major(dev) < 9 || segments.len() != b * s {
        return Ok(None);
    }
    if (b * s)
        .checked_mul(heads.max(kv_heads) * head_dim)
        .is_none_or(|e| e > i32::MAX as usize)
        || library().is_err()
    {
        return Ok(None);
    }
    Ragged::of(segments, (b, s), (heads, kv_heads, head_dim), device).map(Some)
}

/// Whether cuDNN serves causal attention over q, k, v (`[B, S, heads, hd]`, contiguous from
/// offset 0) of rows that are one sample each, or of packed rows given as `ragged`: the backend
/// is `Auto`, cuDNN is loaded, bf16 on a device of compute capability 8.0 or newer (9.0 for
/// packed rows, whose query and value head sizes must match), head sizes multiples of 16 from
/// 64 to 256, and cuDNN builds both the forward and the backward graphs of the shape (with the
/// sliding `window`, if any: where cuDNN refuses it, moeq's kernels serve).
pub(crate) fn serves(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    ragged: Option<&Ragged>,
    window: Option<usize>,
) -> bool {
    if backend() != Backend::Auto
        || !q.device().is_cuda()
        || [q, k, v]
            .iter()
            .any(|t| t.dtype() != DType::BF16 || t.rank() != 4)
    {
        return false;
    }
    let Ok(dev) = cuda_device(q) else {
        return false;
    };
    let min_major = if ragged.is_some() { 9 } else { 8 };
    if major(dev) < min_major || library().is_err() {
        return false;
    }
    let Ok(fwd) = Shape::of(q, k, v, (scale, window), false, ragged) else {
        return false;
    };
    // Real models' head sizes; the tiny test models' 16 stay on moeq's kernels (at 16 the
    // train-step check of mixtral exceeded its tolerance once, cause not yet known).
    let head_ok = |d: i64| d % 16 == 0 && (64..=256).contains(&d);
    if !head_ok(fwd.d)
        || !head_ok(fwd.dv)
        || fwd.kvh == 0
        || fwd.h % fwd.kvh != 0
        || (ragged.is_some() && fwd.d != fwd.dv)
    {
        return false;
    }
    let mut refused = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    let refused = refused.get_or_insert_with(HashSet::new);
    if refused.contains(&fwd.key()) {
        return false;
    }
    let planned = fwd.plan().and_then(|_| {
        backward_calls(&Shape { backward: 1, ..fwd })
            .iter()
            .try_for_each(|(_, call)| call.plan().map(|_| ()))
    });
    match planned {
        Ok(()) => true,
        Err(why) => {
            let what = if ragged.is_some() {
                "sequences"
            } else {
                "rows"
            };
            let window = match fwd.window {
                0 => String::new(),
                w => format!(", window {w}"),
            };
            tracing::warn!(
                "attention: cuDNN refused {} {what} × {} positions of {}/{} heads of {}/{}{window} \
                 ({why}); moeq's kernels serve this shape",
                fwd.b,
                fwd.s,
                fwd.h,
                fwd.kvh,
                fwd.d,
                fwd.dv
            );
            refused.insert(fwd.key());
            false
        }
    }
}

type Stream = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>;

/// Device address of a contiguous tensor's first element.
fn address<T: candle_core::cuda_backend::CudaDType>(t: &Tensor, stream: &Stream) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*st else {
        candle_core::bail!("cuDNN attention: tensor not on CUDA")
    };
    let slice = c.as_cuda_slice::<T>()?.slice(l.start_offset()..);
    let (p, _sync) = slice.device_ptr(stream);
    Ok(p)
}

/// Pointers of one call, in the wrapper's order (Uid − 1 in kernels/cudnn/sdpa.cpp).
const Q: usize = 0;
const STATS: usize = 4;
const DO: usize = 5;
const Q_OFF: usize = 9;
type Ptrs = [u64; 15];

/// The ragged inputs' addresses into `ptrs` (the q offsets also place the output, the kv
/// offsets both k and v; the lengths serve queries and keys).
fn ragged_ptrs(ptrs: &mut Ptrs, r: &Ragged, stream: &Stream) -> Result<()> {
    let (qo, kvo, lens) = (
        address::<u32>(&r.q_offsets, stream)?,
        address::<u32>(&r.kv_offsets, stream)?,
        address::<u32>(&r.lens, stream)?,
    );
    ptrs[Q_OFF..].copy_from_slice(&[qo, kvo, kvo, qo, lens, lens]);
    Ok(())
}

/// Runs `shape`'s graph over `ptrs` with a fresh workspace on the device's stream.
fn run(dev: &CudaDevice, shape: &Shape, ptrs: &Ptrs) -> Result<()> {
    let bytes = shape
        .plan()
        .map_err(|why| candle_core::Error::Msg(format!("cuDNN attention: {why}")))?;
    let stream = dev.cuda_stream();
    // SAFETY: cuDNN's scratch, written before it is read; freed in stream order after the call.
    let mut ws = unsafe { dev.alloc::<u8>(bytes.max(1))? };
    let (wp, _ws_sync) = ws.device_ptr_mut(&stream);
    let raw: Vec<*mut c_void> = ptrs.iter().map(|&p| p as *mut c_void).collect();
    // SAFETY: `serves` checked the shapes against cuDNN; every pointer addresses a live
    // contiguous buffer of the shape `shape` describes, and the graph runs on candle's stream.
    let status = unsafe {
        moeq_sdpa_run(
            shape,
            raw.as_ptr(),
            wp as *mut c_void,
            stream.cu_stream() as *mut c_void,
        )
    };
    if status != 0 {
        candle_core::bail!("cuDNN attention failed: {}", last_error());
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `(out [B, S, H, DV], lse)`, the sinks of `extras` (checked) in both; inputs contiguous
/// from offset 0. The lse is `[B, H, S, 1]` f32, or `[sequences, H, longest, 1]` for packed
/// rows.
pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    ragged: Option<&Ragged>,
    extras: &WindowSinks,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(q)?;
    let shape = Shape::of(q, k, v, (scale, extras.window), false, ragged)?;
    let (b, s, h, _) = q.dims4()?;
    let dv = v.dim(3)?;
    let stream = dev.cuda_stream();
    let (lb, ls) = (shape.b as usize, shape.s as usize);
    // SAFETY: cuDNN writes every element of the output and every statistic the backward reads.
    let out = unsafe { dev.alloc::<half::bf16>(b * s * h * dv)? };
    let lse = unsafe { dev.alloc::<f32>(lb * h * ls)? };
    let wrap = super::cuda_tensor;
    let out = wrap(S::BF16(out), dev, (b, s, h, dv).into());
    let lse = wrap(S::F32(lse), dev, (lb, h, ls, 1).into());
    let mut ptrs: Ptrs = [0; 15];
    ptrs[..=STATS].copy_from_slice(&[
        address::<half::bf16>(q, &stream)?,
        address::<half::bf16>(k, &stream)?,
        address::<half::bf16>(v, &stream)?,
        address::<half::bf16>(&out, &stream)?,
        address::<f32>(&lse, &stream)?,
    ]);
    if let Some(r) = ragged {
        ragged_ptrs(&mut ptrs, r, &stream)?;
    }
    run(dev, &shape, &ptrs)?;
    let stats = match ragged {
        None => Stats::Cudnn,
        Some(r) => Stats::CudnnRagged {
            rows: &r.stats_rows,
        },
    };
    match &extras.sinks {
        None => Ok((out, lse)),
        Some(sinks) => fold_sinks(&out, &lse, sinks, stats),
    }
}

/// The backward of `shape` as calls over consecutive rows (sequences, when ragged): `(first,
/// call shape)`. The deterministic algorithm's workspace grows with the rows of a call, so it
/// takes as many as fit its bound (`dp_limit`; at least one) — a power of two of sequences when
/// ragged, which divides their power-of-two count; the atomic one takes all.
fn backward_calls(shape: &Shape) -> Vec<(i64, Shape)> {
    let pad = (shape.s + 63) / 64 * 64;
    let per_row = shape.h * pad * pad * 2;
    let mut rows = if shape.deterministic != 0 {
        (dp_limit() / per_row.max(1)).clamp(1, shape.b)
    } else {
        shape.b
    };
    if shape.ragged != 0 && rows < shape.b {
        rows = 1 << (63 - rows.leading_zeros());
    }
    (0..shape.b)
        .step_by(rows as usize)
        .map(|r0| {
            let call = Shape {
                b: rows.min(shape.b - r0),
                ..*shape
            };
            (r0, call)
        })
        .collect()
}

/// Whether `lse` came from [`forward`] (its rank of 4).
pub(crate) fn is_its_lse(lse: &Tensor) -> bool {
    lse.rank() == 4
}

/// `[dq, dk, dv]` from the forward's inputs, its output, the output's gradient and its lse
/// (`grads`; with the sinks in output and lse, as [`forward`] left them), for the same rows
/// (`ragged`) and window as the forward.
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (out, dout, lse): (&Tensor, &Tensor, &Tensor),
    scale: f32,
    ragged: Option<&Ragged>,
    window: Option<usize>,
) -> Result<[Tensor; 3]> {
    let dev = cuda_device(q)?;
    let shape = Shape::of(q, k, v, (scale, window), true, ragged)?;
    let z = super::at_offset_zero;
    let dout = z(&dout.to_dtype(DType::BF16)?)?;
    let (out, lse) = (z(out)?, z(lse)?);
    let stream = dev.cuda_stream();
    // cuDNN writes every element of the three gradients.
    let [dq, dk, dv] = super::attn_sm90::unwritten_like(dev, [q, k, v])?;
    let bf = |t: &Tensor| address::<half::bf16>(t, &stream);
    let mut base: Ptrs = [0; 15];
    base[Q..Q_OFF].copy_from_slice(&[
        bf(q)?,
        bf(k)?,
        bf(v)?,
        bf(&out)?,
        address::<f32>(&lse, &stream)?,
        bf(&dout)?,
        bf(&dq)?,
        bf(&dk)?,
        bf(&dv)?,
    ]);
    // Bytes per row (sequence) of each buffer in `base`'s order: rows are the outermost
    // dimension; with ragged rows only the statistics and the per-sequence inputs move, the
    // offsets placing each sequence in the token buffers.
    let (s, h, kvh, d, dvh) = (shape.s, shape.h, shape.kvh, shape.d, shape.dv);
    let mut row = [0i64; 15];
    row[STATS] = h * s * 4;
    match ragged {
        Some(r) => {
            ragged_ptrs(&mut base, r, &stream)?;
            row[Q_OFF..].copy_from_slice(&[4; 6]);
        }
        None => {
            let (qb, kb, vb, ob) = (
                s * h * d * 2,
                s * kvh * d * 2,
                s * kvh * dvh * 2,
                s * h * dvh * 2,
            );
            row[..STATS].copy_from_slice(&[qb, kb, vb, ob]);
            row[DO..Q_OFF].copy_from_slice(&[ob, qb, kb, vb]);
        }
    }
    for (r0, call) in backward_calls(&shape) {
        let mut ptrs = base;
        for (p, bytes) in ptrs.iter_mut().zip(row) {
            if *p != 0 {
                *p += (r0 * bytes) as u64;
            }
        }
        run(dev, &call, &ptrs)?;
    }
    Ok([dq, dk, dv])
}
