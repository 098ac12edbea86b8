//! CUDA blockwise 4-bit quantization (`kernels/nf4.cu`), the GPU twin of `blockwise.rs`:
//! identical bytes (checked by `moeq gpu-check` against the CPU reference).
//! x: [..] f32/bf16/f16 contiguous on a CUDA device → packed u8 [ceil(n/2)], absmax f32 [nblocks].

use super::{QuantKind, QuantSettings};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Storage, Tensor};

const MODULE: &str = "moeq_nf4";

fn wrap<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

fn grid(work_items: usize, threads: u32) -> LaunchConfig {
    let blocks = work_items.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn kind_name(kind: QuantKind) -> &'static str {
    kind.as_str()
}

/// Quantizes a contiguous CUDA tensor: (packed codes u8 [ceil(n/2)], absmax f32 [nblocks]).
pub fn quantize_on_gpu(x: &Tensor, settings: &QuantSettings) -> Result<(Tensor, Tensor)> {
    settings
        .validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let bs = settings.blocksize;
    let nblocks = n.div_ceil(bs);
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("quant::cuda::quantize_on_gpu: tensor is not on a CUDA device")
    };
    let dev = cs.device().clone();
    let off = layout.start_offset();
    // SAFETY: the kernels below write every byte of both (full blocks + tail).
    let mut packed = unsafe { dev.alloc::<u8>(n.div_ceil(2))? };
    let mut absmax = unsafe { dev.alloc::<f32>(nblocks)? };
    let kind = kind_name(settings.kind);
    let bs32 = bs as i32;
    macro_rules! launch {
        ($slice:expr, $suffix:literal, $elem:expr) => {{
            // Full blocks through the vectorised kernel when the input is 16-byte aligned
            // (device allocations are; a view may not be), the rest through the scalar one.
            let aligned = (off * $elem) % 16 == 0;
            let full = if aligned { n / bs } else { 0 };
            if full > 0 {
                let name = format!("quantize_vec_{kind}_{}", $suffix);
                let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                let src = $slice.slice(off..off + full * bs);
                let nb = full as u64;
                let mut b = f.builder();
                b.arg(&src);
                b.arg(&mut packed);
                b.arg(&mut absmax);
                b.arg(&nb);
                b.arg(&bs32);
                let lanes = (bs / (16 / $elem)).min(32);
                // Each CTA first builds its code table in shared memory: a bounded, grid-stride
                // grid (≈ 8 resident CTAs per SM on an H100) amortises that over many blocks.
                let mut cfg = grid(full * lanes, 256);
                cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
                // SAFETY: argument types and order match `QUANT_VEC(...)` in kernels/nf4.cu.
                unsafe { b.launch(cfg) }.w()?;
            }
            let start = full * bs;
            if start < n {
                let name = format!("quantize_{kind}_{}", $suffix);
                let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                let src = $slice.slice(off + start..off + n);
                let mut pk = packed.slice_mut(start / 2..);
                let mut am = absmax.slice_mut(full..);
                let rest = (n - start) as u64;
                let mut b = f.builder();
                b.arg(&src);
                b.arg(&mut pk);
                b.arg(&mut am);
                b.arg(&rest);
                b.arg(&bs32);
                // SAFETY: argument types and order match `QUANT(...)` in kernels/nf4.cu.
                unsafe { b.launch(grid((nblocks - full) * (bs / 2).min(32), 256)) }.w()?;
            }
        }};
    }
    match &cs.slice {
        S::F32(s) => launch!(s, "f32", 4),
        S::BF16(s) => launch!(s, "bf16", 2),
        S::F16(s) => launch!(s, "f16", 2),
        _ => bail!(
            "quantize: input must be f32, bf16 or f16, got {:?}",
            x.dtype()
        ),
    }
    drop(storage);
    Ok((
        wrap(packed, &dev, &[n.div_ceil(2)]),
        wrap(absmax, &dev, &[nblocks]),
    ))
}

/// Dequantizes packed codes with f32 block absmax into a new tensor of `shape` and `dtype`.
pub fn dequantize_on_gpu(
    packed: &Tensor,
    absmax: &Tensor,
    shape: &[usize],
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
) -> Result<Tensor> {
    let (pk, pl) = packed.storage_and_layout();
    let (am, al) = absmax.storage_and_layout();
    let (Storage::Cuda(pk), Storage::Cuda(am)) = (&*pk, &*am) else {
        bail!("dequantize: tensors must be on a CUDA device")
    };
    let out = dequantize_storage(pk, pl, am, al, shape, kind, blocksize, dtype)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// `dequantize` on storages (the CustomOp's `cuda_fwd`).
#[allow(clippy::too_many_arguments)]
pub fn dequantize_storage(
    pk: &CudaStorage,
    pl: &candle_core::Layout,
    am: &CudaStorage,
    al: &candle_core::Layout,
    shape: &[usize],
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
) -> Result<CudaStorage> {
    let n: usize = shape.iter().product();
    let (S::U8(codes), S::F32(scales)) = (&pk.slice, &am.slice) else {
        bail!("dequantize: packed must be u8 and absmax f32")
    };
    let dev = pk.device().clone();
    let codes = codes.slice(pl.start_offset()..pl.start_offset() + n.div_ceil(2));
    let scales = scales.slice(al.start_offset()..al.start_offset() + n.div_ceil(blocksize));
    let bs32 = blocksize as i32;
    let kind = kind_name(kind);
    // 8 outputs per thread from 4 packed bytes when the codes are 4-byte aligned; a scalar
    // pass redoes the block holding the tail (identical values, simpler indexing).
    let n_vec = if pl.start_offset() % 4 == 0 {
        n / 8 * 8
    } else {
        0
    };
    let tail_start = n_vec / blocksize * blocksize;
    macro_rules! launch {
        ($t:ty, $suffix:literal) => {{
            // SAFETY: every element is written by the kernels below.
            let mut out = unsafe { dev.alloc::<$t>(n)? };
            if n_vec > 0 {
                let name = format!("dequantize_vec_{kind}_{}", $suffix);
                let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                let nv = n_vec as u64;
                let mut b = f.builder();
                b.arg(&codes);
                b.arg(&scales);
                b.arg(&mut out);
                b.arg(&nv);
                b.arg(&bs32);
                // SAFETY: argument types and order match `DEQUANT_VEC(...)` in kernels/nf4.cu.
                unsafe { b.launch(grid(n_vec / 8, 256)) }.w()?;
            }
            if n_vec < n {
                let name = format!("dequantize_{kind}_{}", $suffix);
                let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                let c = codes.slice(tail_start / 2..);
                let sc = scales.slice(tail_start / blocksize..);
                let mut o = out.slice_mut(tail_start..);
                let rest = (n - tail_start) as u64;
                let mut b = f.builder();
                b.arg(&c);
                b.arg(&sc);
                b.arg(&mut o);
                b.arg(&rest);
                b.arg(&bs32);
                // SAFETY: argument types and order match `DEQUANT(...)` in kernels/nf4.cu.
                unsafe { b.launch(grid((n - tail_start).div_ceil(2), 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "f32"),
        DType::BF16 => launch!(half::bf16, "bf16"),
        DType::F16 => launch!(half::f16, "f16"),
        other => bail!("dequantize: output dtype must be f32, bf16 or f16, got {other:?}"),
    })
}

/// Blocks of `dequantize_vec_nested` (each loops over words: its map copy is paid once).
const NESTED_BLOCKS: u32 = 2048;

/// Packed codes whose block scales are nested statistics (the 8-bit `codes` of blocks
/// `start..`, the parameter's whole `nested_absmax`, `offset`) dequantized into a new tensor of
/// `shape` and `dtype`: one kernel that expands each block's scale as it goes
/// (`dequantize_vec_nested`; the same values as [`dequantize_absmax_on_gpu`] then
/// [`dequantize_on_gpu`]), where the codes are 4-byte aligned and the element count a multiple
/// of 8; those two steps otherwise.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_nested_on_gpu(
    packed: &Tensor,
    codes: &Tensor,
    nested_absmax: &Tensor,
    offset: f32,
    start: usize,
    shape: &[usize],
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (packed, codes) = (packed.contiguous()?, codes.contiguous()?);
    if n % 8 != 0 || n == 0 || packed.layout().start_offset() % 4 != 0 {
        let scales = dequantize_absmax_on_gpu(&codes, nested_absmax, offset, start)?;
        return dequantize_on_gpu(&packed, &scales, shape, kind, blocksize, dtype);
    }
    let dev = match packed.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("dequantize: tensors must be on a CUDA device"),
    };
    let map = super::codebook::dynamic_map();
    let (pk, pl) = packed.storage_and_layout();
    let (q, ql) = codes.storage_and_layout();
    let (na, nl) = nested_absmax.storage_and_layout();
    let (Storage::Cuda(pk), Storage::Cuda(q), Storage::Cuda(na)) = (&*pk, &*q, &*na) else {
        bail!("dequantize: tensors must be on a CUDA device")
    };
    let (S::U8(pk), S::U8(q), S::F32(na)) = (&pk.slice, &q.slice, &na.slice) else {
        bail!("dequantize: packed and codes must be u8, the nested absmax f32")
    };
    let pk = pk.slice(pl.start_offset()..pl.start_offset() + n / 2);
    let q = q.slice(ql.start_offset()..ql.start_offset() + n.div_ceil(blocksize));
    let na = na.slice(nl.start_offset()..);
    let (n64, start64, bs32) = (n as u64, start as u64, blocksize as i32);
    macro_rules! launch {
        ($t:ty, $suffix:literal) => {{
            // SAFETY: the kernel writes every element (n is a multiple of 8).
            let out = unsafe { dev.alloc::<$t>(n)? };
            let name = format!("dequantize_vec_nested_{}_{}", kind_name(kind), $suffix);
            let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
            let mut b = f.builder();
            b.arg(&pk);
            b.arg(&q);
            b.arg(&map);
            b.arg(&na);
            b.arg(&offset);
            b.arg(&start64);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&bs32);
            // At most NESTED_BLOCKS blocks (grid-stride): each block first copies the 8-bit map
            // from the parameter bank, whose reads at 256 addresses serialise. With the plain
            // kernel's grid (a word a thread, one pass per block) it measured 1.9× the plain
            // kernel's time (2026-12-05), that copy the likely cause.
            let mut cfg = grid(n / 8, 256);
            cfg.grid_dim.0 = cfg.grid_dim.0.min(NESTED_BLOCKS);
            // SAFETY: argument types and order match `DEQUANT_VEC_NESTED(...)` in kernels/nf4.cu.
            unsafe { b.launch(cfg) }.w()?;
            wrap(out, &dev, shape)
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "f32"),
        DType::BF16 => launch!(half::bf16, "bf16"),
        DType::F16 => launch!(half::f16, "f16"),
        other => bail!("dequantize: output dtype must be f32, bf16 or f16, got {other:?}"),
    })
}

/// Nested statistics → f32 absmax on the device. `codes[0]` is block `start` of the
/// parameter; `nested_absmax` is the parameter's whole nested array.
pub fn dequantize_absmax_on_gpu(
    codes: &Tensor,
    nested_absmax: &Tensor,
    offset: f32,
    start: usize,
) -> Result<Tensor> {
    let dev = match codes.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("dequantize_absmax: tensors must be on a CUDA device"),
    };
    let n = codes.elem_count();
    let map = Tensor::new(&super::codebook::dynamic_map(), codes.device())?;
    let (q, ql) = codes.storage_and_layout();
    let (na, nl) = nested_absmax.storage_and_layout();
    let (m, _) = map.storage_and_layout();
    let (Storage::Cuda(q), Storage::Cuda(na), Storage::Cuda(m)) = (&*q, &*na, &*m) else {
        bail!("dequantize_absmax: not CUDA")
    };
    let (S::U8(q), S::F32(na), S::F32(m)) = (&q.slice, &na.slice, &m.slice) else {
        bail!("dequantize_absmax: dtypes")
    };
    let q = q.slice(ql.start_offset()..ql.start_offset() + n);
    let na = na.slice(nl.start_offset()..);
    let out = dev.alloc_zeros::<f32>(n)?;
    let f = dev.get_or_load_custom_func("dequantize_absmax", MODULE, crate::ops::kernels::NF4)?;
    let (n64, start64) = (n as u64, start as u64);
    let mut b = f.builder();
    b.arg(&q);
    b.arg(m);
    b.arg(&na);
    b.arg(&offset);
    b.arg(&out);
    b.arg(&n64);
    b.arg(&start64);
    // SAFETY: matches `dequantize_absmax` in kernels/nf4.cu.
    unsafe { b.launch(grid(n, 256)) }.w()?;
    Ok(wrap(out, &dev, &[n]))
}

/// The block scales of [`dequantize_rows_into`]: f32 absmax, or nested statistics (the 8-bit
/// `codes` of blocks `start..`, the parameter's whole `nested` array, `offset`).
pub enum RowScales<'a> {
    Plain(&'a Tensor),
    Nested {
        codes: &'a Tensor,
        nested: &'a Tensor,
        offset: f32,
        start: usize,
    },
}

/// Whether [`dequantize_rows_into`] takes `packed` codes of `n` values in rows of `row_len`:
/// the vectorised kernels only (4-byte aligned codes, whole words in every row).
pub fn rows_into_applies(packed: &Tensor, n: usize, row_len: usize) -> bool {
    n > 0 && row_len % 8 == 0 && n % row_len == 0 && packed.layout().start_offset() % 4 == 0
}

/// `packed` codes (`n` values) dequantized into `out` (contiguous, f32, bf16 or f16, on the
/// codes' device) as rows of `row_len` values laid `ld` apart from `out`'s first element — a
/// weight beside columns of its own (the expert adapters' factors, `ops::lora_in_k`); the
/// other columns are not written. The same values as [`dequantize_on_gpu`] /
/// [`dequantize_nested_on_gpu`] (the same kernels, another address per word).
#[allow(clippy::too_many_arguments)]
pub fn dequantize_rows_into(
    packed: &Tensor,
    scales: RowScales,
    out: &Tensor,
    n: usize,
    (row_len, ld): (usize, usize),
    kind: QuantKind,
    blocksize: usize,
) -> Result<()> {
    if !rows_into_applies(packed, n, row_len) || ld < row_len || ld % 8 != 0 {
        bail!("dequantize into rows: {n} values in rows of {row_len} laid {ld} apart");
    }
    if !out.is_contiguous() || out.elem_count() < out.layout().start_offset() + n / row_len * ld {
        bail!(
            "dequantize into rows: the output {:?} does not hold the rows",
            out.dims()
        );
    }
    let candle_core::Device::Cuda(dev) = packed.device() else {
        bail!("dequantize: tensors must be on a CUDA device")
    };
    let packed = packed.contiguous()?;
    let (pk, pl) = packed.storage_and_layout();
    let Storage::Cuda(pk) = &*pk else {
        bail!("dequantize: tensors must be on a CUDA device")
    };
    let S::U8(pk) = &pk.slice else {
        bail!("dequantize: packed must be u8")
    };
    let pk = pk.slice(pl.start_offset()..pl.start_offset() + n / 2);
    let (n64, len64, ld64, bs32) = (n as u64, row_len as u64, ld as u64, blocksize as i32);
    let (so, ol) = out.storage_and_layout();
    let Storage::Cuda(so) = &*so else {
        bail!("dequantize: the output must be on a CUDA device")
    };
    let map = super::codebook::dynamic_map();
    let blocks = n.div_ceil(blocksize);
    macro_rules! launch {
        ($t:ty, $suffix:literal) => {{
            let o = so.as_cuda_slice::<$t>()?.slice(ol.start_offset()..);
            match &scales {
                RowScales::Plain(absmax) => {
                    let (am, al) = absmax.storage_and_layout();
                    let Storage::Cuda(am) = &*am else {
                        bail!("dequantize: tensors must be on a CUDA device")
                    };
                    let S::F32(am) = &am.slice else {
                        bail!("dequantize: absmax must be f32")
                    };
                    let am = am.slice(al.start_offset()..al.start_offset() + blocks);
                    let name = format!("dequantize_vec_{}_{}_rows", kind_name(kind), $suffix);
                    let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                    let mut b = f.builder();
                    b.arg(&pk);
                    b.arg(&am);
                    b.arg(&o);
                    b.arg(&n64);
                    b.arg(&bs32);
                    b.arg(&len64);
                    b.arg(&ld64);
                    // SAFETY: argument types and order match `DEQUANT_VEC(...)`'s `_rows` kernel
                    // in kernels/nf4.cu; the rows fit `out` (checked above).
                    unsafe { b.launch(grid(n / 8, 256)) }.w()?;
                }
                RowScales::Nested {
                    codes,
                    nested,
                    offset,
                    start,
                } => {
                    let codes = codes.contiguous()?;
                    let (q, ql) = codes.storage_and_layout();
                    let (na, nl) = nested.storage_and_layout();
                    let (Storage::Cuda(q), Storage::Cuda(na)) = (&*q, &*na) else {
                        bail!("dequantize: tensors must be on a CUDA device")
                    };
                    let (S::U8(q), S::F32(na)) = (&q.slice, &na.slice) else {
                        bail!("dequantize: codes must be u8, the nested absmax f32")
                    };
                    let q = q.slice(ql.start_offset()..ql.start_offset() + blocks);
                    let na = na.slice(nl.start_offset()..);
                    let start64 = *start as u64;
                    let name =
                        format!("dequantize_vec_nested_{}_{}_rows", kind_name(kind), $suffix);
                    let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
                    let mut b = f.builder();
                    b.arg(&pk);
                    b.arg(&q);
                    b.arg(&map);
                    b.arg(&na);
                    b.arg(offset);
                    b.arg(&start64);
                    b.arg(&o);
                    b.arg(&n64);
                    b.arg(&bs32);
                    b.arg(&len64);
                    b.arg(&ld64);
                    let mut cfg = grid(n / 8, 256);
                    cfg.grid_dim.0 = cfg.grid_dim.0.min(NESTED_BLOCKS);
                    // SAFETY: argument types and order match `DEQUANT_VEC_NESTED(...)`'s `_rows`
                    // kernel in kernels/nf4.cu; the rows fit `out` (checked above).
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
        }};
    }
    match out.dtype() {
        DType::F32 => launch!(f32, "f32"),
        DType::BF16 => launch!(half::bf16, "bf16"),
        DType::F16 => launch!(half::f16, "f16"),
        other => bail!("dequantize: output dtype must be f32, bf16 or f16, got {other:?}"),
    }
    Ok(())
}
