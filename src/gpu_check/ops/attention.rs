//! gpu-check entries for the attention path: the masked softmax, the blocked attention (and
//! on CUDA in bf16 the fused kernels) at head sizes 64 and 128, gpt-oss's sliding window and
//! sinks on both, and the attention block.

use super::{device_vs_cpu, Comparison};
use crate::ops::attention::{attention, attention_with, WindowSinks};
use crate::ops::attention_block::{attention_block, BlockArgs};
use crate::ops::attn_softmax::masked_softmax;
use candle_core::{DType, Device, Result, Tensor};

/// The attention-path comparisons on `device` in `dtype` against the CPU in f32 (see
/// `device_vs_cpu`).
pub(super) fn check_attention(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    // Masked attention softmax: 2 × 4 heads × 300 positions (more keys than a warp's 32
    // lanes), batch 0 packed as samples of 120, 100 and 80 tokens.
    let seg: Vec<u32> = (0..600u32)
        .map(|p| match p {
            120..220 => 1,
            220..300 => 2,
            _ => 0,
        })
        .collect();
    let scores = (Tensor::randn(0f32, 1.0, (2, 4, 300, 300), cpu)? * 3.0)?;
    out.extend(device_vs_cpu(
        "masked_softmax",
        "masked_softmax",
        device,
        dtype,
        &[scores],
        &|t| {
            let segments = Tensor::from_slice(&seg, (2, 300), t[0].device())?;
            masked_softmax(&t[0], &segments, 0.125, &WindowSinks::default())
        },
    )?);
    // The same with a window of 50 keys and sinks of both signs, one per head.
    out.extend(device_vs_cpu(
        "masked_softmax (window 50, sinks)",
        "masked_softmax",
        device,
        dtype,
        &[(Tensor::randn(0f32, 1.0, (2, 4, 300, 300), cpu)? * 3.0)?],
        &|t| {
            let segments = Tensor::from_slice(&seg, (2, 300), t[0].device())?;
            let extras = WindowSinks {
                window: Some(50),
                sinks: Some(Tensor::new(&SINKS[..4], t[0].device())?),
            };
            masked_softmax(&t[0], &segments, 0.125, &extras)
        },
    )?);
    // Rows longer than the kernel keeps in registers (2,048 keys): 1 × 2 heads × 2,100
    // positions, packed as samples of 1,500 and 600 tokens.
    let long_seg: Vec<u32> = (0..2100u32).map(|p| u32::from(p >= 1500)).collect();
    let long = (Tensor::randn(0f32, 1.0, (1, 2, 2100, 2100), cpu)? * 3.0)?;
    out.extend(device_vs_cpu(
        "masked_softmax (rows over 2,048 keys)",
        "masked_softmax",
        device,
        dtype,
        &[long],
        &|t| {
            let segments = Tensor::from_slice(&long_seg, (1, 2100), t[0].device())?;
            masked_softmax(&t[0], &segments, 0.125, &WindowSinks::default())
        },
    )?);
    // Blocked attention over the same packing: 8 query heads on 2 kv heads, head size 64, in
    // blocks of 64 query positions (the last one 44) and as one block.
    let qkv = [8usize, 2, 2]
        .iter()
        .map(|&h| Tensor::randn(0f32, 1.0, (2, 300, h, 64), cpu))
        .collect::<Result<Vec<_>>>()?;
    for block in [64, 300] {
        out.extend(device_vs_cpu(
            &format!("attention (blocks of {block})"),
            "attention",
            device,
            dtype,
            &qkv,
            &|t| {
                let segments = Tensor::from_slice(&seg, (2, 300), t[0].device())?;
                attention(&t[0], &t[1], &t[2], &segments, 0.125, block)
            },
        )?);
    }
    // Head size 128 (the fused kernels' other instance on CUDA in bf16): 2 × 600 positions,
    // batch 0 packed as samples of 200, 150 and 250 tokens, 8 query heads on 2 kv heads; and one
    // 2,048-token sample (32 key tiles, the causal skip at full length).
    let seg600: Vec<u32> = (0..1200u32)
        .map(|p| match p {
            200..350 => 1,
            350..600 => 2,
            _ => 0,
        })
        .collect();
    let one_sample: Vec<u32> = vec![0; 2048];
    for (s, segs) in [(600usize, &seg600), (2048, &one_sample)] {
        let b = segs.len() / s;
        let qkv = [8usize, 2, 2]
            .iter()
            .map(|&h| Tensor::randn(0f32, 1.0, (b, s, h, 128), cpu))
            .collect::<Result<Vec<_>>>()?;
        out.extend(device_vs_cpu(
            &format!("attention (head size 128, {b} × {s})"),
            "attention",
            device,
            dtype,
            &qkv,
            &|t| {
                let segments = Tensor::from_slice(segs, (b, s), t[0].device())?;
                attention(&t[0], &t[1], &t[2], &segments, 0.088, 256)
            },
        )?);
    }
    out.extend(check_window_sinks(device, dtype)?);
    // The attention block (per-head norms, rotary embedding, attention as one op) on the
    // 2 × 300 packing above, 8 query heads on 2 kv heads of 128.
    let (b, s, hd) = (2usize, 300usize, 128usize);
    let n = b * s;
    let qkv = [8usize, 2, 2]
        .iter()
        .map(|&h| Tensor::randn(0f32, 1.0, (n, h * hd), cpu))
        .collect::<Result<Vec<_>>>()?;
    let norm_w = [
        Tensor::randn(0f32, 0.2, hd, cpu)?.affine(1.0, 1.0)?,
        Tensor::randn(0f32, 0.2, hd, cpu)?.affine(1.0, 1.0)?,
    ];
    let angle = Tensor::randn(0f32, 1.0, (n, 1, hd), cpu)?;
    out.extend(device_vs_cpu(
        "attention block (norms, rotary, attention)",
        "attention_block",
        device,
        dtype,
        &qkv,
        &|t| {
            let dev = t[0].device();
            let to = |x: &Tensor| x.to_device(dev)?.to_dtype(t[0].dtype());
            let (wq, wk) = (to(&norm_w[0])?, to(&norm_w[1])?);
            let (cos, sin) = (to(&angle.cos()?)?, to(&angle.sin()?)?);
            let segments = Tensor::from_slice(&seg, (b, s), dev)?;
            let args = BlockArgs {
                batch: b,
                seq: s,
                heads: 8,
                kv_heads: 2,
                head_dim: hd,
                v_head_dim: hd,
                norms: Some((&wq, &wk, 1e-6)),
                rotary: Some((&cos, &sin)),
                segments: &segments,
                samples: &Default::default(),
                window: None,
                sinks: None,
                scale: 0.088,
                block: 64,
                memo: None,
            };
            attention_block(&t[0], &t[1], &t[2], &args)
        },
    )?);
    // Latent attention's block: q and k come rotated (no norms, no rotation in the block),
    // heads of 192 with values of 128 (DeepSeek) and heads of 64 with values of 96, 4 heads,
    // each side at its own size (cuDNN's packed layout, where they are padded: ops/cudnn.rs).
    for (hd, vd) in [(192usize, 128usize), (64, 96)] {
        let qkv = [hd, hd, vd]
            .iter()
            .map(|&d| Tensor::randn(0f32, 1.0, (n, 4 * d), cpu))
            .collect::<Result<Vec<_>>>()?;
        out.extend(device_vs_cpu(
            &format!("attention block, q/k heads of {hd}, values of {vd}, no rotation"),
            "attention_block",
            device,
            dtype,
            &qkv,
            &|t| {
                let segments = Tensor::from_slice(&seg, (b, s), t[0].device())?;
                let args = BlockArgs {
                    batch: b,
                    seq: s,
                    heads: 4,
                    kv_heads: 4,
                    head_dim: hd,
                    v_head_dim: vd,
                    norms: None,
                    rotary: None,
                    segments: &segments,
                    samples: &Default::default(),
                    window: None,
                    sinks: None,
                    scale: 0.072,
                    block: 64,
                    memo: None,
                };
                attention_block(&t[0], &t[1], &t[2], &args)
            },
        )?);
    }
    Ok(out)
}

/// Sink logits of both signs and of the scores' size, one per query head (gpt-oss's are O(1)).
const SINKS: [f32; 8] = [2.5, -3.0, 0.5, 4.0, -1.5, 1.0, 3.0, -0.5];

/// gpt-oss's attention: a window of 128 keys, sinks, and both, on 2 × 640 positions (row 0
/// packed as samples of 300, 200 and 140 tokens, row 1 one sample: the window slides past
/// the sample starts and over whole 64-key tiles), 8 query heads on 2 kv heads of 64, through
/// the attention op (on CUDA in bf16: the fused kernels, key tiles left of the window skipped;
/// in f32: the blocked op's masked softmax) and through the attention block.
fn check_window_sinks(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let (b, s, nh, kvh, hd) = (2usize, 640usize, 8usize, 2usize, 64usize);
    let seg: Vec<u32> = (0..(b * s) as u32)
        .map(|p| match p {
            300..500 => 1,
            500..640 => 2,
            _ => 0,
        })
        .collect();
    let qkv = [nh, kvh, kvh]
        .iter()
        .map(|&h| Tensor::randn(0f32, 1.0, (b, s, h, hd), cpu))
        .collect::<Result<Vec<_>>>()?;
    let flat = qkv
        .iter()
        .map(|t| t.reshape((b * s, ())))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (window, sinks) in [(Some(128), false), (None, true), (Some(128), true)] {
        let extras = |dev: &Device| -> Result<WindowSinks> {
            let sinks = match sinks {
                true => Some(Tensor::new(&SINKS, dev)?),
                false => None,
            };
            Ok(WindowSinks { window, sinks })
        };
        let what = match (window, sinks) {
            (Some(w), true) => format!("window {w}, sinks"),
            (Some(w), false) => format!("window {w}"),
            _ => "sinks".to_string(),
        };
        out.extend(device_vs_cpu(
            &format!("attention ({what}, heads of {hd}, {b} × {s})"),
            "attention",
            device,
            dtype,
            &qkv,
            &|t| {
                let segments = Tensor::from_slice(&seg, (b, s), t[0].device())?;
                let extras = extras(t[0].device())?;
                attention_with(&t[0], &t[1], &t[2], &segments, 0.125, 64, &extras)
            },
        )?);
        out.extend(device_vs_cpu(
            &format!("attention block ({what}, heads of {hd}, {b} × {s})"),
            "attention_block",
            device,
            dtype,
            &flat,
            &|t| {
                let dev = t[0].device();
                let segments = Tensor::from_slice(&seg, (b, s), dev)?;
                let extras = extras(dev)?;
                let args = BlockArgs {
                    batch: b,
                    seq: s,
                    heads: nh,
                    kv_heads: kvh,
                    head_dim: hd,
                    v_head_dim: hd,
                    norms: None,
                    rotary: None,
                    segments: &segments,
                    samples: &Default::default(),
                    window: extras.window,
                    sinks: extras.sinks.as_ref(),
                    scale: 0.125,
                    block: 64,
                    memo: None,
                };
                attention_block(&t[0], &t[1], &t[2], &args)
            },
        )?);
    }
    Ok(out)
}
