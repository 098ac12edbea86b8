//! gpu-check entry for cuDNN's fused attention (`ops::cudnn_attn`): the attention block over rows
//! of one sample each and over packed rows (cuDNN's ragged layout), through cuDNN (both backward
//! algorithms, and the deterministic one split into calls) and through moeq's kernels, all
//! against the CPU in f32; with gpt-oss's sliding window and sinks too. On Hopper, rows of one
//! sample also take moeq's own backward (`ops::attn_sm90`) — with a kv head's query heads split
//! over CTAs as the launch chooses and all in one CTA — and its rerun must give the same bits.

use super::{device_vs_cpu, Comparison};
use crate::gpu_check::compare;
use crate::gpu_check::tolerance::{lookup, Pass};
use crate::ops::attention::{attention_backward, attention_forward, RowSamples, WindowSinks};
use crate::ops::attention_block::{attention_block, BlockArgs};
use crate::ops::attn_sm90;
use crate::ops::cudnn_attn::{
    launches, library, ragged, set_backend, set_deterministic, set_dp_workspace, Backend,
    DP_WORKSPACE,
};
use candle_core::{DType, Device, Result, Tensor};

/// Restores the defaults (and the Hopper backward's switches as they were: on, staged) however
/// the check ends.
struct Restore(bool, bool);

impl Drop for Restore {
    fn drop(&mut self) {
        set_backend(Backend::Auto);
        set_deterministic(true);
        set_dp_workspace(DP_WORKSPACE);
        attn_sm90::set_enabled(self.0);
        attn_sm90::force_parts(None);
        attn_sm90::set_staged(self.1);
    }
}

/// One case: rows × positions, the sample of each position, heads, kv heads, head size, per-head
/// norms.
struct Case {
    b: usize,
    s: usize,
    segments: Vec<u32>,
    nh: usize,
    kvh: usize,
    hd: usize,
    /// Value head size (latent attention: other than `hd`).
    vd: usize,
    norms: bool,
    /// gpt-oss's sliding window (the diagonal band on cuDNN).
    window: Option<usize>,
    /// gpt-oss's sinks, one per query head (folded into cuDNN's output and statistics).
    sinks: bool,
}

/// Sink logits of both signs and of the scores' size, one per query head.
const SINKS: [f32; 8] = [2.5, -3.0, 0.5, 4.0, -1.5, 1.0, 3.0, -0.5];

/// Skipped without cuDNN, unless `MOEQ_REQUIRE_CUDNN=1` (launch/device-env.sh sets it where
/// cuDNN is installed), which makes a missing cuDNN a failure.
pub(super) fn check_cudnn_attention(device: &Device) -> Result<Vec<Comparison>> {
    let Device::Cuda(dev) = device else {
        return Ok(Vec::new());
    };
    if let Err(why) = library() {
        if std::env::var("MOEQ_REQUIRE_CUDNN").as_deref() == Ok("1") {
            candle_core::bail!(
                "cuDNN attention: MOEQ_REQUIRE_CUDNN=1 but cuDNN is not loaded: {why}"
            );
        }
        println!("attention (cuDNN): skipped, cuDNN not loaded ({why})");
        return Ok(Vec::new());
    }
    let hopper = matches!(dev.cuda_stream().context().compute_capability(), Ok((m, _)) if m >= 9);
    let _restore = Restore(attn_sm90::enabled(), attn_sm90::staged());
    // Rows of one sample: 2 × 1,024 positions; 8 query heads on 2 kv heads of 128 with per-head
    // norms (Qwen3's layout), and 4 heads on 4 of 64 without. Packed rows (Hopper): 2 × 600
    // positions, row 0 samples of 200, 150 and 250 tokens, row 1 one of 500 and 100 of padding.
    let packed: Vec<u32> = (0..1200u32)
        .map(|p| match p {
            200..350 => 1,
            350..600 => 2,
            1100.. => 1,
            _ => 0,
        })
        .collect();
    let mut cases = vec![
        Case {
            b: 2,
            s: 1024,
            segments: vec![0; 2048],
            nh: 8,
            kvh: 2,
            hd: 128,
            vd: 128,
            norms: true,
            window: None,
            sinks: false,
        },
        Case {
            b: 2,
            s: 1024,
            segments: vec![0; 2048],
            nh: 4,
            kvh: 4,
            hd: 64,
            vd: 64,
            norms: false,
            window: None,
            sinks: false,
        },
    ];
    // Latent attention: q/k heads of 192 with values of 128 (DeepSeek-V2/V3), and of 256 with
    // values of 256 (GLM-4.7-Flash: 192 + 64 rotary), 2 × 512 positions, no norms.
    for (hd, vd) in [(192, 128), (256, 256)] {
        cases.push(Case {
            b: 2,
            s: 512,
            segments: vec![0; 1024],
            nh: 4,
            kvh: 4,
            hd,
            vd,
            norms: false,
            window: None,
            sinks: false,
        });
    }
    if hopper {
        // Heads of 256, 4 on 2 kv heads, over 1,024 positions: the Hopper backward's key
        // blocks of 64 (16 of them) with a kv head's two query heads split over CTAs.
        cases.push(Case {
            b: 2,
            s: 1024,
            segments: vec![0; 2048],
            nh: 4,
            kvh: 2,
            hd: 256,
            vd: 256,
            norms: false,
            window: None,
            sinks: false,
        });
        // Packed rows of heads of 192 with values of 128: the values padded to 192 (the ragged
        // layout's offsets are of one head size).
        cases.push(Case {
            b: 2,
            s: 600,
            segments: packed.clone(),
            nh: 4,
            kvh: 4,
            hd: 192,
            vd: 128,
            norms: false,
            window: None,
            sinks: false,
        });
        cases.push(Case {
            b: 2,
            s: 600,
            segments: packed.clone(),
            nh: 8,
            kvh: 2,
            hd: 128,
            vd: 128,
            norms: true,
            window: None,
            sinks: false,
        });
    }
    // gpt-oss (heads of 64, 8 query heads on 2 kv heads): a window of 128 keys, sinks, and
    // both, over rows of one sample (2 × 1,024) and, on Hopper, both over packed rows (the
    // 2 × 600 packing above: the window within each sequence, the sinks through the
    // statistics' per-sequence layout).
    for (window, sinks) in [(Some(128), false), (None, true), (Some(128), true)] {
        cases.push(Case {
            b: 2,
            s: 1024,
            segments: vec![0; 2048],
            nh: 8,
            kvh: 2,
            hd: 64,
            vd: 64,
            norms: false,
            window,
            sinks,
        });
    }
    if hopper {
        cases.push(Case {
            b: 2,
            s: 600,
            segments: packed,
            nh: 8,
            kvh: 2,
            hd: 64,
            vd: 64,
            norms: false,
            window: Some(128),
            sinks: true,
        });
    }
    let mut out = Vec::new();
    for case in &cases {
        out.extend(check_case(device, case)?);
    }
    if hopper_90(device) {
        // The Hopper backward over more CTAs than fit at once (4 rows × 16 key blocks × 2 kv
        // heads × 4 parts: waves, so its ordering waits cross them), against cuDNN and its rerun.
        let many = Case {
            b: 4,
            s: 2048,
            segments: Vec::new(),
            nh: 8,
            kvh: 2,
            hd: 128,
            vd: 128,
            norms: false,
            window: None,
            sinks: false,
        };
        set_backend(Backend::Auto);
        set_deterministic(true);
        set_dp_workspace(DP_WORKSPACE);
        attn_sm90::set_staged(true);
        let what = "attention backward, 4 × 2,048 positions, 8/2 heads of 128 (moeq's Hopper \
                    backward)";
        out.extend(rerun(device, &many, None, what)?);
        attn_sm90::set_enabled(false);
    }
    Ok(out)
}

/// The Hopper backward in a variant of a case: off; switched on where it must not serve (packed
/// rows, a window); or serving, with the parts forced (`Some`) or chosen, staged or not.
#[derive(Clone, Copy)]
enum Own {
    Off,
    Refused,
    Serves(Option<usize>, bool),
}

fn check_case(device: &Device, c: &Case) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    let (b, s, nh, kvh, hd, vd) = (c.b, c.s, c.nh, c.kvh, c.hd, c.vd);
    let n = b * s;
    let whole = c.segments.iter().all(|&id| id == 0);
    let qkv = [(nh, hd), (kvh, hd), (kvh, vd)]
        .iter()
        .map(|&(h, d)| Tensor::randn(0f32, 1.0, (n, h * d), cpu))
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
        let segments = Tensor::from_slice(&c.segments, (b, s), dev)?;
        let sinks = match c.sinks {
            true => Some(Tensor::new(&SINKS[..nh], dev)?),
            false => None,
        };
        let samples = RowSamples {
            whole,
            ragged: match whole {
                true => None,
                false => ragged(&c.segments, (b, s), (nh, kvh, hd), dev)?,
            },
        };
        let args = BlockArgs {
            batch: b,
            seq: s,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            v_head_dim: vd,
            norms: c.norms.then_some((&wq, &wk, 1e-6)),
            rotary: Some((&cos, &sin)),
            segments: &segments,
            samples: &samples,
            window: c.window,
            sinks: sinks.as_ref(),
            scale,
            block: 256,
            memo: None,
        };
        attention_block(&t[0], &t[1], &t[2], &args)
    };
    // What a deterministic call covers: a row, or a sequence of the ragged layout (whose
    // longest is rounded up to a power of two); and how many there are.
    let (unit_len, units) = if whole {
        (s, b)
    } else {
        let mut runs = 0usize;
        let mut longest = 0;
        for row in c.segments.chunks(s) {
            for run in row.chunk_by(|x, y| x == y) {
                runs += 1;
                longest = longest.max(run.len());
            }
        }
        (
            longest.next_power_of_two().max(64).min(s),
            runs.next_power_of_two(),
        )
    };
    let pad = unit_len.div_ceil(64) * 64;
    let unit_dp = (nh * pad * pad * 2) as i64;
    let mut layout = String::from(if whole { "whole rows" } else { "packed rows" });
    if let Some(w) = c.window {
        layout += &format!(", window {w}");
    }
    if c.sinks {
        layout += ", sinks";
    }
    let mut out = Vec::new();
    // cuDNN calls: the forward and one backward; the deterministic backward bounded to one
    // row's (sequence's) dP workspace runs one call per row (sequence); the Hopper backward
    // leaves cuDNN the forward.
    let mut variants = vec![
        ("cuDNN", Backend::Auto, false, 2, Own::Off),
        (
            "cuDNN, deterministic backward",
            Backend::Auto,
            true,
            2,
            Own::Off,
        ),
        (
            "cuDNN, deterministic backward by rows",
            Backend::Auto,
            true,
            1 + units as u64,
            Own::Off,
        ),
        ("moeq's kernels", Backend::Moeq, true, 0, Own::Off),
    ];
    if hopper_90(device) && whole && c.window.is_none() {
        let hopper = "moeq's Hopper backward";
        variants.push((hopper, Backend::Auto, true, 1, Own::Serves(None, true)));
        if attn_sm90::stages(hd, vd) {
            let at_once = "moeq's Hopper backward, dQ parts added at once";
            variants.push((at_once, Backend::Auto, true, 1, Own::Serves(None, false)));
        }
        if nh / kvh > 1 {
            let one = "moeq's Hopper backward, a kv head's query heads in one CTA";
            variants.push((one, Backend::Auto, true, 1, Own::Serves(Some(1), true)));
        }
    } else if hopper_90(device) {
        let refused = "cuDNN, deterministic backward, the Hopper one switched on (not for these)";
        variants.push((refused, Backend::Auto, true, 2, Own::Refused));
    }
    for (name, backend, deterministic, calls, own) in variants {
        set_backend(backend);
        set_deterministic(deterministic);
        set_dp_workspace(if calls > 2 { unit_dp } else { DP_WORKSPACE });
        attn_sm90::set_enabled(!matches!(own, Own::Off));
        let (parts, staged) = match own {
            Own::Serves(parts, staged) => (parts, staged),
            _ => (None, true),
        };
        attn_sm90::force_parts(parts);
        attn_sm90::set_staged(staged);
        let serves = matches!(own, Own::Serves(..));
        let (before, sm90_before) = (launches(), attn_sm90::launches());
        out.extend(device_vs_cpu(
            &format!("attention block, {layout}, {nh}/{kvh} heads of {hd} (values {vd}) ({name})"),
            "attention_block",
            device,
            DType::BF16,
            &qkv,
            &block,
        )?);
        let took = launches() - before;
        if took != calls {
            candle_core::bail!(
                "cuDNN attention ({layout}, {name}, head size {hd}): {took} cuDNN calls, expected \
                 {calls} (a shape cuDNN refused is logged as 'cuDNN refused')"
            );
        }
        let took = attn_sm90::launches() - sm90_before;
        if took != u64::from(serves) {
            candle_core::bail!(
                "attention ({layout}, {name}, head size {hd}): {took} launches of the Hopper \
                 backward, expected {} (attn_sm90::serves decides: 9.0 device, whole rows, no \
                 window, S a multiple of 128, heads compiled)",
                u64::from(serves)
            );
        }
        if serves {
            let what = format!("attention backward, {nh}/{kvh} heads of {hd}/{vd} ({name})");
            out.extend(rerun(device, c, parts, &what)?);
        }
    }
    attn_sm90::set_enabled(false);
    // The forward twice over the same inputs, cuDNN's and moeq's kernels: the same bits (a
    // recompute that runs the attention again, the default `recompute_attention`, relies on it).
    let on = qkv
        .iter()
        .map(|t| t.to_dtype(DType::BF16)?.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    let same = lookup("attention forward rerun", "bf16", Pass::Exact)?;
    for (name, backend) in [("cuDNN", Backend::Auto), ("moeq's kernels", Backend::Moeq)] {
        set_backend(backend);
        let (first, second) = (block(&on)?, block(&on)?);
        let what =
            format!("attention block, {layout}, {nh}/{kvh} heads of {hd} ({name}): forward rerun");
        out.push(compare(&what, &second, &first, same)?);
    }
    set_backend(Backend::Auto);
    Ok(out)
}

/// A device of compute capability 9.0 (what the Hopper backward is built for).
fn hopper_90(device: &Device) -> bool {
    let Device::Cuda(dev) = device else {
        return false;
    };
    matches!(dev.cuda_stream().context().compute_capability(), Ok((9, 0)))
}

/// The Hopper backward twice over the same inputs (cuDNN's forward, random dO): dq, dk and dv
/// must be the same bits — its ordered accumulation is what makes them so — and within the
/// attention block's bf16 tolerance of cuDNN's deterministic backward.
fn rerun(device: &Device, c: &Case, parts: Option<usize>, what: &str) -> Result<Vec<Comparison>> {
    let (b, s) = (c.b, c.s);
    let bf =
        |h: usize, d: usize| Tensor::randn(0f32, 1.0, (b, s, h, d), device)?.to_dtype(DType::BF16);
    let (q, k, v, dout) = (
        bf(c.nh, c.hd)?,
        bf(c.kvh, c.hd)?,
        bf(c.kvh, c.vd)?,
        bf(c.nh, c.vd)?,
    );
    let segments = Tensor::zeros((b, s), DType::U32, device)?;
    let whole = RowSamples {
        whole: true,
        ragged: None,
    };
    let (plain, scale) = (WindowSinks::default(), 1.0 / (c.hd as f64).sqrt());
    let rows = (&segments, &whole);
    let (o, lse) = attention_forward(&q, &k, &v, rows, &plain, scale, 256)?;
    attn_sm90::force_parts(parts);
    let grads = |sm90: bool| {
        attn_sm90::set_enabled(sm90);
        let before = attn_sm90::launches();
        let g = attention_backward(
            &q,
            &k,
            &v,
            rows,
            &plain,
            scale,
            256,
            (&o, lse.as_ref()),
            &dout,
        )?;
        if attn_sm90::launches() != before + u64::from(sm90) {
            candle_core::bail!(
                "{what}: the backward {} the Hopper kernel (attn_sm90::serves decides)",
                if sm90 { "did not take" } else { "took" }
            );
        }
        Ok::<_, candle_core::Error>(g)
    };
    let (first, second) = (grads(true)?, grads(true)?);
    // The other form (staged or not), where these heads have both: the same parts in the same
    // order.
    let staged = attn_sm90::staged();
    let other = match attn_sm90::stages(c.hd, c.vd) {
        true => {
            attn_sm90::set_staged(!staged);
            let other = grads(true);
            attn_sm90::set_staged(staged);
            Some(other?)
        }
        false => None,
    };
    let cudnn = grads(false)?;
    let same = lookup("attention backward rerun", "bf16", Pass::Exact)?;
    let near = lookup("attention backward vs cuDNN", "bf16", Pass::Backward)?;
    let mut out = Vec::new();
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        out.push(compare(
            &format!("{what}: rerun {name}"),
            &second[i],
            &first[i],
            same,
        )?);
        if let Some(other) = &other {
            let form = format!("{what}: {name} of the other form (staged {})", !staged);
            out.push(compare(&form, &other[i], &first[i], same)?);
        }
        let vs = format!("{what}: {name} against cuDNN's deterministic backward");
        out.push(compare(&vs, &first[i], &cudnn[i], near)?);
    }
    Ok(out)
}
