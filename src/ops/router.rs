//! The router's probabilities and top-k choice from its logits `[N, E]`: `softmax` over the
//! experts in f32 and, when a pass records the routing, the k most probable experts per token
//! in descending order (ties to the lower expert). On CUDA one warp per token does both
//! (`kernels/router.cu` `router_softmax_topk`): candle's softmax took six element-wise passes
//! and its arg-sort sorted all E probabilities to keep k; where the logits record a graph the
//! kernel's probabilities and choice carry candle's softmax as their graph (the same values on
//! every path). Elsewhere candle's softmax and arg-sort: the reference (`moeq gpu-check`, the
//! "router" entries).

use super::norm::softmax_last;
use crate::util::switch::{EnvSwitch, Values};
use candle_core::{DType, Result, Tensor, D};

/// (probabilities `[N, E]` f32, the top-`k` experts `[N, k]` u32 when `k` is given).
pub fn router_probs(logits: &Tensor, k: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
    let (_, e) = logits.dims2()?;
    if k.is_some_and(|k| k == 0 || k > e) {
        candle_core::bail!("router: top-{} of {e} experts", k.unwrap_or(0));
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && e <= cuda::MAX_EXPERTS {
        let (probs, top) = cuda::softmax_topk(&super::at_offset_zero(&logits.detach())?, k)?;
        if !super::records_graph(&[logits]) {
            return Ok((probs, top));
        }
        // Where the logits record a graph: the kernel's probabilities and choice with candle's
        // softmax for the graph, so every path routes alike (ties — equal bf16 logits are
        // common — to the lower expert; candle's arg-sort on CUDA is not stable: gpu-check's
        // olmoe train step, 2026-12-05) and weighs alike (candle's sum runs in another order:
        // deepseek_v2's and ernie4_5_moe's taped forward, 2026-12-05).
        let graph = softmax_last(&logits.to_dtype(DType::F32)?)?;
        return Ok((with_graph_of(&probs, &graph)?, top));
    }
    let probs = softmax_last(&logits.to_dtype(DType::F32)?)?;
    let top = match k {
        Some(k) => Some(
            probs
                .detach()
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .contiguous()?,
        ),
        None => None,
    };
    Ok((probs, top))
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// Its best expert's score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of its two best (bias-corrected) scores (DeepSeek-V3 `noaux_tc`).
    TopTwoSum,
}

/// A router beyond softmax-then-top-k: how scores come from the logits and how the top-k is
/// chosen from them.
pub struct Choice<'a> {
    /// `sigmoid` per expert, else `softmax` over the experts.
    pub sigmoid: bool,
    /// A per-expert bias `[E]` added to the scores for the choice only (`noaux_tc`).
    pub bias: Option<&'a Tensor>,
    /// Group-limited choice: (groups, groups kept, how a group is scored).
    pub groups: Option<(usize, usize, GroupScore)>,
}

impl Choice<'_> {
    /// The scores `[N, E]` f32 by candle's ops (sigmoid or softmax of the logits), with the
    /// logits' graph: the CPU's values, and the graph of the kernel's values on CUDA.
    fn scores(&self, logits: &Tensor) -> Result<Tensor> {
        let logits = logits.to_dtype(DType::F32)?;
        match self.sigmoid {
            true => (logits.neg()?.exp()? + 1.0)?.recip(),
            false => softmax_last(&logits),
        }
    }
}

/// (scores `[N, E]` f32 with the logits' graph, the top-`k` experts `[N, k]` u32 when `k` is
/// given) as transformers' DeepSeek and GLM routers compute them: scores by sigmoid or
/// softmax; for the choice the scores plus the bias, the experts outside a token's `keep`
/// best groups left out (a group scored by its best, or its two best, choice scores), then the
/// k best (ties to the lower expert). Candle's ops: the reference (`moeq gpu-check`, the
/// "router" entries), and on CUDA what runs where [`CHOOSE_KERNEL`] is off; by default one warp
/// per token computes the scores and makes the choice (`kernels/router.cu` `router_choose`;
/// where the logits record a graph, candle's ops give the scores' graph, not their values).
pub fn router_choose(
    logits: &Tensor,
    choice: &Choice,
    k: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, e) = logits.dims2()?;
    if k.is_some_and(|k| k == 0 || k > e) {
        candle_core::bail!("router: top-{} of {e} experts", k.unwrap_or(0));
    }
    if let Some((groups, keep, _)) = choice.groups {
        if groups == 0 || e % groups != 0 || keep == 0 || keep > groups {
            candle_core::bail!("router: {keep} of {groups} groups of {e} experts");
        }
    }
    if let Some(b) = choice.bias {
        if b.elem_count() != e {
            candle_core::bail!("router: a bias of {} for {e} experts", b.elem_count());
        }
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda()
        && CHOOSE_KERNEL.get()
        && e <= cuda::MAX_EXPERTS
        && choice.groups.is_none_or(|(g, _, _)| g <= 32)
        && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16)
    {
        let bias = match choice.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let plain = super::at_offset_zero(&logits.detach())?;
        // Scores only (a replayed routing): the kernel's scores, its choice of one unused.
        let (scores, top) = cuda::choose(&plain, bias.as_ref(), choice, k.unwrap_or(1))?;
        let top = k.map(|_| top);
        if !super::records_graph(&[logits]) {
            return Ok((scores, top));
        }
        // The kernel's scores and choice with candle's ops for the graph, as for softmax
        // routers: every path routes and weighs alike.
        return Ok((with_graph_of(&scores, &choice.scores(logits)?)?, top));
    }
    let scores = choice.scores(logits)?;
    let Some(k) = k else {
        return Ok((scores, None));
    };
    let mut pick = scores.detach();
    if let Some(b) = choice.bias {
        pick = pick.broadcast_add(&b.to_dtype(DType::F32)?.reshape((1, e))?)?;
    }
    if let Some((groups, keep, rule)) = choice.groups {
        let per = e / groups;
        let grouped = pick.reshape((n, groups, per))?;
        let group_scores = match rule {
            GroupScore::Max => grouped.max(D::Minus1)?,
            GroupScore::TopTwoSum => grouped
                .sort_last_dim(false)?
                .0
                .narrow(2, 0, per.min(2))?
                .sum(D::Minus1)?,
        }; // [N, groups]
        let best = group_scores
            .arg_sort_last_dim(false)?
            .narrow(1, 0, keep)?
            .contiguous()?;
        let kept = Tensor::zeros((n, groups), DType::F32, logits.device())?.scatter_add(
            &best,
            &Tensor::ones((n, keep), DType::F32, logits.device())?,
            1,
        )?;
        let kept = kept
            .unsqueeze(2)?
            .broadcast_as((n, groups, per))?
            .reshape((n, e))?
            .ge(0.5)?;
        let out = Tensor::full(f32::NEG_INFINITY, (n, e), logits.device())?;
        pick = kept.where_cond(&pick, &out)?;
    }
    let top = pick
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    Ok((scores, Some(top)))
}

/// `values` (no graph) with the graph of `graph` (the same function computed by ops that
/// record one): values + (graph − graph), the difference exactly 0 for finite values, so the
/// result is `values` bit for bit and its gradient flows into `graph`.
#[cfg(feature = "cuda")]
fn with_graph_of(values: &Tensor, graph: &Tensor) -> Result<Tensor> {
    values.detach() + (graph - graph.detach())?
}

/// Whether [`router_choose`] runs its kernel on CUDA: on unless `MOEQ_ROUTER_CHOOSE=candle` (or
/// `0`: candle's ops, the reference). gpu-check's choice rows run it against the CPU whatever the
/// setting (launch/bench/NOTES.md item 52).
pub static CHOOSE_KERNEL: EnvSwitch = EnvSwitch::new(
    "MOEQ_ROUTER_CHOOSE",
    true,
    Values {
        on: &["kernel", "1", "on"],
        off: &["candle", "0", "off"],
    },
);

/// The router logits' gradient `[N, E]` in `dtype` from the routing weights' gradient `dw`
/// `[N, k]`: through the `scaling`, the optional renormalisation (w = sel / Σ sel), the top-k
/// selection (`top` `[N, k]` u32) and the f32 softmax (or, with `sigmoid`, the sigmoid) that
/// gave `probs` `[N, E]`. On CUDA one warp per token (`kernels/router.cu` `router_bwd`, k ≤ 32,
/// E ≤ 1,024); elsewhere candle's ops (the reference).
pub fn logits_grad(
    probs: &Tensor,
    top: &Tensor,
    dw: &Tensor,
    (scaling, renormalize, sigmoid): (f64, bool, bool),
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if probs.device().is_cuda()
        && probs.dtype() == DType::F32
        && top.dim(1)? <= 32
        && probs.dim(1)? <= cuda::MAX_EXPERTS
    {
        let z = super::at_offset_zero;
        let dw = z(&dw.to_dtype(DType::F32)?)?;
        return cuda::logits_grad(
            &z(probs)?,
            &z(top)?,
            &dw,
            (scaling, renormalize, sigmoid),
            dtype,
        );
    }
    let dw = (dw.to_dtype(DType::F32)? * scaling)?;
    let sel = probs.gather(top, 1)?; // [N, k]
    let dsel = if renormalize {
        // w = sel / Σ sel: dsel = (dw − Σ dw·w) / Σ sel.
        let total = sel.sum_keepdim(D::Minus1)?;
        let w = sel.broadcast_div(&total)?;
        dw.broadcast_sub(&(&dw * w)?.sum_keepdim(D::Minus1)?)?
            .broadcast_div(&total)?
    } else {
        dw
    };
    let dprobs = probs.zeros_like()?.scatter_add(top, &dsel, 1)?;
    let dlogits = if sigmoid {
        // Sigmoid: dlogits = dp · s · (1 − s).
        (dprobs * (probs * probs.affine(-1.0, 1.0)?)?)?
    } else {
        // Softmax: dlogits = p · (dp − Σ dp·p).
        let dot = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
        (probs * dprobs.broadcast_sub(&dot)?)?
    };
    dlogits.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{Result, Storage, Tensor};

    /// Experts per row the kernel keeps in registers (32 lanes × at most 32).
    pub(super) const MAX_EXPERTS: usize = 1024;

    /// The name of the kernel `{name}_{L}_{T}` for rows of E experts in `dtype` (L experts a
    /// lane: the fewest of 1, 2, 4, …, 32 that hold a row), and its launch over `n` rows, one
    /// warp each, eight a block.
    fn row_kernel(
        name: &str,
        dtype: candle_core::DType,
        (n, e): (usize, usize),
    ) -> Result<(String, LaunchConfig)> {
        let suffix = match dtype {
            candle_core::DType::F32 => "f32",
            candle_core::DType::BF16 => "bf16",
            candle_core::DType::F16 => "f16",
            other => candle_core::bail!("router: logits in {other:?}"),
        };
        let per_lane = e.div_ceil(32).max(1).next_power_of_two();
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((format!("{name}_{per_lane}_{suffix}"), cfg))
    }

    /// The kernel over logits `[N, E]` contiguous from offset 0.
    pub(super) fn softmax_topk(
        logits: &Tensor,
        k: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let candle_core::Device::Cuda(dev) = logits.device() else {
            candle_core::bail!("router: not on CUDA")
        };
        let (n, e) = logits.dims2()?;
        let (st, lt) = logits.storage_and_layout();
        let Storage::Cuda(cl) = &*st else {
            candle_core::bail!("router: not on CUDA")
        };
        // Experts a lane: the fewest of 1, 2, 4, …, 32 that hold the row.
        let (kernel, cfg) = row_kernel("router_softmax_topk", logits.dtype(), (n, e))?;
        let func =
            dev.get_or_load_custom_func(&kernel, "moeq_router", crate::ops::kernels::ROUTER)?;
        // SAFETY: the kernel writes every probability, and every choice when asked.
        let probs = unsafe { dev.alloc::<f32>(n * e)? };
        let top = match k {
            Some(k) => Some(unsafe { dev.alloc::<u32>(n * k)? }),
            None => None,
        };
        let (e32, k32, null) = (e as i32, k.unwrap_or(0) as i32, 0u64);
        macro_rules! run {
            ($v:expr) => {{
                let l = $v.slice(lt.start_offset()..lt.start_offset() + n * e);
                let mut b = func.builder();
                b.arg(&l);
                b.arg(&probs);
                match &top {
                    Some(t) => b.arg(t),
                    None => b.arg(&null),
                };
                b.arg(&n);
                b.arg(&e32);
                b.arg(&k32);
                // SAFETY: arguments match kernels/router.cu (a null `top`: no choice); E fits
                // the kernel's registers, k ≤ E (`router_probs` checked).
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match &cl.slice {
            S::F32(v) => run!(v),
            S::BF16(v) => run!(v),
            S::F16(v) => run!(v),
            _ => unreachable!("row_kernel took only these dtypes"),
        }
        drop(st);
        let probs = crate::ops::cuda_tensor(S::F32(probs), dev, (n, e).into());
        let top = top.map(|t| crate::ops::cuda_tensor(S::U32(t), dev, (n, k.unwrap_or(0)).into()));
        Ok((probs, top))
    }

    /// `super::router_choose` by the kernel over logits `[N, E]` contiguous from offset 0 and
    /// `bias` `[E]` f32 contiguous: (scores `[N, E]` f32 without a graph, the top `k` `[N, k]`
    /// u32); E ≤ [`MAX_EXPERTS`], at most 32 groups, the groups and k checked by the caller.
    pub(super) fn choose(
        logits: &Tensor,
        bias: Option<&Tensor>,
        choice: &super::Choice,
        k: usize,
    ) -> Result<(Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = logits.device() else {
            candle_core::bail!("router: not on CUDA")
        };
        let (n, e) = logits.dims2()?;
        let (st, lt) = logits.storage_and_layout();
        let Storage::Cuda(cl) = &*st else {
            candle_core::bail!("router: not on CUDA")
        };
        let bias_storage = bias.map(|b| b.storage_and_layout());
        let bias_slice = match &bias_storage {
            Some((bs, bl)) => match &**bs {
                Storage::Cuda(c) => match &c.slice {
                    S::F32(v) => Some(v.slice(bl.start_offset()..bl.start_offset() + e)),
                    _ => candle_core::bail!("router: the bias must be f32 here"),
                },
                _ => candle_core::bail!("router: the bias must be on the logits' device"),
            },
            None => None,
        };
        let (kernel, cfg) = row_kernel("router_choose", logits.dtype(), (n, e))?;
        let func =
            dev.get_or_load_custom_func(&kernel, "moeq_router", crate::ops::kernels::ROUTER)?;
        // SAFETY: the kernel writes every score and every choice.
        let scores = unsafe { dev.alloc::<f32>(n * e)? };
        let top = unsafe { dev.alloc::<u32>(n * k)? };
        let (groups, keep, rule) = match choice.groups {
            Some((g, keep, rule)) => {
                let two = rule == super::GroupScore::TopTwoSum;
                (g as i32, keep as i32, two as i32)
            }
            None => (0, 0, 0),
        };
        let (e32, k32, sig, null) = (e as i32, k as i32, choice.sigmoid as i32, 0u64);
        macro_rules! run {
            ($v:expr) => {{
                let l = $v.slice(lt.start_offset()..lt.start_offset() + n * e);
                let mut b = func.builder();
                b.arg(&l);
                match &bias_slice {
                    Some(v) => b.arg(v),
                    None => b.arg(&null),
                };
                b.arg(&scores);
                b.arg(&top);
                b.arg(&n);
                b.arg(&e32);
                b.arg(&k32);
                b.arg(&sig);
                b.arg(&groups);
                b.arg(&keep);
                b.arg(&rule);
                // SAFETY: arguments match kernels/router.cu `router_choose` (a null bias:
                // none); E fits the kernel's registers, groups ≤ 32 divide E, keep ≤ groups,
                // k ≤ E (`router_choose` checked).
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match &cl.slice {
            S::F32(v) => run!(v),
            S::BF16(v) => run!(v),
            S::F16(v) => run!(v),
            _ => unreachable!("row_kernel took only these dtypes"),
        }
        drop(st);
        let scores = crate::ops::cuda_tensor(S::F32(scores), dev, (n, e).into());
        let top = crate::ops::cuda_tensor(S::U32(top), dev, (n, k).into());
        Ok((scores, top))
    }

    /// `super::logits_grad` by the kernel: probs `[N, E]` f32, top `[N, k]` u32, dw `[N, k]`
    /// f32, each contiguous from offset 0; k ≤ 32, E ≤ [`MAX_EXPERTS`].
    pub(super) fn logits_grad(
        probs: &Tensor,
        top: &Tensor,
        dw: &Tensor,
        (scaling, renormalize, sigmoid): (f64, bool, bool),
        dtype: candle_core::DType,
    ) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = probs.device() else {
            candle_core::bail!("router: not on CUDA")
        };
        let (n, e) = probs.dims2()?;
        let k = top.dim(1)?;
        if top.dims2()? != (n, k) || dw.dims2()? != (n, k) || k > 32 || e > MAX_EXPERTS {
            candle_core::bail!(
                "router backward: probs {:?}, top {:?}, dw {:?}",
                probs.dims(),
                top.dims(),
                dw.dims()
            );
        }
        let (kernel, cfg) = row_kernel("router_bwd", dtype, (n, e))?;
        let func =
            dev.get_or_load_custom_func(&kernel, "moeq_router", crate::ops::kernels::ROUTER)?;
        let (sp, _) = probs.storage_and_layout();
        let (st, _) = top.storage_and_layout();
        let (sw, _) = dw.storage_and_layout();
        let (Storage::Cuda(cp), Storage::Cuda(ct), Storage::Cuda(cw)) = (&*sp, &*st, &*sw) else {
            candle_core::bail!("router backward: not on CUDA")
        };
        let (S::F32(pv), S::U32(tv), S::F32(wv)) = (&cp.slice, &ct.slice, &cw.slice) else {
            candle_core::bail!("router backward: probs f32, top u32, dw f32")
        };
        let (e32, k32, s32) = (e as i32, k as i32, scaling as f32);
        let (renorm, sig) = (renormalize as i32, sigmoid as i32);
        macro_rules! run {
            ($t:ty, $variant:path) => {{
                // SAFETY: the kernel writes every element of every row.
                let out = unsafe { dev.alloc::<$t>(n * e)? };
                let mut b = func.builder();
                b.arg(pv);
                b.arg(tv);
                b.arg(wv);
                b.arg(&out);
                b.arg(&n);
                b.arg(&e32);
                b.arg(&k32);
                b.arg(&s32);
                b.arg(&renorm);
                b.arg(&sig);
                // SAFETY: arguments match kernels/router.cu `router_bwd`; the operands hold
                // [n, e] / [n, k] elements from offset 0 (the caller's `at_offset_zero`).
                unsafe { b.launch(cfg) }.w()?;
                $variant(out)
            }};
        }
        let slice = match dtype {
            candle_core::DType::F32 => run!(f32, S::F32),
            candle_core::DType::BF16 => run!(half::bf16, S::BF16),
            _ => run!(half::f16, S::F16),
        };
        Ok(crate::ops::cuda_tensor(slice, dev, (n, e).into()))
    }
}
