//! Cross-entropy over the vocabulary, computed a chunk of tokens at a time together with its
//! gradient w.r.t. the final hidden states, so logits for the whole batch never exist (fp32
//! logits of 16k tokens × 152k vocabulary would be 10 GB). The frozen `lm_head` gets no
//! gradient. The trainer feeds `dL/dh` into the per-layer backward (docs/ARCHITECTURE.md, decision 3).
//!
//! h: [N, H], W (lm_head): [V, H], labels: N targets (−100 = ignored) →
//! loss = mean over labelled rows of (logsumexp(h·Wᵀ) − (h·Wᵀ)[label]),
//! dL/dh = (softmax(h·Wᵀ) − onehot(label)) · W / n_labelled (zero rows where ignored).

use crate::data::IGNORE_INDEX;
use crate::ops::cross_entropy::cross_entropy_rows;
use candle_core::{DType, Result, Tensor};

pub struct LossAndGrad {
    /// Mean over labelled tokens (0 when there are none).
    pub loss: f32,
    /// dL/dh, same shape and dtype as h.
    pub grad_h: Tensor,
    pub labelled: usize,
}

pub fn chunked_cross_entropy(
    h: &Tensor,
    lm_head: &Tensor,
    labels: &[i32],
    chunk: usize,
) -> Result<LossAndGrad> {
    let (n, _) = h.dims2()?;
    if labels.len() != n {
        candle_core::bail!("cross-entropy: {} labels for {n} tokens", labels.len());
    }
    let vocab = lm_head.dim(0)?;
    let labelled = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if let Some(bad) = labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab))
    {
        candle_core::bail!("cross-entropy: label {bad} outside the vocabulary of {vocab}");
    }
    // The head's products run in the compute dtype and the loss reads those logits in f32, as
    // transformers does (bf16 logits upcast for the loss); only f32 runs get f32 products.
    let w = lm_head.to_dtype(h.dtype())?;
    let denom = labelled.max(1) as f64;
    let device = h.device();
    let mut loss = Tensor::zeros((), DType::F32, device)?;
    let mut grads = Vec::new();
    let chunk = chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let rows = &labels[start..start + len];
        let weights: Vec<f32> = rows
            .iter()
            .map(|&l| f32::from(u8::from(l != IGNORE_INDEX)))
            .collect();
        let targets: Vec<u32> = rows
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 })
            .collect();
        let logits = h.narrow(0, start, len)?.matmul(&w.t()?)?; // [len, V], freed after this chunk
        let (dlogits, per_row) = cross_entropy_rows(
            &logits,
            &Tensor::from_vec(targets, len, device)?,
            &Tensor::from_vec(weights, len, device)?,
            (1.0 / denom) as f32,
        )?;
        loss = (loss + per_row.sum_all()?)?;
        grads.push(dlogits.matmul(&w)?);
    }
    let grad_h = if grads.is_empty() {
        h.zeros_like()?
    } else {
        Tensor::cat(&grads, 0)?
    };
    Ok(LossAndGrad {
        loss: (loss.to_scalar::<f32>()? as f64 / denom) as f32,
        grad_h,
        labelled,
    })
}
