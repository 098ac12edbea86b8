//! The router's probabilities and top-k choice from its logits `[N, E]`: `softmax` over the
//! experts in f32 and, when a pass records the routing, the k most probable experts per token
//! in descending order (ties to the lower expert). On CUDA, where the logits record no graph,
//! one warp per token does both (`kernels/routing.cu` `router_softmax_topk`): candle's softmax
//! took six element-wise passes and its arg-sort sorted all E probabilities to keep k. Elsewhere,
//! and for logits with a graph (the probabilities must then carry one), candle's softmax and
//! arg-sort: the reference (`moeq gpu-check`, the "router" entries).

use super::norm::softmax_last;
use candle_core::{DType, Result, Tensor};

/// (probabilities `[N, E]` f32, the top-`k` experts `[N, k]` u32 when `k` is given).
pub fn router_probs(logits: &Tensor, k: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
    let (_, e) = logits.dims2()?;
    if k.is_some_and(|k| k == 0 || k > e) {
        candle_core::bail!("router: top-{} of {e} experts", k.unwrap_or(0));
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && !super::records_graph(&[logits]) && e <= cuda::MAX_EXPERTS {
        return cuda::softmax_topk(&super::at_offset_zero(logits)?, k);
    }
    let probs = softmax_last(&logits.to_dtype(DType::F32)?)?;
    let top = match k {
        Some(k) => Some(
            probs
                .detach()
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .contiguous()?,
        ),
        None => None,
    };
    Ok((probs, top))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{Result, Storage, Tensor};

    /// Experts per row the kernel keeps in registers (32 lanes × `ROUTER_PER_LANE`).
    pub(super) const MAX_EXPERTS: usize = 1024;

    /// The kernel over logits `[N, E]` contiguous from offset 0.
    pub(super) fn softmax_topk(
        logits: &Tensor,
        k: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let candle_core::Device::Cuda(dev) = logits.device() else {
            candle_core::bail!("router: not on CUDA")
        };
        let (n, e) = logits.dims2()?;
        let (st, lt) = logits.storage_and_layout();
        let Storage::Cuda(cl) = &*st else {
            candle_core::bail!("router: not on CUDA")
        };
        let suffix = match &cl.slice {
            S::F32(_) => "f32",
            S::BF16(_) => "bf16",
            S::F16(_) => "f16",
            _ => candle_core::bail!("router: logits in {:?}", logits.dtype()),
        };
        let func = dev.get_or_load_custom_func(
            &format!("router_softmax_topk_{suffix}"),
            "moeq_routing",
            crate::ops::kernels::ROUTING,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel writes every probability, and every choice when asked.
        let probs = unsafe { dev.alloc::<f32>(n * e)? };
        let top = match k {
            Some(k) => Some(unsafe { dev.alloc::<u32>(n * k)? }),
            None => None,
        };
        let (e32, k32, null) = (e as i32, k.unwrap_or(0) as i32, 0u64);
        macro_rules! run {
            ($v:expr) => {{
                let l = $v.slice(lt.start_offset()..lt.start_offset() + n * e);
                let mut b = func.builder();
                b.arg(&l);
                b.arg(&probs);
                match &top {
                    Some(t) => b.arg(t),
                    None => b.arg(&null),
                };
                b.arg(&n);
                b.arg(&e32);
                b.arg(&k32);
                // SAFETY: arguments match kernels/routing.cu (a null `top`: no choice); E fits
                // the kernel's registers, k ≤ E (`router_probs` checked).
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match &cl.slice {
            S::F32(v) => run!(v),
            S::BF16(v) => run!(v),
            S::F16(v) => run!(v),
            _ => unreachable!("dtype matched above"),
        }
        drop(st);
        let probs = crate::ops::cuda_tensor(S::F32(probs), dev, (n, e).into());
        let top = top.map(|t| crate::ops::cuda_tensor(S::U32(t), dev, (n, k.unwrap_or(0)).into()));
        Ok((probs, top))
    }
}
