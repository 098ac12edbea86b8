//! Attention sinks folded into a fused kernel's result after the fact, through its per-row
//! log-sum-exp. The kernels compute plain softmax attention `O = Σ_j exp(x_j − L)·v_j` with
//! `L = log Σ_j exp(x_j)` over the visible keys; a sink `s` adds `exp(s)` to the row's
//! denominator, so the sink attention has
//!   `L' = logaddexp(L, s)`   and   `O' = O·exp(L − L')`.
//! Given `O'` and `L'`, the kernels' own backward is the sink attention's: it recomputes
//! `P' = exp(x − L')` (the sink attention's probabilities) and `D = rowsum(dO ∘ O')`, and
//! `dS = P' ∘ (dP − D)` is the sink softmax's gradient, the sink's column having no value and
//! so no `dP` (the sinks themselves are frozen). Used by `flash_attn` and `cudnn_attn`; the
//! tests below check both identities on the CPU against the primitive-op reference, in each
//! kernel's lse layout.

use candle_core::{DType, Result, Tensor};
use std::f32::consts::LN_2;

/// How a fused kernel keeps its per-row lse.
#[derive(Clone, Copy, Debug)]
pub enum Stats<'a> {
    /// moeq's kernels: `[B, S, H]`, base 2 (`log2 Σ exp2(scale·log2(e)·qk)`).
    Flash,
    /// cuDNN: `[B, H, S, 1]`, natural log.
    Cudnn,
    /// cuDNN's packed rows: `[sequences, H, longest, 1]`, natural log; token `t`'s row of them
    /// seen as `[sequences·longest, H]` is `rows[t]` (`Ragged::stats_rows`, `[B·S]` u32).
    CudnnRagged { rows: &'a Tensor },
}

/// A fused kernel's output `out [B, S, H, D]` and lse (laid out as `stats` says) with the
/// sinks `[H]` (f32, natural-log logits) folded in: `(O', L')`, in the same dtype and layouts.
pub fn fold_sinks(
    out: &Tensor,
    lse: &Tensor,
    sinks: &Tensor,
    stats: Stats,
) -> Result<(Tensor, Tensor)> {
    let (b, s, h, _) = out.dims4()?;
    let (with, factor) = match stats {
        Stats::Flash => lse_with_sinks(lse, &sinks.reshape((1, 1, h))?, LN_2 as f64)?,
        _ => lse_with_sinks(lse, &sinks.reshape((1, h, 1, 1))?, 1.0)?,
    };
    // The factors by token, [B, S, H].
    let factor = match stats {
        Stats::Flash => factor,
        Stats::Cudnn => factor.squeeze(3)?.transpose(1, 2)?,
        Stats::CudnnRagged { rows } => {
            let (seqs, _, longest, _) = factor.dims4()?;
            let flat = factor.squeeze(3)?.transpose(1, 2)?.contiguous()?;
            let flat = flat.reshape((seqs * longest, h))?;
            flat.index_select(rows, 0)?.reshape((b, s, h))?
        }
    };
    let y = out
        .to_dtype(DType::F32)?
        .broadcast_mul(&factor.unsqueeze(3)?)?;
    Ok((super::at_offset_zero(&y.to_dtype(out.dtype())?)?, with))
}

/// `(L', exp(L − L'))` in the lse's layout and base (`to_natural`: the factor from it to the
/// natural log) for f32 `lse` and `sinks` shaped to broadcast against it.
fn lse_with_sinks(lse: &Tensor, sinks: &Tensor, to_natural: f64) -> Result<(Tensor, Tensor)> {
    let l = (lse * to_natural)?;
    let s = sinks.to_dtype(DType::F32)?.broadcast_as(l.shape())?;
    // logaddexp(l, s) = max(l, s) + ln(1 + exp(−|l − s|)): no overflow whatever their sizes.
    let spread = (&l - &s)?.abs()?;
    let with = (l.maximum(&s)? + (spread.neg()?.exp()? + 1.0)?.log()?)?;
    let factor = (&l - &with)?.exp()?;
    Ok(((with / to_natural)?, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{
        attention_reference, attention_reference_with, Ragged, WindowSinks,
    };
    use candle_core::{Device, Var, D};

    /// 2 rows × 13 positions (row 0 packed as samples of 6 and 7), 4 query heads on 2 kv heads
    /// of 8, a window of 4, sinks of both signs as large as the scores.
    struct Case {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        segments: Vec<Vec<u32>>,
        scale: f64,
        extras: WindowSinks,
    }

    const WINDOW: usize = 4;

    fn case() -> Case {
        let cpu = &Device::Cpu;
        let (b, s, nh, kvh, hd) = (2, 13, 4, 2, 8);
        let rand = |h: usize| Tensor::randn(0f32, 1.0, (b, s, h, hd), cpu).unwrap();
        let seg0 = (0..s as u32).map(|p| u32::from(p >= 6)).collect();
        Case {
            q: (rand(nh) * 2.0).unwrap(),
            k: (rand(kvh) * 2.0).unwrap(),
            v: rand(kvh),
            segments: vec![seg0, vec![0; s]],
            scale: 1.0 / (hd as f64).sqrt(),
            extras: WindowSinks {
                window: Some(WINDOW),
                sinks: Some(Tensor::new(&[2.5f32, -3.0, 0.5, 4.0], cpu).unwrap()),
            },
        }
    }

    /// `[B, S, heads, d]` → `[B, nh, S, d]` (kv head `h / rep` for query head `h`).
    fn per_query_head(t: &Tensor, rep: usize) -> Tensor {
        let heads = t.dim(2).unwrap() * rep;
        let idx: Vec<u32> = (0..heads).map(|h| (h / rep) as u32).collect();
        let t = t.transpose(1, 2).unwrap().contiguous().unwrap();
        t.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 1)
            .unwrap()
    }

    /// The case's scaled scores `x [B, nh, S, S]` and which of them are visible (u8, same shape).
    fn scores(c: &Case) -> (Tensor, Tensor) {
        let (b, s, nh, _) = c.q.dims4().unwrap();
        let rep = nh / c.k.dim(2).unwrap();
        let k = per_query_head(&c.k, rep);
        let x = per_query_head(&c.q, 1).matmul(&k.t().unwrap()).unwrap();
        let visible: Vec<u8> = (0..b * s * s)
            .map(|e| {
                let (seg, i, j) = (&c.segments[e / (s * s)], e / s % s, e % s);
                u8::from(j <= i && i - j < WINDOW && seg[j] == seg[i])
            })
            .collect();
        let visible = Tensor::from_vec(visible, (b, 1, s, s), &Device::Cpu).unwrap();
        (
            (x * c.scale).unwrap(),
            visible.broadcast_as((b, nh, s, s)).unwrap(),
        )
    }

    /// What a kernel computes: the windowed output without sinks and the natural-log lse
    /// `[B, S, nh]` of its visible scaled scores.
    fn plain_with_lse(c: &Case) -> (Tensor, Tensor) {
        let window = WindowSinks {
            window: c.extras.window,
            sinks: None,
        };
        let out =
            attention_reference_with(&c.q, &c.k, &c.v, &c.segments, c.scale, &window).unwrap();
        let (x, visible) = scores(c);
        let masked = visible
            .where_cond(
                &x,
                &x.ones_like()
                    .unwrap()
                    .affine(0.0, f64::NEG_INFINITY)
                    .unwrap(),
            )
            .unwrap();
        let m = masked.max_keepdim(D::Minus1).unwrap();
        let sum = masked
            .broadcast_sub(&m)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1);
        let lse = (sum.unwrap().log().unwrap() + m).unwrap(); // [B, nh, S, 1]
        (out, lse.squeeze(3).unwrap().transpose(1, 2).unwrap())
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// `O·exp(L − L')` of the output without sinks is the sink attention's output, with the
    /// lse in each kernel's layout (cuDNN's packed rows with NaN in the statistics no token
    /// owns: they are never read), and the three give the same `L'`. f32 throughout: a few
    /// ulps of the output's scale (about 1).
    #[test]
    fn folding_the_sinks_into_the_output_matches_the_reference() {
        let c = case();
        let cpu = &Device::Cpu;
        let want =
            attention_reference_with(&c.q, &c.k, &c.v, &c.segments, c.scale, &c.extras).unwrap();
        let (out, lse) = plain_with_lse(&c); // lse [B, S, nh], natural log
        let (b, s, nh, hd) = c.q.dims4().unwrap();
        let sinks = c.extras.sinks.as_ref().unwrap();
        // cuDNN's layouts of the same lse: [B, nh, S, 1], and by sequence.
        let by_rows = lse.transpose(1, 2).unwrap().unsqueeze(3).unwrap();
        let by_rows = by_rows.contiguous().unwrap();
        let flat: Vec<u32> = c.segments.concat();
        let kvh = c.k.dim(2).unwrap();
        let r = Ragged::of(&flat, (b, s), (nh, kvh, hd), cpu).unwrap();
        let rows: Vec<u32> = r.stats_rows.to_vec1().unwrap();
        let mut stats = vec![f32::NAN; r.seqs * r.max_len * nh];
        let per_token: Vec<Vec<f32>> = lse.reshape((b * s, nh)).unwrap().to_vec2().unwrap();
        for (t, &row) in rows.iter().enumerate() {
            let at = row as usize * nh;
            stats[at..at + nh].copy_from_slice(&per_token[t]);
        }
        let by_seq = Tensor::from_vec(stats, (r.seqs, r.max_len, nh), cpu).unwrap();
        let by_seq = by_seq.transpose(1, 2).unwrap().unsqueeze(3).unwrap();
        let by_seq = by_seq.contiguous().unwrap();
        let layouts = [
            (Stats::Flash, (&lse / LN_2 as f64).unwrap()),
            (Stats::Cudnn, by_rows),
            (
                Stats::CudnnRagged {
                    rows: &r.stats_rows,
                },
                by_seq,
            ),
        ];
        let mut lse_by_token = Vec::new();
        for (stats, lse_in) in layouts {
            let (got, with) = fold_sinks(&out, &lse_in, sinks, stats).unwrap();
            let err = max_abs(&(&got - &want).unwrap());
            assert!(err <= 1e-5, "{stats:?}: output off by {err}");
            // L' back to [B, S, nh] in the natural log.
            let with = match stats {
                Stats::Flash => (with * LN_2 as f64).unwrap(),
                Stats::Cudnn => with.squeeze(3).unwrap().transpose(1, 2).unwrap(),
                Stats::CudnnRagged { rows } => {
                    let flat = with.squeeze(3).unwrap().transpose(1, 2).unwrap();
                    let flat = flat.contiguous().unwrap().reshape(((), nh)).unwrap();
                    let t = flat.index_select(rows, 0).unwrap();
                    t.reshape((b, s, nh)).unwrap()
                }
            };
            lse_by_token.push(with);
        }
        for with in &lse_by_token[1..] {
            let err = max_abs(&(with - &lse_by_token[0]).unwrap());
            assert!(err <= 1e-5, "L' differs between layouts by {err}");
        }
        let grew = max_abs(&(&lse_by_token[0] - &lse).unwrap());
        assert!(grew > 0.1, "the sinks hardly change the lse ({grew})");
        let plain = attention_reference(&c.q, &c.k, &c.v, &c.segments, c.scale).unwrap();
        assert!(
            max_abs(&(&plain - &want).unwrap()) > 0.1,
            "the window and sinks matter"
        );
    }

    /// The kernels' backward recurrence on `(O', L')` — `P' = exp(x − L')`, `D = rowsum(dO ∘ O')`,
    /// `dS = scale·P' ∘ (dP − D)`, `dq = dS·k`, `dk = dSᵀ·q`, `dv = P'ᵀ·dO` — gives the sink
    /// attention's gradients (autograd through the reference). f32: a few ulps of each
    /// gradient's scale.
    #[test]
    fn the_plain_backward_on_folded_output_and_lse_gives_the_sink_gradients() {
        let c = case();
        let (b, s, nh, hd) = c.q.dims4().unwrap();
        let rep = nh / c.k.dim(2).unwrap();
        let dout = Tensor::randn(0f32, 1.0, (b, s, nh, hd), &Device::Cpu).unwrap();
        let vars = [&c.q, &c.k, &c.v].map(|t| Var::from_tensor(t).unwrap());
        let [vq, vk, vv] = vars.each_ref().map(|x| x.as_tensor());
        let y = attention_reference_with(vq, vk, vv, &c.segments, c.scale, &c.extras).unwrap();
        let g = (&y * &dout).unwrap().sum_all().unwrap().backward().unwrap();
        let want = vars.map(|x| g.get(x.as_tensor()).unwrap().clone());

        let (out, lse) = plain_with_lse(&c);
        let by_rows = lse.transpose(1, 2).unwrap().unsqueeze(3).unwrap(); // [B, nh, S, 1]
        let sinks = c.extras.sinks.as_ref().unwrap();
        let (out, l) = fold_sinks(&out, &by_rows, sinks, Stats::Cudnn).unwrap();
        let (x, visible) = scores(&c);
        let p = visible
            .where_cond(
                &x.broadcast_sub(&l).unwrap().exp().unwrap(),
                &x.zeros_like().unwrap(),
            )
            .unwrap();
        let (qh, kh, vh) = (
            per_query_head(&c.q, 1),
            per_query_head(&c.k, rep),
            per_query_head(&c.v, rep),
        );
        let (doh, oh) = (per_query_head(&dout, 1), per_query_head(&out, 1));
        let d = (&doh * &oh).unwrap().sum_keepdim(3).unwrap();
        let dp = doh.matmul(&vh.t().unwrap()).unwrap();
        let ds = ((&p * dp.broadcast_sub(&d).unwrap()).unwrap() * c.scale).unwrap();
        // Back to [B, S, kv heads, d]: the query heads of a kv head add up.
        let to_kv = |t: Tensor| {
            let (b, _, s, w) = t.dims4().unwrap();
            let t = t.reshape((b, nh / rep, rep, s, w)).unwrap().sum(2).unwrap();
            t.transpose(1, 2).unwrap()
        };
        let got = [
            ds.matmul(&kh).unwrap().transpose(1, 2).unwrap(),
            to_kv(ds.t().unwrap().matmul(&qh).unwrap()),
            to_kv(p.t().unwrap().matmul(&doh).unwrap()),
        ];
        for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
            assert!(max_abs(w) > 0.1, "d{name} is not trivially small");
            let err = max_abs(&(g - w).unwrap());
            assert!(err <= 1e-5 * max_abs(w), "d{name} off by {err}");
        }
    }
}
