//! Moving token rows into expert order and back as gathers, never scatter-adds.
//!
//! Top-k routing sends every token `t` to `k` experts; the routed rows are sorted by expert, row
//! `r` holding token `tokens[r]` for its slot `slots[r]` (= t·k + j, the position of the choice in
//! the flattened `[N, k]` routing weights), and `inv[t·k + j]` is the row of each slot. Both
//! directions (and both backwards) are then gathers with `k` terms per token: no atomics, and
//! full parallelism over the output (candle's `index_add` runs one thread per column and loops
//! over all rows: tens of milliseconds per layer at Qwen3-30B-A3B size).

use candle_core::{CustomOp1, CustomOp2, DType, Result, Tensor};

/// The routing permutation of one micro-batch through one MoE layer.
#[derive(Clone)]
pub struct RowOrder {
    /// Token of each routed row: `[M]` u32.
    pub tokens: Tensor,
    /// Slot (t·k + j) of each routed row: `[M]` u32.
    pub slots: Tensor,
    /// Routed row of each slot: `[N·k]` u32.
    pub inv: Tensor,
    pub k: usize,
}

impl RowOrder {
    /// From the host-side row order (`tokens[r]`, `slots[r]`); every slot must occur once.
    pub fn new(
        tokens: Vec<u32>,
        slots: Vec<u32>,
        k: usize,
        device: &candle_core::Device,
    ) -> Result<RowOrder> {
        let m = slots.len();
        let mut inv = vec![u32::MAX; m];
        for (r, &s) in slots.iter().enumerate() {
            match inv.get_mut(s as usize) {
                Some(v) if *v == u32::MAX => *v = r as u32,
                _ => candle_core::bail!("routing: slot {s} repeated or out of range for {m} rows"),
            }
        }
        if k == 0 || m % k != 0 {
            candle_core::bail!("routing: {m} rows are not whole tokens of {k} slots");
        }
        Ok(RowOrder {
            tokens: Tensor::from_vec(tokens, m, device)?,
            slots: Tensor::from_vec(slots, m, device)?,
            inv: Tensor::from_vec(inv, m, device)?,
            k,
        })
    }
}

/// One micro-batch's routing through one MoE layer: the row order, the rows of each held
/// expert, and the tokens of every expert.
pub struct Plan {
    pub order: RowOrder,
    /// Rows per held expert.
    pub counts: Vec<usize>,
    /// Rows (token choices) per global expert.
    pub per_expert: Vec<u64>,
}

/// The routing plan of top-k choices `top [N, k]` u32 over `experts` experts, rows for the
/// `held` ones sorted by expert, then slot (t·k + j). When every expert is held and `top` is on
/// CUDA it is built on the device and only the counts come to the host; otherwise from a host
/// copy of the choices.
pub fn plan(top: &Tensor, experts: usize, held: std::ops::Range<usize>) -> Result<Plan> {
    #[cfg(feature = "cuda")]
    if top.device().is_cuda() && held == (0..experts) && experts <= 1024 && top.elem_count() > 0 {
        let (order, counts) = cuda::plan(top, experts)?;
        let per_expert = counts.iter().map(|&c| c as u64).collect();
        return Ok(Plan {
            order,
            counts,
            per_expert,
        });
    }
    let indices = top.to_vec2::<u32>()?;
    let mut rows: Vec<Vec<(u32, u32)>> = vec![Vec::new(); experts];
    for (t, choice) in indices.iter().enumerate() {
        for (j, &e) in choice.iter().enumerate() {
            match rows.get_mut(e as usize) {
                Some(r) => r.push((t as u32, (t * choice.len() + j) as u32)),
                None => candle_core::bail!("routing: expert {e} chosen of {experts}"),
            }
        }
    }
    let per_expert = rows.iter().map(|r| r.len() as u64).collect();
    let mut tokens = Vec::new();
    let mut slots = Vec::new();
    let mut counts = Vec::with_capacity(held.len());
    for e in held {
        counts.push(rows[e].len());
        for &(t, s) in &rows[e] {
            tokens.push(t);
            slots.push(s);
        }
    }
    let k = indices.first().map_or(1, |c| c.len());
    Ok(Plan {
        order: RowOrder::new(tokens, slots, k, top.device())?,
        counts,
        per_expert,
    })
}

/// `Σ_j src[idx[t·k + j]]` over the k rows of each token: src `[M, H]` → `[M / k, H]`, summed
/// in f32 and returned in `dtype`, each term optionally weighted by `w [N, k]`. One kernel on
/// CUDA (f32 weights); candle ops otherwise (the reference).
fn gather_sum(
    src: &Tensor,
    idx: &Tensor,
    k: usize,
    w: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() && src.dtype() == dtype && w.is_none_or(|w| w.dtype() == DType::F32) {
        return cuda::gather_sum(src, idx, k, w);
    }
    gather_sum_reference(src, idx, k, w, dtype)
}

fn gather_sum_reference(
    src: &Tensor,
    idx: &Tensor,
    k: usize,
    w: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    let (m, h) = src.dims2()?;
    let rows = src
        .index_select(idx, 0)?
        .to_dtype(DType::F32)?
        .reshape((m / k, k, h))?;
    let rows = match w {
        Some(w) => rows.broadcast_mul(&w.to_dtype(DType::F32)?.unsqueeze(2)?)?,
        None => rows,
    };
    rows.sum(1)?.to_dtype(dtype)
}

/// The row gather's forward on tensors, no graph: x `[N, H]` → `[N·k, H]` in `order`.
pub(crate) fn gather_forward(x: &Tensor, order: &RowOrder) -> Result<Tensor> {
    super::direct(GatherRows(order.clone()).fwd(x)?)
}

/// The row gather's backward: dxs `[N·k, H]` → dx `[N, H]` in `dtype`.
pub(crate) fn gather_backward(dxs: &Tensor, order: &RowOrder, dtype: DType) -> Result<Tensor> {
    gather_sum(&dxs.contiguous()?, &order.inv, order.k, None, dtype)
}

/// The weighted combine's forward on tensors, no graph: y `[N·k, H]`, w `[N, k]` → `[N, H]`.
pub(crate) fn combine_forward(y: &Tensor, w: &Tensor, order: &RowOrder) -> Result<Tensor> {
    super::direct(CombineRows(order.clone()).fwd(y, w)?)
}

/// `xs[r] = x[tokens[r]]`; backward: `dx[t] = Σ_j dxs[inv[t·k + j]]`.
struct GatherRows(RowOrder);

impl GatherRows {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        // On CUDA the routing kernel with one unweighted term per row (16-byte copies; candle's
        // index_select moved ~0.27 TB/s here).
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return cuda::gather_sum(x, &self.0.tokens, 1, None);
        }
        x.index_select(&self.0.tokens, 0)
    }
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather_rows"
    }

    super::tensor_forward!(1, "gather_rows", fwd);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = crate::util::phases::Span::start("bwd: routing gather", x.device());
        Ok(Some(gather_backward(grad, &self.0, x.dtype())?))
    }
}

/// `out[t] = Σ_j w[t, j] · y[inv[t·k + j]]`; backward: `dy[r] = w[slot r] · dout[tokens[r]]`,
/// `dw[t, j] = ⟨dout[t], y[inv[t·k + j]]⟩` (f32 sums).
struct CombineRows(RowOrder);

impl CombineRows {
    fn fwd(&self, y: &Tensor, w: &Tensor) -> Result<Tensor> {
        gather_sum(y, &self.0.inv, self.0.k, Some(w), y.dtype())
    }
}

impl CustomOp2 for CombineRows {
    fn name(&self) -> &'static str {
        "combine_rows"
    }

    super::tensor_forward!(2, "combine_rows", fwd);

    fn bwd(
        &self,
        y: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::util::phases::Span::start("bwd: routing combine", y.device());
        let (dy, dw) = combine_backward(y, w, &self.0, grad)?;
        Ok((Some(dy), Some(dw)))
    }
}

/// The weighted combine's backward: (y, w, dout `[N, H]`) → (dy `[N·k, H]` in y's dtype, dw
/// `[N, k]` in w's dtype).
pub(crate) fn combine_backward(
    y: &Tensor,
    w: &Tensor,
    o: &RowOrder,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && w.dtype() == DType::F32 {
        let grad = super::at_offset_zero(&grad.to_dtype(y.dtype())?)?;
        return cuda::combine_bwd(&grad, y, w, o);
    }
    let (m, h) = y.dims2()?;
    let grad = grad.to_dtype(DType::F32)?.contiguous()?; // [N, H]
    let w_rows = w
        .to_dtype(DType::F32)?
        .flatten_all()?
        .index_select(&o.slots, 0)?; // [M]
    let dy = grad
        .index_select(&o.tokens, 0)?
        .broadcast_mul(&w_rows.unsqueeze(1)?)?
        .to_dtype(y.dtype())?;
    let y_tok = y
        .index_select(&o.inv, 0)?
        .to_dtype(DType::F32)?
        .reshape((m / o.k, o.k, h))?; // [N, k, H]
    let dw = y_tok
        .broadcast_mul(&grad.unsqueeze(1)?)?
        .sum(2)?
        .to_dtype(w.dtype())?; // [N, k]
    Ok((dy, dw))
}

/// The weighted combine's backward for the rows alone: dout `[N, H]` → dy `[N·k, H]` in
/// `dtype`, `dy[r] = w[slot r] · dout[tokens[r]]` (one rounding, as [`combine_backward`]). The
/// weights' gradient then comes from the experts' backward ([`weights_grad`]), which spares
/// reading the expert outputs (and keeping them for the backward).
pub(crate) fn combine_backward_rows(
    w: &Tensor,
    o: &RowOrder,
    grad: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let w_rows = w
        .to_dtype(DType::F32)?
        .flatten_all()?
        .index_select(&o.slots, 0)?; // [M]
    #[cfg(feature = "cuda")]
    if grad.device().is_cuda() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        let grad = super::at_offset_zero(&grad.to_dtype(dtype)?)?;
        return cuda::gather_sum(&grad, &o.tokens, 1, Some(&w_rows));
    }
    grad.to_dtype(DType::F32)?
        .index_select(&o.tokens, 0)?
        .broadcast_mul(&w_rows.unsqueeze(1)?)?
        .to_dtype(dtype)
}

/// The weighted combine's weight gradient `[N, k]` (w's dtype) from the routed rows' dots
/// `[N·k]` (f32, row order) of [`combine_backward_rows`]'s rows with what they scaled — each
/// w times ⟨dout[t], y[r]⟩ (`ops::routed_experts`): `dw[s] = dots[inv[s]] / w[s]`, 0 where
/// w[s] = 0 (its row's gradient is 0 there, and a zero weight passes no gradient to the
/// router's logits: softmax and sigmoid scale theirs by the probability).
pub(crate) fn weights_grad(dots: &Tensor, w: &Tensor, o: &RowOrder) -> Result<Tensor> {
    let w32 = w.to_dtype(DType::F32)?;
    let nonzero = w32
        .eq(&w32.zeros_like()?)?
        .where_cond(&w32.ones_like()?, &w32)?;
    let dots = dots.flatten_all()?.index_select(&o.inv, 0)?;
    (dots.reshape(w.shape())? / nonzero)?.to_dtype(w.dtype())
}

/// Rows `idx` (`[M]` u32) of src `[R, H]` → `[M, H]`, no graph: on CUDA the 16-byte row
/// gather (candle's `index_select` moved ~0.27 TB/s there), elsewhere `index_select`.
pub(crate) fn select_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() && matches!(src.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return cuda::gather_sum(&super::at_offset_zero(src)?, idx, 1, None);
    }
    src.index_select(idx, 0)
}

/// x `[N, H]` → the routed rows `[N·k, H]` in `order`.
pub fn gather_rows(x: &Tensor, order: &RowOrder) -> Result<Tensor> {
    let x = super::at_offset_zero(x)?;
    let op = GatherRows(order.clone());
    if super::records_graph(&[&x]) {
        x.apply_op1(op)
    } else {
        super::direct(op.fwd(&x)?)
    }
}

/// Routed rows y `[N·k, H]` weighted by `w [N, k]` and summed per token → `[N, H]` in y's dtype.
pub fn combine_rows(y: &Tensor, w: &Tensor, order: &RowOrder) -> Result<Tensor> {
    let (m, _) = y.dims2()?;
    if w.dims2()? != (m / order.k, order.k) || m != order.inv.dim(0)? {
        candle_core::bail!(
            "combine_rows: {m} rows with weights {:?} for k {}",
            w.dims(),
            order.k
        );
    }
    let (y, w) = (super::at_offset_zero(y)?, super::at_offset_zero(w)?);
    let op = CombineRows(order.clone());
    if super::records_graph(&[&y, &w]) {
        y.apply_op2(&w, op)
    } else {
        super::direct(op.fwd(&y, &w)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::RowOrder;
    use crate::util::phases;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Layout, Result, Storage, Tensor};

    type Guard<'a> = (candle_core::StorageRef<'a>, &'a Layout);

    /// The CUDA elements of a guarded tensor from its start offset.
    fn view<'a, T: CudaDType>(g: &'a Guard<'_>) -> Result<CudaView<'a, T>> {
        let Storage::Cuda(c) = &*g.0 else {
            candle_core::bail!("routing: tensor not on CUDA")
        };
        Ok(c.as_cuda_slice::<T>()?.slice(g.1.start_offset()..))
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("routing: {other:?} not supported"),
        })
    }

    fn wrap<T: CudaDType>(
        out: CudaSlice<T>,
        dev: &candle_core::CudaDevice,
        shape: (usize, usize),
    ) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )
    }

    pub fn gather_sum(src: &Tensor, idx: &Tensor, k: usize, w: Option<&Tensor>) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = src.device() else {
            candle_core::bail!("routing: not on CUDA")
        };
        let h = src.dim(1)?;
        // Output rows: one per k indices (src may have more rows, or fewer: a row gather).
        let tokens = idx.elem_count() / k;
        let name = if w.is_some() {
            "gather_sum_weighted"
        } else {
            "gather_sum"
        };
        let (src, idx) = (src.contiguous()?, idx.contiguous()?);
        let w = w.map(|w| w.contiguous()).transpose()?;
        let (gs, gi) = (src.storage_and_layout(), idx.storage_and_layout());
        let gw = w.as_ref().map(|w| w.storage_and_layout());
        // 16-byte packs when rows are whole packs and the source starts on one (outputs are
        // fresh allocations, 256-byte aligned).
        let per_pack = 16 / src.dtype().size_in_bytes();
        let vec = h % per_pack == 0 && gs.1.start_offset() % per_pack == 0;
        // A row gather (k = 1, weighted or not): one warp per row (kernels/routing.cu).
        let rows_only = vec && k == 1;
        let (name, per_thread) = match (rows_only, vec) {
            (true, _) if w.is_some() => ("gather_rows_weighted_vec".to_string(), per_pack),
            (true, _) => ("gather_rows_vec".to_string(), per_pack),
            (false, true) => (format!("{name}_vec"), per_pack),
            (false, false) => (name.to_string(), 1),
        };
        let func = dev.get_or_load_custom_func(
            &format!("{name}_{}", suffix(src.dtype())?),
            "moeq_routing",
            crate::ops::kernels::ROUTING,
        )?;
        let cfg = if rows_only {
            LaunchConfig {
                grid_dim: (tokens.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig::for_num_elems((tokens * h / per_thread).min(1 << 30) as u32)
        };
        let ki = k as i32;
        macro_rules! run {
            ($t:ty) => {{
                let s = view::<$t>(&gs)?;
                let i = view::<u32>(&gi)?;
                let wv = match &gw {
                    Some(g) => Some(view::<f32>(g)?),
                    None => None,
                };
                // SAFETY: the kernel writes every output element.
                let out = unsafe { dev.alloc::<$t>(tokens * h)? };
                let mut b = func.builder();
                b.arg(&s);
                b.arg(&i);
                if let Some(wv) = &wv {
                    b.arg(wv);
                }
                b.arg(&out);
                b.arg(&tokens);
                if !rows_only {
                    b.arg(&ki);
                }
                b.arg(&h);
                // SAFETY: arguments match kernels/routing.cu.
                unsafe { b.launch(cfg) }.w()?;
                wrap(out, dev, (tokens, h))
            }};
        }
        Ok(match src.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            other => candle_core::bail!("routing: {other:?} not supported"),
        })
    }

    /// The routing plan on the device: top-k choices `[N, k]` u32 (ids below `experts`) → the
    /// row order and the rows per expert, the same as the host plan (`RowOrder::new` over rows
    /// sorted by expert, then slot). Only the counts come back to the host (the grouped GEMMs
    /// size their groups with them): one small copy instead of the choices, no uploads.
    pub fn plan(top: &Tensor, experts: usize) -> Result<(RowOrder, Vec<usize>)> {
        let candle_core::Device::Cuda(dev) = top.device() else {
            candle_core::bail!("routing: not on CUDA")
        };
        if experts == 0 || experts > 1024 || top.dtype() != DType::U32 {
            candle_core::bail!(
                "routing: device plan for {experts} experts of {:?}",
                top.dtype()
            );
        }
        let top = top.contiguous()?;
        let (n, k) = top.dims2()?;
        let m = n * k;
        let gt = top.storage_and_layout();
        let tv = view::<u32>(&gt)?;
        let load = |name: &str| {
            dev.get_or_load_custom_func(name, "moeq_routing", crate::ops::kernels::ROUTING)
        };
        let counts = dev.alloc_zeros::<u32>(experts)?;
        let count = load("route_count")?;
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(256).clamp(1, 1024) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (experts * 4) as u32,
        };
        let experts_i = experts as i32;
        let mut b = count.builder();
        b.arg(&tv);
        b.arg(&counts);
        b.arg(&m);
        b.arg(&experts_i);
        // SAFETY: arguments match kernels/routing.cu; the histogram fits the shared memory.
        unsafe { b.launch(cfg) }.w()?;
        // SAFETY: route_rows writes every row and every slot (each slot names one expert).
        let (tokens, slots, inv) = unsafe {
            (
                dev.alloc::<u32>(m)?,
                dev.alloc::<u32>(m)?,
                dev.alloc::<u32>(m)?,
            )
        };
        let rows = load("route_rows")?;
        let cfg = LaunchConfig {
            grid_dim: (experts as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let ki = k as i32;
        let mut b = rows.builder();
        b.arg(&tv);
        b.arg(&counts);
        b.arg(&tokens);
        b.arg(&slots);
        b.arg(&inv);
        b.arg(&m);
        b.arg(&ki);
        // SAFETY: arguments match kernels/routing.cu.
        unsafe { b.launch(cfg) }.w()?;
        let counts = phases::waited("host waits: expert counts", top.device(), || {
            dev.clone_dtoh(&counts)
        })?;
        let counts: Vec<usize> = counts.into_iter().map(|c| c as usize).collect();
        if counts.iter().sum::<usize>() != m {
            candle_core::bail!("routing: a top-k choice names no expert below {experts}");
        }
        let order = RowOrder {
            tokens: wrap(tokens, dev, (m, 1)).flatten_all()?,
            slots: wrap(slots, dev, (m, 1)).flatten_all()?,
            inv: wrap(inv, dev, (m, 1)).flatten_all()?,
            k,
        };
        Ok((order, counts))
    }

    pub fn combine_bwd(
        dout: &Tensor,
        y: &Tensor,
        w: &Tensor,
        o: &RowOrder,
    ) -> Result<(Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = y.device() else {
            candle_core::bail!("routing: not on CUDA")
        };
        let (m, h) = y.dims2()?;
        let (y, w) = (y.contiguous()?, w.contiguous()?);
        // 16-byte packs when rows are whole packs and both row sets start on one.
        let per_pack = 16 / y.dtype().size_in_bytes();
        let vec = h % per_pack == 0
            && dout.layout().start_offset() % per_pack == 0
            && y.layout().start_offset() % per_pack == 0
            && dout.is_contiguous();
        let kind = if vec {
            "combine_bwd_vec"
        } else {
            "combine_bwd"
        };
        let func = dev.get_or_load_custom_func(
            &format!("{kind}_{}", suffix(y.dtype())?),
            "moeq_routing",
            crate::ops::kernels::ROUTING,
        )?;
        let (gd, gy, gw) = (
            dout.storage_and_layout(),
            y.storage_and_layout(),
            w.storage_and_layout(),
        );
        let (gt, gsl) = (o.tokens.storage_and_layout(), o.slots.storage_and_layout());
        let cfg = LaunchConfig {
            grid_dim: (m as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every slot is some row's (RowOrder::new checked), so every dw is written.
        let dw = unsafe { dev.alloc::<f32>(m)? };
        macro_rules! run {
            ($t:ty) => {{
                let (d, yv, wv) = (view::<$t>(&gd)?, view::<$t>(&gy)?, view::<f32>(&gw)?);
                let (tv, sv) = (view::<u32>(&gt)?, view::<u32>(&gsl)?);
                // SAFETY: the kernel writes every row of dy.
                let dy = unsafe { dev.alloc::<$t>(m * h)? };
                let mut b = func.builder();
                b.arg(&d);
                b.arg(&yv);
                b.arg(&wv);
                b.arg(&tv);
                b.arg(&sv);
                b.arg(&dy);
                b.arg(&dw);
                b.arg(&h);
                // SAFETY: arguments match kernels/routing.cu.
                unsafe { b.launch(cfg) }.w()?;
                wrap(dy, dev, (m, h))
            }};
        }
        let dy = match y.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            other => candle_core::bail!("routing: {other:?} not supported"),
        };
        Ok((dy, wrap(dw, dev, (m / o.k, o.k))))
    }
}
