//! The routing kernels on CUDA (kernels/routing.cu): plan, gathers, the combine's backward.

use super::RowOrder;
use crate::util::phases;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
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
    gather_sum_wide(src, idx, k, w, 0)
}

/// The row gather `out[r] = src[idx[r]]` into rows `extra` columns wider than src's: `[M, H +
/// extra]`, the last `extra` columns not written (the expert adapters' hidden goes there,
/// `ops::lora_in_k`). Needs 16-byte rows on both sides (H and H + extra whole packs).
pub fn gather_rows_wide(src: &Tensor, idx: &Tensor, extra: usize) -> Result<Tensor> {
    gather_sum_wide(src, idx, 1, None, extra)
}

/// `gather_sum` with output rows `extra` columns wider (a row gather only, weighted or not;
/// the last columns not written).
pub fn gather_sum_wide(
    src: &Tensor,
    idx: &Tensor,
    k: usize,
    w: Option<&Tensor>,
    extra: usize,
) -> Result<Tensor> {
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
    let ldo = h + extra;
    if extra > 0 && !(rows_only && ldo % per_pack == 0) {
        candle_core::bail!("routing: a gather {extra} columns wide needs whole 16-byte rows");
    }
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
            // SAFETY: the kernel writes every output element (but the `extra` columns: the
            // caller writes those before any read).
            let out = unsafe { dev.alloc::<$t>(tokens * ldo)? };
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
            if rows_only {
                b.arg(&ldo);
            }
            // SAFETY: arguments match kernels/routing.cu.
            unsafe { b.launch(cfg) }.w()?;
            wrap(out, dev, (tokens, ldo))
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

/// Whether [`spread_rows`] serves `src` in `order`: rows of whole 16-byte packs from a pack
/// boundary, one row per token of the order.
pub fn spreads(src: &Tensor, order: &RowOrder) -> bool {
    let per_pack = 16 / src.dtype().size_in_bytes();
    matches!(src.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && src.rank() == 2
        && src.dims()[1] % per_pack == 0
        && src.layout().start_offset() % per_pack == 0
        && order.inv.elem_count() == src.dims()[0] * order.k
}

/// The routed rows `[N·k, H]` of src `[N, H]` in `order`, read token-major: row `inv[t·k + j]`
/// is `src[t]` (times `w[t, j]` in f32, one rounding, with weights `[N, k]` f32) — the values
/// of `gather_sum(src, tokens, 1, w in row order)`. Needs [`spreads`].
pub fn spread_rows(src: &Tensor, order: &RowOrder, w: Option<&Tensor>) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = src.device() else {
        candle_core::bail!("routing: not on CUDA")
    };
    let (tokens, h) = src.dims2()?;
    let k = order.k;
    if !spreads(src, order) || w.is_some_and(|w| w.elem_count() != tokens * k) {
        candle_core::bail!("routing: spread_rows of {tokens} rows of {h} over {k} slots each");
    }
    let src = src.contiguous()?;
    let w = w
        .map(|w| w.to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    let name = match w {
        Some(_) => "spread_rows_weighted_vec",
        None => "spread_rows_vec",
    };
    let func = dev.get_or_load_custom_func(
        &format!("{name}_{}", suffix(src.dtype())?),
        "moeq_routing",
        crate::ops::kernels::ROUTING,
    )?;
    let inv = order.inv.contiguous()?;
    let (gs, gi) = (src.storage_and_layout(), inv.storage_and_layout());
    let gw = w.as_ref().map(|w| w.storage_and_layout());
    // One warp a token, 8 a block (as the row gather).
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
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
            // SAFETY: every row is some slot's (RowOrder::new checked), so all are written.
            let out = unsafe { dev.alloc::<$t>(tokens * k * h)? };
            let mut b = func.builder();
            b.arg(&s);
            b.arg(&i);
            if let Some(wv) = &wv {
                b.arg(wv);
            }
            b.arg(&out);
            b.arg(&tokens);
            b.arg(&ki);
            b.arg(&h);
            // SAFETY: arguments match kernels/routing.cu `spread_rows_vec`.
            unsafe { b.launch(cfg) }.w()?;
            wrap(out, dev, (tokens * k, h))
        }};
    }
    Ok(match src.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(half::bf16),
        DType::F16 => run!(half::f16),
        other => candle_core::bail!("routing: {other:?} not supported"),
    })
}

/// Rows `lo..hi` of `spread_rows(src, order, None)` — `[hi − lo, H]`, written into the first
/// (hi − lo)·H elements of `into` where given (a contiguous 1-D buffer at offset zero in src's
/// dtype; the returned tensor is that view), else into a fresh buffer. Each token with a row
/// in the range is read once (`spread_rows_range_vec`). Needs [`spreads`].
pub fn spread_rows_range(
    src: &Tensor,
    order: &RowOrder,
    rows: std::ops::Range<usize>,
    into: Option<&Tensor>,
) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = src.device() else {
        candle_core::bail!("routing: not on CUDA")
    };
    let (tokens, h) = src.dims2()?;
    let (k, len) = (order.k, rows.len() * h);
    let fits = |b: &Tensor| {
        b.dtype() == src.dtype()
            && b.rank() == 1
            && b.is_contiguous()
            && b.layout().start_offset() == 0
            && b.elem_count() >= len
    };
    if !spreads(src, order) || rows.end > tokens * k || into.is_some_and(|b| !fits(b)) {
        candle_core::bail!(
            "routing: rows {rows:?} of {tokens} rows of {h} over {k} slots (into a buffer: {})",
            into.is_some()
        );
    }
    let src = src.contiguous()?;
    let func = dev.get_or_load_custom_func(
        &format!("spread_rows_range_vec_{}", suffix(src.dtype())?),
        "moeq_routing",
        crate::ops::kernels::ROUTING,
    )?;
    let inv = order.inv.contiguous()?;
    let out = match into {
        Some(b) => b.narrow(0, 0, len)?,
        None => crate::ops::grouped_gemm::output_for_products(len, src.dtype(), src.device())?,
    };
    let (gs, gi, go) = (
        src.storage_and_layout(),
        inv.storage_and_layout(),
        out.storage_and_layout(),
    );
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ki, lo, hi) = (k as i32, rows.start as u32, rows.end as u32);
    macro_rules! run {
        ($t:ty) => {{
            let s = view::<$t>(&gs)?;
            let i = view::<u32>(&gi)?;
            // The rows of the range: every one is some slot's (RowOrder::new checked), so the
            // kernel writes all `len` elements; the buffer's are the caller's to overwrite.
            let o = view::<$t>(&go)?;
            let mut b = func.builder();
            b.arg(&s);
            b.arg(&i);
            b.arg(&o);
            b.arg(&tokens);
            b.arg(&ki);
            b.arg(&h);
            b.arg(&lo);
            b.arg(&hi);
            // SAFETY: arguments match kernels/routing.cu `spread_rows_range_vec`.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match src.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(half::bf16),
        DType::F16 => run!(half::f16),
        other => candle_core::bail!("routing: {other:?} not supported"),
    }
    drop((gs, gi, go));
    out.reshape((rows.len(), h))
}
