//! Frozen weights drawn where they are quantized instead of read from disk
//! (`synth://<arch>/<preset>?init=device`): full-size runs need no checkpoint on disk (the
//! 48-layer Qwen3-30B-A3B would be 61 GB of bf16). Values follow the synth writer's plan (same
//! stream keys, standard deviations and norm offsets) but come from a counter-based generator
//! (`kernels/random.cu`, [`normal`] on the CPU): value `i` of a stream depends only on the
//! stream key and `i`, so a rank draws exactly the experts it holds, the values do not depend on
//! the world size (nor, then, the NF4 bytes), and CUDA and the CPU draw the same numbers (up to
//! the last bit of `ln`/`cos`, before rounding to bf16). They are not the disk checkpoint's
//! values for the same seed.

use super::ModelFilesError;
use crate::arch::{ArchSpec, Component, ParamInfo};
use crate::synth::writer::{chunks_of, stream_seed, Chunk};
use candle_core::{Device, Tensor};
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratedWeights {
    pub seed: u64,
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Value `i` of the standard-normal stream `key` (the CPU twin of `kernels/random.cu`).
pub fn normal(key: u64, i: u64) -> f32 {
    let h = mix64(key.wrapping_add((i + 1).wrapping_mul(0x9e3779b97f4a7c15)));
    let u1 = ((h >> 32) as u32 as f32 + 0.5) / 4_294_967_296.0;
    let u2 = (h as u32 as f32 + 0.5) / 4_294_967_296.0;
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The generator key of a chunk's stream.
fn stream_key(seed: u64, chunk: &Chunk) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&stream_seed(seed, &chunk.key)[..8]);
    u64::from_le_bytes(first)
}

/// `n` values `offset + std·z` of stream `key` in bf16 on `device`.
pub fn draw(
    key: u64,
    n: usize,
    std: f32,
    offset: f32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    match device {
        Device::Cpu => {
            let v: Vec<half::bf16> = (0..n as u64)
                .map(|i| half::bf16::from_f32(offset + std * normal(key, i)))
                .collect();
            Tensor::from_vec(v, n, device)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
            use candle_core::cuda_backend::WrapErr;
            let func = dev.get_or_load_custom_func(
                "normal_bf16",
                "moeq_random",
                crate::ops::kernels::RANDOM,
            )?;
            // SAFETY: the kernel writes all n values.
            let out = unsafe { dev.alloc::<half::bf16>(n)? };
            let n64 = n as u64;
            let mut args = func.builder();
            args.arg(&out);
            args.arg(&n64);
            args.arg(&key);
            args.arg(&std);
            args.arg(&offset);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match kernels/random.cu.
            unsafe { args.launch(cfg) }.w()?;
            let storage = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
            Ok(Tensor::from_storage(
                candle_core::Storage::Cuda(storage),
                n,
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }
        #[allow(unreachable_patterns)]
        d => candle_core::bail!("generated weights: device {d:?} not supported"),
    }
}

impl GeneratedWeights {
    /// Parameter `p` (for an expert parameter: experts `experts`, as `[n, rows, cols]`) in bf16
    /// on `device`.
    pub fn param(
        &self,
        spec: &ArchSpec,
        p: &ParamInfo,
        experts: Range<usize>,
        device: &Device,
    ) -> Result<Tensor, ModelFilesError> {
        let mut shape = p.shape.clone();
        if p.component == Component::Experts {
            shape[0] = experts.len();
        }
        let parts = chunks_of(spec, p, experts)
            .iter()
            .map(|c| {
                let offset = if c.norm { 1.0 } else { 0.0 };
                draw(stream_key(self.seed, c), c.numel, c.std, offset, device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?.reshape(shape)?)
    }
}
