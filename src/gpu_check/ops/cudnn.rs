//! gpu-check entry for cuDNN's fused attention (`ops::cudnn_attn`): the attention block over rows
//! of one sample each — the batches cuDNN serves — through cuDNN (both backward algorithms) and
//! through moeq's kernels, all against the CPU in f32.

use super::{device_vs_cpu, Comparison};
use crate::ops::attention_block::{attention_block, BlockArgs};
use crate::ops::cudnn_attn::{
    launches, library, set_backend, set_deterministic, set_dp_workspace, Backend,
};
use candle_core::{DType, Device, Result, Tensor};

/// Restores the defaults however the check ends.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        set_backend(Backend::Auto);
        set_deterministic(true);
        set_dp_workspace(256 << 20);
    }
}

/// Skipped without cuDNN, unless `MOEQ_REQUIRE_CUDNN=1` (launch/gpu-check.sh sets it where
/// cuDNN is installed), which makes a missing cuDNN a failure.
pub(super) fn check_cudnn_attention(device: &Device) -> Result<Vec<Comparison>> {
    if !device.is_cuda() {
        return Ok(Vec::new());
    }
    if let Err(why) = library() {
        if std::env::var("MOEQ_REQUIRE_CUDNN").as_deref() == Ok("1") {
            candle_core::bail!(
                "cuDNN attention: MOEQ_REQUIRE_CUDNN=1 but cuDNN is not loaded: {why}"
            );
        }
        println!("attention (cuDNN): skipped, cuDNN not loaded ({why})");
        return Ok(Vec::new());
    }
    let _restore = Restore;
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // Rows of one sample: 2 × 1,024 positions; 8 query heads on 2 kv heads of 128 with per-head
    // norms (Qwen3's layout), and 4 heads on 4 of 64 without.
    for (nh, kvh, hd, norms) in [(8usize, 2usize, 128usize, true), (4, 4, 64, false)] {
        let (b, s) = (2usize, 1024usize);
        let n = b * s;
        let qkv = [nh, kvh, kvh]
            .iter()
            .map(|&h| Tensor::randn(0f32, 1.0, (n, h * hd), cpu))
            .collect::<Result<Vec<_>>>()?;
        let norm_w = [
            Tensor::randn(0f32, 0.2, hd, cpu)?.affine(1.0, 1.0)?,
            Tensor::randn(0f32, 0.2, hd, cpu)?.affine(1.0, 1.0)?,
        ];
        let angle = Tensor::randn(0f32, 1.0, (n, 1, hd), cpu)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let block = |t: &[Tensor]| -> Result<Tensor> {
            let dev = t[0].device();
            let to = |x: &Tensor| x.to_device(dev)?.to_dtype(t[0].dtype());
            let (wq, wk) = (to(&norm_w[0])?, to(&norm_w[1])?);
            let (cos, sin) = (to(&angle.cos()?)?, to(&angle.sin()?)?);
            let segments = Tensor::zeros((b, s), DType::U32, dev)?;
            let args = BlockArgs {
                batch: b,
                seq: s,
                heads: nh,
                kv_heads: kvh,
                head_dim: hd,
                norms: norms.then_some((&wq, &wk, 1e-6)),
                cos: &cos,
                sin: &sin,
                segments: &segments,
                whole_rows: true,
                scale,
                block: 256,
                memo: None,
            };
            attention_block(&t[0], &t[1], &t[2], &args)
        };
        // cuDNN calls: the forward and one backward; the deterministic backward bounded to one
        // row's dP workspace runs one call per row.
        let row_dp = (nh * s * s * 2) as i64;
        for (name, backend, deterministic, calls) in [
            ("cuDNN", Backend::Auto, false, 2),
            ("cuDNN, deterministic backward", Backend::Auto, true, 2),
            (
                "cuDNN, deterministic backward by rows",
                Backend::Auto,
                true,
                1 + b as u64,
            ),
            ("moeq's kernels", Backend::Moeq, true, 0),
        ] {
            set_backend(backend);
            set_deterministic(deterministic);
            set_dp_workspace(if calls > 2 { row_dp } else { 256 << 20 });
            let before = launches();
            out.extend(device_vs_cpu(
                &format!("attention block, whole rows, {nh}/{kvh} heads of {hd} ({name})"),
                "attention_block",
                device,
                DType::BF16,
                &qkv,
                &block,
            )?);
            let took = launches() - before;
            if took != calls {
                candle_core::bail!(
                    "cuDNN attention ({name}, head size {hd}): {took} cuDNN calls, expected {calls}"
                );
            }
        }
    }
    Ok(out)
}
