//! Custom ops with a CPU reference and a CUDA implementation (kernels in `kernels/`), each
//! with a backward pass, tested against each other.

pub mod adamw;
pub mod add;
pub mod attention;
pub mod attention_block;
pub mod attn_sinks;
#[cfg(feature = "cuda")]
pub mod attn_sm90;
pub mod attn_softmax;
pub mod conv_silu_op;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cudnn_attn;
pub mod delta_carry_op;
pub mod delta_chunk_op;
pub mod delta_prep_op;
pub mod delta_rule;
pub mod delta_rule_op;
pub mod embedding;
pub mod expert_chunks;
pub mod expert_weights;
pub mod experts;
#[cfg(feature = "cuda")]
pub mod flash_attn;
pub mod gated_norm_op;
pub mod grouped_gemm;
pub mod grouped_lora;
mod held_experts;
pub mod input_weights;
pub mod kernels;
pub mod linear_attn_parts;
pub mod lora_in_k;
pub mod lora_joint;
pub mod lora_linear;
pub mod nf4_linear;
pub mod norm;
pub mod norm_rope;
pub mod offload;
pub mod rope;
pub mod rope_part;
pub mod routed_experts;
pub mod router;
pub mod routing;
pub mod swiglu;
pub mod thin_gemm;

pub use swiglu::swiglu;

/// The contiguous part of a CPU storage slice that `l` describes; custom ops take contiguous
/// inputs only.
pub fn contiguous_slice<'a, T>(
    s: &'a [T],
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// `cpu_fwd` and `cuda_fwd` of a custom op whose forward is written with tensors: the input
/// storages become tensors (no graph), `self.$method(inputs...) -> Result<Tensor>` runs on their
/// device (dispatching itself where the CPU and CUDA paths differ), and its result becomes the
/// op's storage. Arity 1, 2 or 3, as the op's `CustomOpN`.
macro_rules! tensor_forward {
    (1, $name:literal, $method:ident) => {
        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let x = $crate::ops::tensor_of(candle_core::Storage::Cpu(s.clone()), l, $name)?;
            $crate::ops::cpu_result(self.$method(&x)?, $name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            let x = $crate::ops::tensor_of(candle_core::Storage::Cuda(s.try_clone(l)?), l, $name)?;
            $crate::ops::cuda_result(self.$method(&x)?, $name)
        }
    };
    (2, $name:literal, $method:ident) => {
        fn cpu_fwd(
            &self,
            s1: &candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let t = |s: &candle_core::CpuStorage, l| {
                $crate::ops::tensor_of(candle_core::Storage::Cpu(s.clone()), l, $name)
            };
            $crate::ops::cpu_result(self.$method(&t(s1, l1)?, &t(s2, l2)?)?, $name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            let t = |s: &candle_core::CudaStorage, l| {
                $crate::ops::tensor_of(candle_core::Storage::Cuda(s.try_clone(l)?), l, $name)
            };
            $crate::ops::cuda_result(self.$method(&t(s1, l1)?, &t(s2, l2)?)?, $name)
        }
    };
    (3, $name:literal, $method:ident) => {
        fn cpu_fwd(
            &self,
            s1: &candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CpuStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let t = |s: &candle_core::CpuStorage, l| {
                $crate::ops::tensor_of(candle_core::Storage::Cpu(s.clone()), l, $name)
            };
            let y = self.$method(&t(s1, l1)?, &t(s2, l2)?, &t(s3, l3)?)?;
            $crate::ops::cpu_result(y, $name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CudaStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            let t = |s: &candle_core::CudaStorage, l| {
                $crate::ops::tensor_of(candle_core::Storage::Cuda(s.try_clone(l)?), l, $name)
            };
            let y = self.$method(&t(s1, l1)?, &t(s2, l2)?, &t(s3, l3)?)?;
            $crate::ops::cuda_result(y, $name)
        }
    };
}
pub(crate) use tensor_forward;

/// A custom op's input storage as a tensor (no graph), so an op can be written with candle's
/// own kernels on whichever device it runs.
pub(crate) fn tensor_of(
    storage: candle_core::Storage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<candle_core::Tensor> {
    match layout.contiguous_offsets() {
        Some((0, _)) => Ok(candle_core::Tensor::from_storage(
            storage,
            layout.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )),
        _ => candle_core::bail!("{op}: input must be contiguous and start at offset 0"),
    }
}

/// A tensor whose storage starts at offset 0, contiguous (custom ops read storages from their
/// start); copies only when needed and keeps the autograd link.
pub(crate) fn at_offset_zero(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if t.layout().contiguous_offsets() == Some((0, t.elem_count())) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// Whether a tensor-written op (`tensor_forward!`) must go through candle's custom-op path:
/// only when one of its inputs carries a gradient. That path copies each input and the output
/// once more on CUDA (`CudaStorage::try_clone`), so otherwise (the forward pass before the
/// recompute, and ops run inside a backward) the op's forward runs on the tensors themselves
/// and its result goes through [`direct`].
pub(crate) fn records_graph(inputs: &[&candle_core::Tensor]) -> bool {
    inputs.iter().any(|t| t.track_op())
}

/// A tensor-written op's result computed outside the custom-op path, in the form that path
/// returns (contiguous from offset 0).
pub(crate) fn direct(y: candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    owned(y)
}

/// `y` as a tensor that owns exactly its elements, row-major from offset 0.
fn owned(y: candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let exact = y.layout().contiguous_offsets() == Some((0, y.elem_count()));
    if exact {
        Ok(y)
    } else {
        y.force_contiguous()
    }
}

/// A tensor's values as f32 on the host: what the ops' CPU twins compute on.
pub(crate) fn f32s(x: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    x.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()
}

/// Rounding of an f32 to `dtype` and back: the CPU twins' storage roundings.
pub(crate) fn rounding(dtype: candle_core::DType) -> impl Fn(f32) -> f32 {
    move |v| match dtype {
        candle_core::DType::BF16 => half::bf16::from_f32(v).to_f32(),
        candle_core::DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The CPU storage of a result computed inside a custom op.
pub(crate) fn cpu_result(
    y: candle_core::Tensor,
    op: &str,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let y = owned(y)?;
    let (storage, _) = y.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(out) => Ok((out.clone(), y.shape().clone())),
        _ => candle_core::bail!("{op}: CPU result is not on the CPU"),
    }
}

/// A graph-free tensor of `shape` over a freshly written CUDA buffer (a kernel's output).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_tensor(
    slice: candle_core::cuda_backend::CudaStorageSlice,
    device: &candle_core::CudaDevice,
    shape: candle_core::Shape,
) -> candle_core::Tensor {
    candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(candle_core::CudaStorage {
            slice,
            device: device.clone(),
        }),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// The CUDA storage of a result computed inside a custom op.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_result(
    y: candle_core::Tensor,
    op: &str,
) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;
    let y = owned(y)?;
    let (storage, layout) = y.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(out) => Ok((out.try_clone(layout)?, y.shape().clone())),
        _ => candle_core::bail!("{op}: CUDA result is not on the GPU"),
    }
}
