//! Fused causal attention on CUDA (`kernels/flash_attn.cu`): the FlashAttention-2 recurrence on
//! tensor cores for bf16 with head size 64 or 128 — scores never leave the chip, the forward
//! keeps one log-sum-exp per row for the backward, and the backward runs one kernel for dq
//! (over key tiles) and one for dk/dv (over query tiles and the query heads of each kv head),
//! so no gradient is accumulated with atomics and results are deterministic. Same masking and
//! arguments as [`super::attention::attention_with`], whose blocked op is the CPU reference and
//! the path for every other dtype or head size (gpu-check compares the two). A sliding window is
//! in the kernels' mask; sinks are folded into the output and lse after the forward
//! (`super::attn_sinks`), and the backward needs nothing more.

use super::attention::WindowSinks;
use super::attn_sinks::{fold_sinks, Stats};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice as S, WrapErr};
use candle_core::{CudaDevice, CustomOp3, DType, Layout, Result, Storage, Tensor};
use std::sync::Mutex;

/// Query rows (and keys) per tile and threads per block (kernels/flash_attn.cu).
const TILE: usize = 64;
const THREADS: u32 = 128;

/// Whether the fused kernels serve these inputs: bf16 on CUDA, head size 64 or 128.
pub(crate) fn serves(q: &Tensor, k: &Tensor, v: &Tensor, head_dim: usize) -> bool {
    q.device().is_cuda()
        && [q, k, v].iter().all(|t| t.dtype() == DType::BF16)
        && matches!(head_dim, 64 | 128)
}

/// Dynamic shared memory of each kernel: tiles of 64 rows padded by 8 elements, plus the
/// per-row vectors (segments; lse and dot in dk/dv), as laid out in the kernels.
fn smem_bytes(kernel: &str, hd: usize) -> usize {
    let tile = TILE * (hd + 8) * 2;
    match kernel {
        "flash_fwd" => 5 * tile + 2 * TILE * 4,
        "flash_bwd_dq" => 6 * tile + 2 * TILE * 4,
        _ => 6 * tile + 6 * TILE * 4,
    }
}

type Guard<'a> = (candle_core::StorageRef<'a>, &'a Layout);

/// The CUDA elements of a guarded tensor from its start offset.
fn view<'a, T: CudaDType>(g: &'a Guard<'_>) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = &*g.0 else {
        candle_core::bail!("flash attention: tensor not on CUDA")
    };
    Ok(c.as_cuda_slice::<T>()?.slice(g.1.start_offset()..))
}

fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev),
        _ => candle_core::bail!("flash attention: not on CUDA"),
    }
}

/// Shapes of one call: batch, positions, query heads, kv heads, head size.
struct Dims {
    b: usize,
    s: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor) -> Result<Self> {
        let (b, s, nh, hd) = q.dims4()?;
        let (_, _, kvh, _) = k.dims4()?;
        Ok(Dims { b, s, nh, kvh, hd })
    }

    fn ints(&self) -> Result<[i32; 3]> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("flash attention: {v}")))
        };
        Ok([int(self.s)?, int(self.nh)?, int(self.kvh)?])
    }

    /// Grid over 64-row tiles of positions × `heads` × batch.
    fn grid(&self, heads: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.s.div_ceil(TILE) as u32, heads as u32, self.b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Loads `{kernel}_hd{hd}` with its dynamic shared memory allowed, and the launch config.
fn load(
    dev: &CudaDevice,
    kernel: &str,
    d: &Dims,
    heads: usize,
) -> Result<(CudaFunction, LaunchConfig)> {
    let func = dev.get_or_load_custom_func(
        &format!("{kernel}_hd{}", d.hd),
        "moeq_flash_attn",
        super::kernels::FLASH_ATTN,
    )?;
    let smem = smem_bytes(kernel, d.hd);
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    let mut cfg = d.grid(heads);
    cfg.shared_mem_bytes = smem as u32;
    Ok((func.into_cuda_function(), cfg))
}

/// `(out [B, S, nh, hd], lse [B, S, nh] f32)`, the sinks of `extras` (checked) in both; inputs
/// contiguous from offset 0.
pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f32,
    extras: &WindowSinks,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(q)?;
    let d = Dims::of(q, k)?;
    let [s, nh, kvh] = d.ints()?;
    let (func, cfg) = load(dev, "flash_fwd", &d, d.nh)?;
    let stream = dev.cuda_stream();
    let (gq, gk, gv, gs) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
        segments.storage_and_layout(),
    );
    // SAFETY: the kernel writes every row of both outputs.
    let out = unsafe { dev.alloc::<half::bf16>(q.elem_count())? };
    let lse = unsafe { dev.alloc::<f32>(d.b * d.s * d.nh)? };
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let window = extras.kernel_window();
    let (vq, vk, vv, vs) = (
        view::<half::bf16>(&gq)?,
        view::<half::bf16>(&gk)?,
        view::<half::bf16>(&gv)?,
        view::<u32>(&gs)?,
    );
    let mut a = stream.launch_builder(&func);
    a.arg(&vq).arg(&vk).arg(&vv).arg(&vs).arg(&out).arg(&lse);
    a.arg(&s).arg(&nh).arg(&kvh).arg(&window).arg(&scale_log2);
    // SAFETY: arguments match kernels/flash_attn.cu; shapes checked by the caller.
    unsafe { a.launch(cfg) }.w()?;
    let wrap = super::cuda_tensor;
    let out = wrap(S::BF16(out), dev, q.shape().clone());
    let lse = wrap(S::F32(lse), dev, (d.b, d.s, d.nh).into());
    match &extras.sinks {
        None => Ok((out, lse)),
        Some(sinks) => fold_sinks(&out, &lse, sinks, Stats::Flash),
    }
}

/// `[dq, dk, dv]` from the forward's inputs, output, output's gradient and lse (`grads`; with
/// the sinks in output and lse, as [`forward`] left them) and the forward's window.
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    (out, dout, lse): (&Tensor, &Tensor, &Tensor),
    scale: f32,
    extras: &WindowSinks,
) -> Result<[Tensor; 3]> {
    let dev = cuda_device(q)?;
    let d = Dims::of(q, k)?;
    let [s, nh, kvh] = d.ints()?;
    let dout = super::at_offset_zero(&dout.to_dtype(DType::BF16)?)?;
    let out = super::at_offset_zero(out)?;
    let rows = d.b * d.s * d.nh;
    let (gq, gk, gv, gs) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
        segments.storage_and_layout(),
    );
    let (gdo, go, gl) = (
        dout.storage_and_layout(),
        out.storage_and_layout(),
        lse.storage_and_layout(),
    );
    let (vq, vk, vv, vs) = (
        view::<half::bf16>(&gq)?,
        view::<half::bf16>(&gk)?,
        view::<half::bf16>(&gv)?,
        view::<u32>(&gs)?,
    );
    let (vdo, vo, vl) = (
        view::<half::bf16>(&gdo)?,
        view::<half::bf16>(&go)?,
        view::<f32>(&gl)?,
    );
    // dot = Σ dout·out per row, one warp per row.
    let func = dev.get_or_load_custom_func(
        &format!("flash_bwd_dot_hd{}", d.hd),
        "moeq_flash_attn",
        super::kernels::FLASH_ATTN,
    )?;
    // SAFETY: the kernel writes every row.
    let dot = unsafe { dev.alloc::<f32>(rows)? };
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(THREADS as usize / 32) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = func.builder();
    a.arg(&vdo).arg(&vo).arg(&dot).arg(&rows);
    // SAFETY: arguments match kernels/flash_attn.cu.
    unsafe { a.launch(cfg) }.w()?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let window = extras.kernel_window();
    // SAFETY: the kernels write every row of dq, dk and dv.
    let dq = unsafe { dev.alloc::<half::bf16>(q.elem_count())? };
    let dk = unsafe { dev.alloc::<half::bf16>(k.elem_count())? };
    let dv = unsafe { dev.alloc::<half::bf16>(v.elem_count())? };
    let stream = dev.cuda_stream();
    // dq over the query heads' tiles, then dk/dv over the kv heads' tiles: the same inputs,
    // then their outputs and the shapes.
    for (kernel, heads) in [("flash_bwd_dq", d.nh), ("flash_bwd_dkv", d.kvh)] {
        let (func, cfg) = load(dev, kernel, &d, heads)?;
        let mut a = stream.launch_builder(&func);
        a.arg(&vq)
            .arg(&vk)
            .arg(&vv)
            .arg(&vs)
            .arg(&vdo)
            .arg(&vl)
            .arg(&dot);
        if kernel == "flash_bwd_dq" {
            a.arg(&dq);
        } else {
            a.arg(&dk).arg(&dv);
        }
        a.arg(&s).arg(&nh).arg(&kvh).arg(&window);
        a.arg(&scale_log2).arg(&scale);
        // SAFETY: arguments match kernels/flash_attn.cu.
        unsafe { a.launch(cfg) }.w()?;
    }
    let wrap = super::cuda_tensor;
    Ok([
        wrap(S::BF16(dq), dev, q.shape().clone()),
        wrap(S::BF16(dk), dev, k.shape().clone()),
        wrap(S::BF16(dv), dev, v.shape().clone()),
    ])
}

struct FlashAttention {
    segments: Tensor,
    /// Checked (`WindowSinks::prepared`).
    extras: WindowSinks,
    scale: f32,
    /// The lse of the forward that recorded the node, for its backward.
    lse: Mutex<Option<Tensor>>,
}

impl FlashAttention {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (out, lse) = forward(q, k, v, &self.segments, self.scale, &self.extras)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok(out)
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    super::tensor_forward!(3, "flash_attention", forward);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: attention", q.device());
        let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lse = match saved {
            Some(lse) => lse,
            None => forward(q, k, v, &self.segments, self.scale, &self.extras)?.1,
        };
        let grads = (out, dout, &lse);
        let [dq, dk, dv] = backward(q, k, v, &self.segments, grads, self.scale, &self.extras)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Causal attention within packed sequences on the fused kernels; inputs as
/// [`super::attention::attention_with`] (already checked there), contiguous from offset 0.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f32,
    extras: &WindowSinks,
) -> Result<Tensor> {
    if !segments.device().same_device(q.device()) {
        candle_core::bail!("flash attention: segments are not on the inputs' device");
    }
    let op = FlashAttention {
        segments: super::at_offset_zero(segments)?,
        extras: extras.clone(),
        scale,
        lse: Mutex::new(None),
    };
    if super::records_graph(&[q, k, v]) {
        q.apply_op3(k, v, op)
    } else {
        forward(q, k, v, &op.segments, scale, extras).map(|(out, _)| out)
    }
}
