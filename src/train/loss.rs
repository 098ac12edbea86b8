//! Cross-entropy over the vocabulary, computed a chunk of tokens at a time together with its
//! gradient w.r.t. the final hidden states, so logits for the whole batch never exist (fp32
//! logits of 16k tokens × 152k vocabulary would be 10 GB). The frozen `lm_head` gets no
//! gradient. The trainer feeds `dL/dh` into the per-layer backward (DESIGN decision 3).
//!
//! h: [N, H], W (lm_head): [V, H], labels: N targets (−100 = ignored) →
//! loss = mean over labelled rows of (logsumexp(h·Wᵀ) − (h·Wᵀ)[label]),
//! dL/dh = (softmax(h·Wᵀ) − onehot(label)) · W / n_labelled (zero rows where ignored).

use crate::data::IGNORE_INDEX;
use candle_core::{DType, Result, Tensor, D};

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
    // The head's products run in the compute dtype with the logits then taken to f32, as
    // transformers does (bf16 logits upcast for the loss); only f32 runs get f32 products.
    let w = lm_head.to_dtype(h.dtype())?;
    let denom = labelled.max(1) as f64;
    let mut loss = 0f64;
    let mut grads = Vec::new();
    let chunk = chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let hc = h.narrow(0, start, len)?;
        let logits = hc.matmul(&w.t()?)?.to_dtype(DType::F32)?; // [len, V], freed after this chunk
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?;
        let lse = (sum_exp.log()? + &max)?; // [len, 1]
        let probs = logits.broadcast_sub(&lse)?.exp()?;
        let rows = &labels[start..start + len];
        let mask: Vec<f32> = rows
            .iter()
            .map(|&l| f32::from(u8::from(l != IGNORE_INDEX)))
            .collect();
        let targets: Vec<u32> = rows
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 })
            .collect();
        let device = h.device();
        let targets = Tensor::from_vec(targets, len, device)?;
        let mask = Tensor::from_vec(mask, (len, 1), device)?;
        let target_logit = logits.gather(&targets.unsqueeze(1)?, 1)?; // [len, 1]
        let per_row = ((&lse - &target_logit)? * &mask)?;
        loss += per_row.sum_all()?.to_scalar::<f32>()? as f64;
        let onehot = Tensor::zeros((len, vocab), DType::F32, device)?.scatter_add(
            &targets.unsqueeze(1)?,
            &Tensor::ones((len, 1), DType::F32, device)?,
            1,
        )?;
        let dlogits = ((probs - onehot)?.broadcast_mul(&mask)? / denom)?;
        grads.push(dlogits.to_dtype(h.dtype())?.matmul(&w)?);
    }
    let grad_h = if grads.is_empty() {
        h.zeros_like()?
    } else {
        Tensor::cat(&grads, 0)?
    };
    Ok(LossAndGrad {
        loss: (loss / denom) as f32,
        grad_h,
        labelled,
    })
}
