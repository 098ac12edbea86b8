//! Cross-entropy of logit rows together with its gradient, in one pass per row
//! (`kernels/cross_entropy.cu` on CUDA, the loop below on the CPU): the chunked loss
//! (`train::loss`) calls it on each chunk's logits in the compute dtype instead of a dozen f32
//! elementwise passes. Not an autograd op: the loss hands `dL/dh` to the layers itself.
//!
//! logits `[R, V]`, targets `[R]` u32, row weights `[R]` f32 (0 for ignored rows), `scale` →
//! `dlogits = scale · w · (softmax(x) − onehot(t))` in the logits' dtype and
//! `loss = w · (logsumexp(x) − x[t])` f32 `[R]`, all arithmetic in f32.

use candle_core::{DType, Device, Result, Tensor, D};

fn check(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows]
        || weights.dims() != [rows]
        || targets.dtype() != DType::U32
        || weights.dtype() != DType::F32
    {
        candle_core::bail!(
            "cross_entropy_rows: targets {:?} {:?} / weights {:?} {:?} for logits {:?}",
            targets.dims(),
            targets.dtype(),
            weights.dims(),
            weights.dtype(),
            logits.dims()
        );
    }
    // On the GPU the kernel turns a target outside the vocabulary into a NaN loss instead of
    // a copy of the targets to the host here.
    if targets.device().is_cpu() {
        let t: Vec<u32> = targets.to_vec1()?;
        if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!(
                "cross_entropy_rows: target {bad} outside the vocabulary of {vocab}"
            );
        }
    }
    Ok((rows, vocab))
}

/// The CPU loop in f32.
fn cross_entropy_rows_cpu(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = logits.dims2()?;
    let x: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut dx = vec![0f32; x.len()];
    let mut loss = vec![0f32; rows];
    for r in 0..rows {
        let xs = &x[r * vocab..(r + 1) * vocab];
        let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = xs.iter().map(|&v| (v - m).exp()).sum::<f32>().ln() + m;
        let (w, t) = (weights[r], targets[r] as usize);
        for (j, d) in dx[r * vocab..(r + 1) * vocab].iter_mut().enumerate() {
            let p = (xs[j] - lse).exp() - if j == t { 1.0 } else { 0.0 };
            *d = scale * w * p;
        }
        loss[r] = w * (lse - xs[t]);
    }
    Ok((
        Tensor::from_vec(dx, (rows, vocab), logits.device())?.to_dtype(logits.dtype())?,
        Tensor::from_vec(loss, rows, logits.device())?,
    ))
}

#[cfg(feature = "cuda")]
fn cross_entropy_rows_cuda(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::Storage;
    let Device::Cuda(dev) = logits.device() else {
        candle_core::bail!("cross_entropy_rows: not on CUDA")
    };
    let (rows, vocab) = logits.dims2()?;
    let logits = super::at_offset_zero(logits)?;
    let targets = super::at_offset_zero(targets)?;
    let weights = super::at_offset_zero(weights)?;
    let (sx, _) = logits.storage_and_layout();
    let (st, _) = targets.storage_and_layout();
    let (sw, _) = weights.storage_and_layout();
    let (Storage::Cuda(sx), Storage::Cuda(st), Storage::Cuda(sw)) = (&*sx, &*st, &*sw) else {
        candle_core::bail!("cross_entropy_rows: not on CUDA")
    };
    let (S::U32(t), S::F32(w)) = (&st.slice, &sw.slice) else {
        candle_core::bail!("cross_entropy_rows: targets must be u32 and weights f32")
    };
    // SAFETY: the kernel writes every row's loss.
    let loss = unsafe { dev.alloc::<f32>(rows)? };
    let (vocab32, cfg) = (
        vocab as i32,
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        },
    );
    macro_rules! run {
        ($x:expr, $suffix:literal, $wrap:path) => {{
            let func = dev.get_or_load_custom_func(
                concat!("cross_entropy_rows_", $suffix),
                "moeq_cross_entropy",
                crate::ops::kernels::CROSS_ENTROPY,
            )?;
            // SAFETY: the kernel writes every element of the gradient.
            let dx = unsafe { dev.alloc(rows * vocab)? };
            let mut args = func.builder();
            args.arg($x);
            args.arg(t);
            args.arg(w);
            args.arg(&dx);
            args.arg(&loss);
            args.arg(&vocab32);
            args.arg(&scale);
            // SAFETY: arguments match kernels/cross_entropy.cu.
            unsafe { args.launch(cfg) }.w()?;
            $wrap(dx)
        }};
    }
    let dx = match &sx.slice {
        S::F32(x) => run!(x, "f32", S::F32),
        S::BF16(x) => run!(x, "bf16", S::BF16),
        S::F16(x) => run!(x, "f16", S::F16),
        _ => candle_core::bail!("cross_entropy_rows: logits must be f32, bf16 or f16"),
    };
    let wrap = |slice| {
        Tensor::from_storage(
            Storage::Cuda(candle_core::CudaStorage {
                slice,
                device: dev.clone(),
            }),
            logits.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )
    };
    let loss = Tensor::from_storage(
        Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(loss, dev.clone())),
        rows,
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((wrap(dx), loss))
}

/// `(dlogits, loss per row)` of logits `[R, V]` against `targets [R]` (u32) with row weights
/// `[R]` (f32; 0 ignores a row) and gradient scale `scale`; see the module documentation.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    check(logits, targets, weights)?;
    match logits.device() {
        Device::Cpu => {
            cross_entropy_rows_cpu(logits, &targets.to_vec1()?, &weights.to_vec1()?, scale)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cross_entropy_rows_cuda(logits, targets, weights, scale),
        #[allow(unreachable_patterns)]
        d => candle_core::bail!("cross_entropy_rows: device {d:?} not supported"),
    }
}

/// The primitive-op version the op is tested against (f32 logits, max-shifted logsumexp,
/// one-hot by scatter).
pub fn cross_entropy_rows_reference(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = check(logits, targets, weights)?;
    let x = logits.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let lse = (x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let probs = x.broadcast_sub(&lse)?.exp()?;
    let t = targets.unsqueeze(1)?;
    let onehot = Tensor::zeros((rows, vocab), DType::F32, x.device())?.scatter_add(
        &t,
        &Tensor::ones((rows, 1), DType::F32, x.device())?,
        1,
    )?;
    let w = weights.unsqueeze(1)?;
    let dx = ((probs - onehot)?.broadcast_mul(&w)? * scale as f64)?;
    let loss = ((lse - x.gather(&t, 1)?)? * &w)?.squeeze(1)?;
    Ok((dx.to_dtype(logits.dtype())?, loss))
}
