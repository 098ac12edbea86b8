//! AdamW's moments in 8 bits, blockwise (bitsandbytes' 8-bit Adam scheme, what axolotl's
//! `adamw_bnb_8bit` / `paged_adamw_8bit` / `adamw_8bit` / `adamw_torch_8bit` train with): per
//! block of 256 elements, the first moment as codes of the signed dynamic map and the second
//! as codes of the unsigned one (bitsandbytes' `create_dynamic_map`), each block with an f32
//! absmax — 2 bytes per element plus 8 per block instead of 8. Each step dequantizes, runs the
//! f32 update of `train::adamw`, and requantizes to the nearest code under the block's new
//! absmax. Parameters under `MIN_8BIT_SIZE` elements keep f32 moments, as bitsandbytes does.
//! On CUDA one kernel per parameter (`kernels/adamw8.cu`, in place); elsewhere `update_cpu`,
//! the same operations in the same order — `moeq gpu-check` finds them bit-identical.

use crate::ops::adamw::StepScalars;
use candle_core::{DType, Device, Result, Tensor, Var};

/// Elements per quantization block.
pub const BLOCK: usize = 256;

/// Parameters with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' dynamic 8-bit map (`create_dynamic_map(signed, 7, 8)`): for each exponent
/// 10⁻⁶ … 10⁰, the midpoints of an f32 `linspace(0.1, 1, ·)` (2^i + 1 points signed, each
/// also negated; 2^(i+1) + 1 unsigned) times that power, plus 0 and 1; sorted ascending.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data = Vec::with_capacity(256);
    for i in 0..7i32 {
        let points = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace(0.1, 1.0, points);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// `torch.linspace(start, end, n)` in f32: the first half stepped from the start, the second
/// from the end.
fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The two maps, on the host and on the parameters' device.
pub struct Maps {
    host: (Vec<f32>, Vec<f32>),
    device: (Tensor, Tensor),
}

impl Maps {
    pub fn new(device: &Device) -> Result<Maps> {
        let (s, u) = (dynamic_map(true), dynamic_map(false));
        Ok(Maps {
            device: (
                Tensor::from_slice(&s, 256, device)?,
                Tensor::from_slice(&u, 256, device)?,
            ),
            host: (s, u),
        })
    }
}

/// One parameter's 8-bit moments: codes `[n]` u8 and block absmax `[⌈n/256⌉]` f32 of each.
pub struct Moments8 {
    pub m_codes: Tensor,
    pub m_absmax: Tensor,
    pub v_codes: Tensor,
    pub v_absmax: Tensor,
}

impl Moments8 {
    /// Zero moments for `n` elements (any code under a zero absmax is zero).
    pub fn zeros(n: usize, device: &Device) -> Result<Moments8> {
        let blocks = n.div_ceil(BLOCK);
        Ok(Moments8 {
            m_codes: Tensor::zeros(n, DType::U8, device)?,
            m_absmax: Tensor::zeros(blocks, DType::F32, device)?,
            v_codes: Tensor::zeros(n, DType::U8, device)?,
            v_absmax: Tensor::zeros(blocks, DType::F32, device)?,
        })
    }

    /// Bytes held (codes and absmax of both moments).
    pub fn bytes(&self) -> usize {
        2 * (self.m_codes.elem_count() + 4 * self.m_absmax.elem_count())
    }

    /// Both moments in f32, `[n]` each: every code's value times its block's absmax (what a
    /// step reads back), on the codes' device.
    pub fn dequantized(&self, maps: &Maps) -> Result<(Tensor, Tensor)> {
        let dev = self.m_codes.device();
        let values = |codes: &Tensor, absmax: &Tensor, map: &[f32]| -> Result<Tensor> {
            let c: Vec<u8> = codes.to_vec1()?;
            let a: Vec<f32> = absmax.to_vec1()?;
            let v: Vec<f32> = c
                .iter()
                .enumerate()
                .map(|(i, &q)| map[q as usize] * a[i / BLOCK])
                .collect();
            Tensor::from_vec(v, c.len(), dev)
        };
        Ok((
            values(&self.m_codes, &self.m_absmax, &maps.host.0)?,
            values(&self.v_codes, &self.v_absmax, &maps.host.1)?,
        ))
    }

    /// 8-bit moments of f32 moments `m` and `v` (`n` elements each), on `device`: per block
    /// an absmax ([`block_scale`]) and each value's nearest code, as a step requantizes. On
    /// what [`Self::dequantized`] gave it inverts that exactly: the codes and an absmax that
    /// stand for the same f32 values, so the next step is the one the saved moments would take.
    pub fn quantized(m: &Tensor, v: &Tensor, maps: &Maps, device: &Device) -> Result<Moments8> {
        let codes = |x: &Tensor, map: &[f32]| -> Result<(Tensor, Tensor)> {
            let x: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let mut q = Vec::with_capacity(x.len());
            let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK));
            for block in x.chunks(BLOCK) {
                let a = block_scale(block, map);
                q.extend(block.iter().map(|&y| nearest(map, y / a)));
                absmax.push(a);
            }
            let (n, blocks) = (q.len(), absmax.len());
            Ok((
                Tensor::from_vec(q, n, device)?,
                Tensor::from_vec(absmax, blocks, device)?,
            ))
        };
        let (m_codes, m_absmax) = codes(m, &maps.host.0)?;
        let (v_codes, v_absmax) = codes(v, &maps.host.1)?;
        Ok(Moments8 {
            m_codes,
            m_absmax,
            v_codes,
            v_absmax,
        })
    }

    /// One step for parameter `p` with gradient `g` (f32, p's element count).
    pub fn update(&mut self, p: &Var, g: &Tensor, s: &StepScalars, maps: &Maps) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        let t = [&self.m_codes, &self.m_absmax, &self.v_codes, &self.v_absmax];
        if crate::ops::adamw::fused_step8(
            p.as_tensor(),
            &g,
            t,
            (&maps.device.0, &maps.device.1),
            s,
        )? {
            return Ok(());
        }
        let dev = p.device().clone();
        let mut pv: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let mut mq: Vec<u8> = self.m_codes.to_vec1()?;
        let mut ma: Vec<f32> = self.m_absmax.to_vec1()?;
        let mut vq: Vec<u8> = self.v_codes.to_vec1()?;
        let mut va: Vec<f32> = self.v_absmax.to_vec1()?;
        update_cpu(
            &mut pv,
            &gv,
            (&mut mq, &mut ma),
            (&mut vq, &mut va),
            (&maps.host.0, &maps.host.1),
            s,
        );
        p.set(&Tensor::from_vec(pv, p.shape(), &dev)?)?;
        let (n, blocks) = (mq.len(), ma.len());
        self.m_codes = Tensor::from_vec(mq, n, &dev)?;
        self.m_absmax = Tensor::from_vec(ma, blocks, &dev)?;
        self.v_codes = Tensor::from_vec(vq, n, &dev)?;
        self.v_absmax = Tensor::from_vec(va, blocks, &dev)?;
        Ok(())
    }
}

/// The absmax to quantize one block of moments with. A step leaves a block's largest
/// magnitude as its absmax times code 1 (positive) or times the map's first code (negative:
/// bitsandbytes' signed map stops short of −1), every other value as a code times the same
/// absmax: the candidates are the largest magnitude and, divided by that first code, the
/// values an ulp or two around it; the one under which every value is its nearest code's
/// value again (`code · absmax` in f32, as a step reads it) is taken. Moments that no step
/// wrote (fp32 ones) get the largest magnitude, as a step would give them; 1 for zeros.
fn block_scale(block: &[f32], map: &[f32]) -> f32 {
    let top = block.iter().fold(0f32, |a, &y| a.max(y.abs()));
    if top == 0.0 {
        return 1.0;
    }
    let reproduces = |a: f32| {
        block
            .iter()
            .all(|&y| map[nearest(map, y / a) as usize] * a == y)
    };
    if reproduces(top) {
        return top;
    }
    if map[0] < 0.0 {
        let guess = top / -map[0];
        let bits = guess.to_bits();
        for delta in [0i32, 1, -1, 2, -2, 3, -3] {
            let a = f32::from_bits(bits.wrapping_add_signed(delta));
            if a.is_finite() && reproduces(a) {
                return a;
            }
        }
    }
    top
}

/// The index of the code nearest to x in the ascending map (the lower one on a tie).
fn nearest(map: &[f32], x: f32) -> u8 {
    let hi = map.partition_point(|&q| q < x);
    if hi == 0 {
        return 0;
    }
    if hi == map.len() {
        return (map.len() - 1) as u8;
    }
    if (x - map[hi - 1]).abs() <= (map[hi] - x).abs() {
        (hi - 1) as u8
    } else {
        hi as u8
    }
}

/// The CPU twin of `kernels/adamw8.cu`: each operation a separate f32 rounding, in the
/// kernel's order (a scalar multiply-add of the tensor formulation is x·mul, then + add).
fn update_cpu(
    p: &mut [f32],
    g: &[f32],
    (mq, ma): (&mut [u8], &mut [f32]),
    (vq, va): (&mut [u8], &mut [f32]),
    (qs, qu): (&[f32], &[f32]),
    s: &StepScalars,
) {
    let f = |x: f64| x as f32;
    let affine = |x: f32, mul: f32, add: f32| x * mul + add;
    let clip = s.clip.map(f);
    let (b1, omb1, b2, omb2) = (f(s.beta1), f(1.0 - s.beta1), f(s.beta2), f(1.0 - s.beta2));
    let (decay, inv, eps, step) = (f(s.decay), f(s.inv_sqrt_bias2), f(s.eps), f(s.step_size));
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    for (b, start) in (0..p.len()).step_by(BLOCK).enumerate() {
        let end = (start + BLOCK).min(p.len());
        for i in start..end {
            let m0 = qs[mq[i] as usize] * ma[b];
            let v0 = qu[vq[i] as usize] * va[b];
            let gi = match clip {
                Some(c) => affine(g[i], c, 0.0),
                None => g[i],
            };
            let mi = affine(m0, b1, 0.0) + affine(gi, omb1, 0.0);
            let vi = affine(v0, b2, 0.0) + affine(gi * gi, omb2, 0.0);
            let decayed = affine(p[i], decay, 0.0);
            let denom = affine(affine(vi.sqrt(), inv, 0.0), 1.0, eps);
            p[i] = decayed - affine(mi / denom, step, 0.0);
            m[i - start] = mi;
            v[i - start] = vi;
        }
        let block = end - start;
        let top = |xs: &[f32]| xs.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let am = match top(&m[..block]) {
            0.0 => 1.0,
            x => x,
        };
        let av = match top(&v[..block]) {
            0.0 => 1.0,
            x => x,
        };
        for i in start..end {
            mq[i] = nearest(qs, m[i - start] / am);
            vq[i] = nearest(qu, v[i - start] / av);
        }
        ma[b] = am;
        va[b] = av;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_have_256_distinct_codes_from_minus_one_or_zero_to_one() {
        for signed in [true, false] {
            let m = dynamic_map(signed);
            assert_eq!(m.len(), 256);
            assert!(m.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            assert_eq!(*m.last().unwrap(), 1.0);
            let low = if signed { -0.99296875 } else { 0.0 };
            assert!((m[0] - low).abs() < 1e-6, "{}", m[0]);
            // The smallest non-zero magnitude: 10⁻⁶ times the first midpoint.
            let tiny = m.iter().filter(|x| **x > 0.0).fold(1f32, |a, &x| a.min(x));
            assert!(
                (tiny - if signed { 0.55e-6 } else { 0.325e-6 }).abs() < 1e-9,
                "{tiny}"
            );
        }
    }

    #[test]
    fn nearest_picks_the_closest_code_and_the_lower_on_a_tie() {
        let map = [-1.0f32, -0.5, 0.0, 0.5, 1.0];
        assert_eq!(nearest(&map, -2.0), 0);
        assert_eq!(nearest(&map, 0.2), 2);
        assert_eq!(nearest(&map, 0.3), 3);
        assert_eq!(nearest(&map, 0.25), 2);
        assert_eq!(nearest(&map, 1.0), 4);
        assert_eq!(nearest(&map, 7.0), 4);
    }
}
