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
pub fn quantize(x: &Tensor, settings: &QuantSettings) -> Result<(Tensor, Tensor)> {
    settings
        .validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let bs = settings.blocksize;
    let nblocks = n.div_ceil(bs);
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("quant::cuda::quantize: tensor is not on a CUDA device")
    };
    let dev = cs.device().clone();
    let off = layout.start_offset();
    let packed = dev.alloc_zeros::<u8>(n.div_ceil(2))?;
    let absmax = dev.alloc_zeros::<f32>(nblocks)?;
    // One group of min(32, bs/2) lanes per block.
    let lanes_per_block = (bs / 2).min(32);
    let cfg = grid(nblocks * lanes_per_block, 256);
    let (n64, bs32) = (n as u64, bs as i32);
    macro_rules! launch {
        ($slice:expr, $suffix:literal) => {{
            let name = format!("quantize_{}_{}", kind_name(settings.kind), $suffix);
            let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
            let src = $slice.slice(off..off + n);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&packed);
            b.arg(&absmax);
            b.arg(&n64);
            b.arg(&bs32);
            // SAFETY: argument types and order match `QUANT(...)` in kernels/nf4.cu.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match &cs.slice {
        S::F32(s) => launch!(s, "f32"),
        S::BF16(s) => launch!(s, "bf16"),
        S::F16(s) => launch!(s, "f16"),
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
pub fn dequantize(
    packed: &Tensor,
    absmax: &Tensor,
    shape: &[usize],
    kind: QuantKind,
    blocksize: usize,
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (pk, pl) = packed.storage_and_layout();
    let (am, al) = absmax.storage_and_layout();
    let (Storage::Cuda(pk), Storage::Cuda(am)) = (&*pk, &*am) else {
        bail!("dequantize: tensors must be on a CUDA device")
    };
    let (S::U8(codes), S::F32(scales)) = (&pk.slice, &am.slice) else {
        bail!("dequantize: packed must be u8 and absmax f32")
    };
    let dev = pk.device().clone();
    let codes = codes.slice(pl.start_offset()..pl.start_offset() + n.div_ceil(2));
    let scales = scales.slice(al.start_offset()..al.start_offset() + n.div_ceil(blocksize));
    let cfg = grid(n.div_ceil(2), 256);
    let (n64, bs32) = (n as u64, blocksize as i32);
    macro_rules! launch {
        ($t:ty, $suffix:literal) => {{
            let out = dev.alloc_zeros::<$t>(n)?;
            let name = format!("dequantize_{}_{}", kind_name(kind), $suffix);
            let f = dev.get_or_load_custom_func(&name, MODULE, crate::ops::kernels::NF4)?;
            let mut b = f.builder();
            b.arg(&codes);
            b.arg(&scales);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&bs32);
            // SAFETY: argument types and order match `DEQUANT(...)` in kernels/nf4.cu.
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

/// Nested statistics → f32 absmax on the device.
pub fn dequantize_absmax(codes: &Tensor, nested_absmax: &Tensor, offset: f32) -> Result<Tensor> {
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
    let n64 = n as u64;
    let mut b = f.builder();
    b.arg(&q);
    b.arg(m);
    b.arg(&na);
    b.arg(&offset);
    b.arg(&out);
    b.arg(&n64);
    // SAFETY: matches `dequantize_absmax` in kernels/nf4.cu.
    unsafe { b.launch(grid(n, 256)) }.w()?;
    Ok(wrap(out, &dev, &[n]))
}
