//! gpu-check entries compared exactly: the routing plan built on the device, embedding rows
//! gathered by the device from page-locked host memory, the element-wise add, and the router's
//! softmax and top-k.

use super::{compare, lookup, Comparison, Pass};
use crate::ops::add::add;
use crate::ops::embedding::{gather_host_rows, Embedding, TokenIds};
use crate::ops::router::{
    logits_grad, router_choose, router_probs, Choice, GroupScore, CHOOSE_KERNEL,
};
use crate::ops::routing::plan;
use candle_core::{DType, Device, Result, Tensor};

pub(super) fn check_rows(device: &Device) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    // Routing plan built on the device against the host plan: 3,001 tokens, top-8 of 128
    // experts (distinct per token: a hashed base plus 16·j): 24,008 slots, one whole step of
    // `route_rows`' 16,384 (1,024 threads × 16) and a partial one, some threads' 16 slots cut
    // by the end. Integer outputs: any difference fails.
    let exact = lookup("routing plan", "u32", Pass::Exact)?;
    let (n, k, experts) = (3001usize, 8usize, 128usize);
    let top: Vec<u32> = (0..n)
        .flat_map(|t| {
            let base = (t as u64 * 2_654_435_761 % 128) as usize;
            (0..k).map(move |j| ((base + 16 * j) % experts) as u32)
        })
        .collect();
    let plan_on = |d: &Device| {
        let t = Tensor::from_slice(&top, (n, k), d)?;
        plan(&t, experts, 0..experts)
    };
    let (got, want) = (plan_on(device)?, plan_on(&Device::Cpu)?);
    let count = |c: &[usize]| {
        let v: Vec<u32> = c.iter().map(|&x| x as u32).collect();
        Tensor::from_vec(v, c.len(), &Device::Cpu)
    };
    for (what, g, w) in [
        ("tokens", &got.order.tokens, &want.order.tokens),
        ("slots", &got.order.slots, &want.order.slots),
        ("inverse", &got.order.inv, &want.order.inv),
    ] {
        out.push(compare(&format!("routing plan {what}"), g, w, exact)?);
    }
    out.push(compare(
        "routing plan counts",
        &count(&got.counts)?,
        &count(&want.counts)?,
        exact,
    )?);
    // Embedding rows: the table on the host, gathered by `device` (page-locked on CUDA) vs
    // the host gather. A copy: any difference fails. Rows of 64 (16-byte packs) and of 36
    // bf16 values (not whole packs: the element kernel), 5,000 ids with repeats, and the first
    // and last row.
    for (dtype, h) in [(DType::BF16, 64usize), (DType::BF16, 36), (DType::F32, 64)] {
        let vocab = 3001usize;
        let table = Tensor::randn(0f32, 1.0, (vocab, h), &Device::Cpu)?.to_dtype(dtype)?;
        let mut ids: Vec<u32> = (0..5000u64)
            .map(|i| (i * 2_654_435_761 % vocab as u64) as u32)
            .collect();
        ids[0] = 0;
        ids[4999] = vocab as u32 - 1;
        let emb = Embedding::new(table.clone(), device)?;
        let got = emb.rows(&TokenIds::new(&ids, device)?)?;
        let want = gather_host_rows(&table, &ids)?;
        out.push(compare(
            &format!("embedding rows {dtype:?} h={h} (host table, device gather)"),
            &got,
            &want,
            lookup("embedding rows", dtype.as_str(), Pass::Exact)?,
        )?);
    }
    // The element-wise add of the residuals and their gradients: the 16-byte kernel (whole
    // packs: 3 × 4,096 elements, bf16 and f32) and candle's (1,001 bf16 elements) against the
    // host's add. One rounding of the exact sum on both sides: any difference fails.
    for (dtype, n) in [
        (DType::BF16, 3 * 4096usize),
        (DType::F32, 3 * 4096),
        (DType::BF16, 1001),
    ] {
        let a = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?.to_dtype(dtype)?;
        let b = (Tensor::randn(0f32, 1.0, n, &Device::Cpu)? * 1e-2)?.to_dtype(dtype)?;
        let got = add(&a.to_device(device)?, &b.to_device(device)?)?;
        out.push(compare(
            &format!("add {dtype:?}, {n} elements"),
            &got,
            &add(&a, &b)?,
            lookup("add", dtype.as_str(), Pass::Exact)?,
        )?);
    }
    // The router's softmax and top-k (one warp per token on CUDA) against candle's softmax and
    // arg-sort on the host: 300 tokens, 128 experts top-8, 60 experts top-6 (rows not a
    // multiple of 32), 256 top-8, and 20 / 384 / 600 (1, 16 and 32 experts a lane: with 60,
    // 128 and 256 every kernel size is met); logits a per-token permutation of steps of 6/E over [−3, 3)
    // (bf16 only where the steps are wider than its spacing there: no ties after rounding).
    for (dtype, e, k) in [
        (DType::BF16, 128usize, 8usize),
        (DType::F32, 60, 6),
        (DType::BF16, 256, 8),
        (DType::F32, 20, 4),
        (DType::F32, 384, 8),
        (DType::F32, 600, 8),
    ] {
        let n = 300usize;
        let logits: Vec<f32> = (0..n * e)
            .map(|i| {
                let (t, j) = (i / e, i % e);
                ((j * 37 + t * 11) % e) as f32 * (6.0 / e as f32) - 3.0
            })
            .collect();
        let logits = Tensor::from_vec(logits, (n, e), &Device::Cpu)?.to_dtype(dtype)?;
        let (got_p, got_top) = router_probs(&logits.to_device(device)?, Some(k))?;
        let (want_p, want_top) = router_probs(&logits, Some(k))?;
        let what = format!("router {dtype:?}, {e} experts top-{k}");
        out.push(compare(
            &format!("{what}: probabilities"),
            &got_p,
            &want_p,
            lookup("router probs", "f32", Pass::Forward)?,
        )?);
        let (Some(got_top), Some(want_top)) = (got_top, want_top) else {
            candle_core::bail!("{what}: no top-k choice");
        };
        out.push(compare(
            &format!("{what}: choices"),
            &got_top,
            &want_top,
            lookup("router top-k", "u32", Pass::Exact)?,
        )?);
    }
    // The router's backward (the logits' gradient from the routing weights' gradient) for
    // softmax and sigmoid scores, renormalised or not, 128 experts top-8, 60 top-6, 600 top-8
    // (32 a lane, a partial last one) and 40 top-32 (the most choices the kernel takes), the
    // gradient in f32 and bf16: the device kernel against candle's ops on the CPU over the same
    // f32 probabilities and choices (the CPU's), dw random.
    for (e, k) in [(128usize, 8usize), (60, 6), (600, 8), (40, 32)] {
        let n = 300usize;
        let logits = Tensor::randn(0f32, 1.0, (n, e), &Device::Cpu)?;
        let dw = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        for sigmoid in [false, true] {
            let probs = if sigmoid {
                candle_nn::ops::sigmoid(&logits)?
            } else {
                router_probs(&logits, None)?.0
            };
            let top = probs
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .contiguous()?;
            for renormalize in [false, true] {
                for dtype in [DType::F32, DType::BF16] {
                    let how = (2.5, renormalize, sigmoid);
                    let on = |t: &Tensor| t.to_device(device);
                    let got = logits_grad(&on(&probs)?, &on(&top)?, &on(&dw)?, how, dtype)?;
                    let want = logits_grad(&probs, &top, &dw, how, DType::F32)?;
                    let score = if sigmoid { "sigmoid" } else { "softmax" };
                    out.push(compare(
                        &format!(
                            "router backward {dtype:?}, {score}{}, {e} experts top-{k}",
                            if renormalize { ", renormalised" } else { "" }
                        ),
                        &got.to_dtype(DType::F32)?,
                        &want,
                        lookup("router backward", dtype.as_str(), Pass::Backward)?,
                    )?);
                }
            }
        }
    }
    // Ties: bf16 logits of four distinct values over 16 experts (ties in every row), the choice
    // of logits that record a graph against the same logits without one — the same experts
    // (on CUDA both from the kernel, ties to the lower expert; candle's CUDA arg-sort is not
    // stable).
    {
        let (n, e, k) = (300usize, 16usize, 4usize);
        let tied: Vec<f32> = (0..n * e)
            .map(|i| ((i * 37 + i / e * 11) % 4) as f32)
            .collect();
        let logits = Tensor::from_vec(tied, (n, e), device)?.to_dtype(DType::BF16)?;
        let var = candle_core::Var::from_tensor(&logits)?;
        let (_, plain) = router_probs(&logits, Some(k))?;
        let (_, graph) = router_probs(var.as_tensor(), Some(k))?;
        let (Some(plain), Some(graph)) = (plain, graph) else {
            candle_core::bail!("router: no top-k choice");
        };
        out.push(compare(
            "router BF16, tied logits, 16 experts top-4: choices with a graph = without",
            &graph.to_device(&Device::Cpu)?,
            &plain.to_device(&Device::Cpu)?,
            lookup("router top-k", "u32", Pass::Exact)?,
        )?);
    }
    // The scores of logits that record a graph, and of a replay (no choice), against the same
    // logits without a graph: bit for bit (the taped and the plain forward weigh tokens alike;
    // an ulp between them failed gpu-check's f32 train steps, 2026-12-05). Random f32 logits
    // over 128 experts (the sums' order matters); softmax, and DeepSeek-V2's group-limited
    // softmax choice.
    {
        let _kernel = CHOOSE_KERNEL.scoped(true);
        let (n, e, k) = (300usize, 128usize, 8usize);
        let logits = Tensor::randn(0f32, 2.0, (n, e), &Device::Cpu)?.to_device(device)?;
        let var = candle_core::Var::from_tensor(&logits)?;
        let graph = var.as_tensor();
        let row = lookup("router graph = plain", "f32", Pass::Exact)?;
        let (plain, _) = router_probs(&logits, Some(k))?;
        for (what, got) in [
            ("with a graph", router_probs(graph, Some(k))?.0),
            ("replayed with a graph", router_probs(graph, None)?.0),
        ] {
            let label = format!("router F32 softmax {e} experts: probabilities {what} = plain");
            out.push(compare(&label, &got.detach(), &plain, row)?);
        }
        let choice = Choice {
            sigmoid: false,
            bias: None,
            groups: Some((8, 3, GroupScore::Max)),
        };
        let (plain, _) = router_choose(&logits, &choice, Some(k))?;
        for (what, got) in [
            ("with a graph", router_choose(graph, &choice, Some(k))?.0),
            (
                "replayed with a graph",
                router_choose(graph, &choice, None)?.0,
            ),
        ] {
            let label = format!("router F32 group-limited {e} experts: scores {what} = plain");
            out.push(compare(&label, &got.detach(), &plain, row)?);
        }
    }
    // DeepSeek-V3's choice (sigmoid scores, a per-expert bias, the best 4 of 8 groups by their
    // two best scores), DeepSeek-V2's (softmax, the best 3 of 8 groups of 20 by their best
    // score: 160 experts, not a multiple of 32) and GLM-4.7-Flash's (sigmoid, bias, one group of
    // 64) on bf16 logits of five values (ties everywhere: the lower expert on both sides).
    // The kernel on CUDA (switched on here whatever the setting) against candle's ops on the
    // CPU; logits as above, bias steps of 1e-4.
    let _kernel = CHOOSE_KERNEL.scoped(true);
    for (sigmoid, rule, groups, keep, e, dtype) in [
        (true, GroupScore::TopTwoSum, 8, 4usize, 256usize, DType::F32),
        (false, GroupScore::Max, 8, 3, 160, DType::F32),
        (true, GroupScore::TopTwoSum, 1, 1, 64, DType::BF16),
    ] {
        let (n, k) = (300usize, 8usize);
        let logits: Vec<f32> = (0..n * e)
            .map(|i| {
                let (t, j) = (i / e, i % e);
                match dtype {
                    DType::BF16 => ((j * 7 + t) % 5) as f32 - 2.0,
                    _ => ((j * 37 + t * 11) % e) as f32 * (6.0 / e as f32) - 3.0,
                }
            })
            .collect();
        let logits = Tensor::from_vec(logits, (n, e), &Device::Cpu)?.to_dtype(dtype)?;
        let bias: Vec<f32> = (0..e).map(|j| ((j * 13) % e) as f32 * 1e-4).collect();
        let bias = match dtype {
            DType::BF16 => Tensor::zeros(e, DType::F32, &Device::Cpu)?,
            _ => Tensor::from_vec(bias, e, &Device::Cpu)?,
        };
        let choose = |dev: &Device| -> Result<(Tensor, Option<Tensor>)> {
            let bias = bias.to_device(dev)?;
            let choice = Choice {
                sigmoid,
                bias: sigmoid.then_some(&bias),
                groups: Some((groups, keep, rule)),
            };
            router_choose(&logits.to_device(dev)?, &choice, Some(k))
        };
        let ((got_p, got_top), (want_p, want_top)) = (choose(device)?, choose(&Device::Cpu)?);
        let what = format!(
            "router {dtype:?} {rule:?} groups, best {keep} of {groups}, {e} experts top-{k}"
        );
        out.push(compare(
            &format!("{what}: scores"),
            &got_p,
            &want_p,
            lookup("router probs", "f32", Pass::Forward)?,
        )?);
        let (Some(got_top), Some(want_top)) = (got_top, want_top) else {
            candle_core::bail!("{what}: no top-k choice");
        };
        // In order: descending, ties to the lower expert on both sides.
        let f32s = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        out.push(compare(
            &format!("{what}: choices"),
            &f32s(&got_top)?,
            &f32s(&want_top)?,
            lookup("router top-k", "u32", Pass::Exact)?,
        )?);
    }
    Ok(out)
}
