//! `a + b` for two tensors of one shape and dtype: the residual adds of a decoder layer and the
//! sums of their gradients. On CUDA, where neither input records a graph, one kernel over
//! 16-byte packs (`kernels/add.cu`, T's own addition as candle's); candle's element-wise add
//! walked its inputs two bytes at a time at a third of the memory bandwidth. Elsewhere, and for
//! inputs with a graph, candle's add, which is also the kernel's reference (`moeq gpu-check`,
//! the "add" entry).

use candle_core::{Result, Tensor};

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && !super::records_graph(&[a, b]) {
        if let Some(out) = cuda::add(a, b)? {
            return Ok(out);
        }
    }
    a + b
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{Result, Storage, Tensor};

    /// The kernel's sum when it applies (one shape and dtype, both contiguous with offsets on
    /// whole packs, whole packs of elements); `None` leaves it to candle.
    pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let candle_core::Device::Cuda(dev) = a.device() else {
            return Ok(None);
        };
        let n = a.elem_count();
        let per_pack = 16 / a.dtype().size_in_bytes();
        let whole = |t: &Tensor| {
            t.layout()
                .contiguous_offsets()
                .is_some_and(|(start, end)| end - start == n && start % per_pack == 0)
        };
        if a.shape() != b.shape() || a.dtype() != b.dtype() || n % per_pack != 0 {
            return Ok(None);
        }
        if !whole(a) || !whole(b) || n == 0 {
            return Ok(None);
        }
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cuda(ca), Storage::Cuda(cb)) = (&*sa, &*sb) else {
            return Ok(None);
        };
        let suffix = match &ca.slice {
            S::F32(_) => "f32",
            S::BF16(_) => "bf16",
            S::F16(_) => "f16",
            _ => return Ok(None),
        };
        let func = dev.get_or_load_custom_func(
            &format!("add_vec_{suffix}"),
            "moeq_add",
            crate::ops::kernels::ADD,
        )?;
        let packs = n / per_pack;
        let cfg = LaunchConfig::for_num_elems(packs.min(1 << 30) as u32);
        macro_rules! run {
            ($variant:path, $x:expr, $y:expr) => {{
                let x = $x.slice(la.start_offset()..la.start_offset() + n);
                let y = $y.slice(lb.start_offset()..lb.start_offset() + n);
                // SAFETY: the kernel writes every element.
                let out = unsafe { dev.alloc(n)? };
                let mut bld = func.builder();
                bld.arg(&x);
                bld.arg(&y);
                bld.arg(&out);
                bld.arg(&packs);
                // SAFETY: arguments match kernels/add.cu; both views hold n elements starting
                // on a 16-byte boundary (whole packs from an aligned allocation).
                unsafe { bld.launch(cfg) }.w()?;
                $variant(out)
            }};
        }
        let slice = match (&ca.slice, &cb.slice) {
            (S::F32(x), S::F32(y)) => run!(S::F32, x, y),
            (S::BF16(x), S::BF16(y)) => run!(S::BF16, x, y),
            (S::F16(x), S::F16(y)) => run!(S::F16, x, y),
            _ => return Ok(None),
        };
        Ok(Some(crate::ops::cuda_tensor(slice, dev, a.shape().clone())))
    }
}
