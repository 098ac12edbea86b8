//! gpu-check entry for the experts' recompute and backward by chunks in reused buffers
//! (`ops::expert_chunks`, `MOEQ_CHUNK_BUFFERS`): several chunks a call — one without rows,
//! experts without rows inside chunks, chunks of different row counts — so later chunks
//! overwrite the buffers the earlier ones used; against the allocating chunks on the same
//! device bit for bit (the same products and the same backward of the activation, only where
//! they are written), with and without the row dots, in f32 and bf16, and against the CPU
//! within the backward's tolerance. The same again with each chunk's rows gathered from the
//! layer's input when the chunk runs (`ChunkRows::ByToken`: the token-major range gather into
//! the reused buffer, into fresh memory, and the row gather with `MOEQ_ROWS_BY_TOKEN=0`).

use super::super::tolerance::{lookup, Pass};
use super::super::{compare, Comparison};
use crate::ops::expert_chunks::{backward_by_chunk, ChunkRows, CHUNK_BUFFERS};
use crate::ops::expert_weights::ExpertWeights;
use crate::ops::nf4_linear::Nf4Weight;
use crate::ops::routing::{RowOrder, ROWS_BY_TOKEN};
use crate::ops::swiglu::in_place_launches;
use crate::quant::{QuantSettings, QuantizedParam};
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_chunk_buffers(device: &Device) -> Result<Vec<Comparison>> {
    let cpu = &Device::Cpu;
    // 10 experts in chunks of 3: rows 12, 3 and 13 (the second chunk writes into buffers the
    // first filled with more rows), the last chunk (one expert) without rows.
    let counts = [5usize, 0, 7, 0, 0, 3, 9, 4, 0, 0];
    let (h, i) = (64usize, 32usize);
    let m: usize = counts.iter().sum();
    let params = |out: usize, inp: usize| -> Result<Vec<QuantizedParam>> {
        (0..counts.len())
            .map(|_| {
                let w: Vec<f32> = Tensor::randn(0f32, 0.1, out * inp, cpu)?.to_vec1()?;
                QuantizedParam::quantize(&w, &[out, inp], QuantSettings::default())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .collect()
    };
    let (pgu, pd) = (params(2 * i, h)?, params(h, i)?);
    let weights = |ps: &[QuantizedParam], d: &Device| -> Result<ExpertWeights> {
        let ws = ps
            .iter()
            .map(|q| Nf4Weight::from_param(q, d))
            .collect::<Result<Vec<_>>>()?;
        ExpertWeights::stack(&ws)
    };
    // 7 tokens of k = 4 rows each, their slots in a shuffled order (stride 11 modulo 28).
    let k = 4usize;
    let slots: Vec<u32> = (0..m).map(|r| ((r * 11 + 5) % m) as u32).collect();
    let tokens: Vec<u32> = slots.iter().map(|s| s / k as u32).collect();
    let x = Tensor::randn(0f32, 1.0, (m / k, h), cpu)?;
    let dy = Tensor::randn(0f32, 1.0, (m, h), cpu)?;
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for dots in [true, false] {
            // (buffers, rows by token, token-major gathers).
            let run = |d: &Device, dt: DType, how: (bool, bool, bool)| -> Result<Vec<Tensor>> {
                let (buffers, by_token, spread) = how;
                let _b = CHUNK_BUFFERS.scoped(buffers);
                let _s = ROWS_BY_TOKEN.scoped(spread);
                // Chunks of 3 experts in the run's own dtype (the CPU's f32 reference too).
                let chunk = 3 * 2 * i * h * dt.size_in_bytes();
                let (gu, dn) = (weights(&pgu, d)?, weights(&pd, d)?);
                let on = |t: &Tensor| t.to_dtype(dt)?.to_device(d);
                let order = RowOrder::new(tokens.clone(), slots.clone(), k, d)?;
                let rows = match by_token {
                    true => ChunkRows::ByToken { x: on(&x)?, order },
                    false => ChunkRows::Gathered(on(&x)?.index_select(&order.tokens, 0)?),
                };
                let (dxs, dot) =
                    backward_by_chunk(&gu, &dn, &counts, &rows, on(&dy)?, dt, dots, chunk)?;
                [Some(dxs), dot]
                    .into_iter()
                    .flatten()
                    .map(|t| t.to_device(cpu))
                    .collect()
            };
            let before = in_place_launches();
            let reused = run(device, dtype, (true, false, true))?;
            let launched = in_place_launches() - before;
            // One in-place backward a chunk with rows (three).
            if device.is_cuda() && launched != 3 {
                candle_core::bail!("chunk buffers: {launched} in-place backwards, expected 3");
            }
            let separate = run(device, dtype, (false, false, true))?;
            let reference = run(cpu, DType::F32, (false, false, true))?;
            let row = lookup("chunks = separate passes", "any", Pass::Exact)?;
            let tol = lookup("train step", dtype.as_str(), Pass::Backward)?;
            let by_token = [
                ("rows by token in reused buffers", (true, true, true)),
                ("rows by token", (false, true, true)),
                ("rows by token, row gather", (true, true, false)),
            ];
            for (k, name) in ["dxs", "dots"].iter().take(reused.len()).enumerate() {
                let what = format!("chunks in reused buffers {dtype:?} dots {dots} {name}");
                out.push(compare(&what, &reused[k], &separate[k], row)?);
                out.push(compare(
                    &format!("{what} vs CPU"),
                    &reused[k],
                    &reference[k],
                    tol,
                )?);
            }
            for (label, how) in by_token {
                let got = run(device, dtype, how)?;
                for (k, name) in ["dxs", "dots"].iter().take(got.len()).enumerate() {
                    let what = format!("chunks, {label} {dtype:?} dots {dots} {name}");
                    out.push(compare(&what, &got[k], &separate[k], row)?);
                }
            }
        }
    }
    Ok(out)
}
