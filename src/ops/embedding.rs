//! Embedding rows: token ids → x [N, H] on the model's device.
//!
//! A table held on the model's device (tied embeddings) is gathered there. An untied input
//! embedding is only ever gathered from, so it stays in host memory (vocab × H: 622 MB of bf16
//! for Qwen3-30B-A3B). On the CPU its rows are copied out on up to 8 threads; on CUDA the table
//! lives in page-locked host memory and the device's row-gather kernel (`kernels/routing.cu`,
//! `gather_sum` with k = 1: exact) reads the rows straight over PCIe — no host gather, no
//! upload, and the host does not wait for the device. If page-locked memory cannot be had, the
//! CUDA path falls back to the host gather + upload (with a warning).

use candle_core::{DType, Device, Result, Tensor};

/// A micro-batch's token ids on the host and, the same values, on the model's device (built
/// together, so a gather that checks the host copy reads only rows it checked).
pub struct TokenIds {
    host: Vec<u32>,
    /// [N] u32
    device: Tensor,
}

impl TokenIds {
    pub fn new(ids: &[u32], device: &Device) -> Result<TokenIds> {
        Ok(TokenIds {
            host: ids.to_vec(),
            device: Tensor::new(ids, device)?,
        })
    }

    pub fn host(&self) -> &[u32] {
        &self.host
    }

    /// [N] u32 on the model's device.
    pub fn on_device(&self) -> &Tensor {
        &self.device
    }
}

pub enum Embedding {
    /// [V, H] on the model's device.
    Device(Tensor),
    /// [V, H] in host memory; rows gathered on the host, then uploaded.
    Host(Tensor),
    /// [V, H] in page-locked host memory, gathered by the device.
    #[cfg(feature = "cuda")]
    Pinned(cuda::PinnedTable),
}

impl Embedding {
    /// `table` [V, H] wherever it is: on `device` it stays there; on the host it is
    /// page-locked for a CUDA `device`.
    pub fn new(table: Tensor, device: &Device) -> Result<Embedding> {
        if table.device().same_device(device) {
            return Ok(Embedding::Device(table));
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            match cuda::PinnedTable::new(&table, dev) {
                Ok(p) => return Ok(Embedding::Pinned(p)),
                Err(e) => tracing::warn!(
                    "embedding: no page-locked host memory ({e}); rows are gathered on the host and uploaded"
                ),
            }
        }
        Ok(Embedding::Host(table.to_device(&Device::Cpu)?))
    }

    /// Rows `ids` → [N, H] on the ids' device.
    pub fn rows(&self, ids: &TokenIds) -> Result<Tensor> {
        match self {
            Embedding::Device(t) => t.index_select(ids.on_device(), 0),
            Embedding::Host(t) => {
                gather_host_rows(t, ids.host())?.to_device(ids.on_device().device())
            }
            #[cfg(feature = "cuda")]
            Embedding::Pinned(p) => p.rows(ids),
        }
    }
}

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => candle_core::bail!("token id {id} is outside the embedding ({vocab} rows)"),
        None => Ok(()),
    }
}

/// Rows `ids` of a host tensor `[V, H]` (row copies; candle's CPU `index_select` goes element
/// by element, 4× slower for a micro-batch of 8k tokens), split over up to 8 threads when the
/// rows are many (a micro-batch of 8k tokens is 32 MB of bf16; one thread took ~15 ms).
pub fn gather_host_rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    fn rows<T: Copy + Send + Sync>(table: &[T], h: usize, ids: &[u32]) -> Result<Vec<T>> {
        check_ids(ids, table.len() / h.max(1))?;
        let n = ids.len() * h;
        let threads = if n < (1 << 20) {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |p| p.get().min(8))
        };
        let per = ids.len().div_ceil(threads).max(1);
        let mut out = Vec::with_capacity(n);
        std::thread::scope(|s| {
            let spare = &mut out.spare_capacity_mut()[..n];
            for (ids, dst) in ids.chunks(per).zip(spare.chunks_mut(per * h)) {
                s.spawn(move || {
                    for (&id, dst) in ids.iter().zip(dst.chunks_mut(h)) {
                        let row = &table[id as usize * h..(id as usize + 1) * h];
                        for (d, &v) in dst.iter_mut().zip(row) {
                            d.write(v);
                        }
                    }
                });
            }
        });
        // SAFETY: every id is in range (checked above), so the chunks above wrote all
        // `ids.len()` rows of `h` elements.
        unsafe { out.set_len(n) };
        Ok(out)
    }
    let (_, h) = table.dims2()?;
    let table = table.contiguous()?;
    let shape = (ids.len(), h);
    let (storage, layout) = table.storage_and_layout();
    let from = layout.start_offset();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
            Tensor::from_vec(rows(&v[from..], h, ids)?, shape, &Device::Cpu)
        }
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            Tensor::from_vec(rows(&v[from..], h, ids)?, shape, &Device::Cpu)
        }
        _ => {
            let idx = Tensor::new(ids, &Device::Cpu)?;
            table.index_select(&idx, 0)
        }
    }
}

/// The dtypes the device gather reads (`gather_sum_*` kernel suffixes).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{check_ids, suffix, TokenIds};
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::{
        sys, LaunchConfig, PinnedHostSlice, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, DType, Result, Storage, Tensor};

    /// A [V, H] table in page-locked host memory. With unified addressing (every 64-bit CUDA
    /// platform) page-locked host memory is readable by kernels at its host address.
    pub struct PinnedTable {
        bytes: PinnedHostSlice<u8>,
        /// The device whose stream the gathers run on (drained before the memory is freed).
        dev: CudaDevice,
        /// `bytes`' address, as kernels read it.
        addr: u64,
        vocab: usize,
        h: usize,
        dtype: DType,
    }

    impl PinnedTable {
        pub fn new(table: &Tensor, dev: &CudaDevice) -> Result<PinnedTable> {
            let (vocab, h) = table.dims2()?;
            let dtype = table.dtype();
            if suffix(dtype).is_none() {
                candle_core::bail!("embedding: no device gather for {dtype:?}");
            }
            let host = table.to_device(&candle_core::Device::Cpu)?.contiguous()?;
            let n = vocab * h * dtype.size_in_bytes();
            // SAFETY: every byte is written below before any kernel reads it.
            let mut bytes = unsafe {
                dev.cuda_stream()
                    .context()
                    .alloc_pinned_with_flags::<u8>(n, sys::CU_MEMHOSTALLOC_DEVICEMAP)
            }
            .w()?;
            {
                let (storage, layout) = host.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("embedding: table not on the host")
                };
                let src = cpu_bytes(cpu, layout.start_offset(), n)?;
                bytes.as_mut_slice().w()?.copy_from_slice(src);
            }
            let addr = bytes.as_ptr().w()? as u64;
            Ok(PinnedTable {
                bytes,
                dev: dev.clone(),
                addr,
                vocab,
                h,
                dtype,
            })
        }

        pub fn rows(&self, ids: &TokenIds) -> Result<Tensor> {
            let candle_core::Device::Cuda(dev) = ids.on_device().device() else {
                candle_core::bail!("embedding: ids not on CUDA")
            };
            // The gathers must run on the stream that `drop` drains.
            if !dev.same_device(&self.dev) {
                candle_core::bail!("embedding: ids on another device than the table's");
            }
            // The device ids hold the host values (`TokenIds`): checking these bounds the reads.
            check_ids(ids.host(), self.vocab)?;
            let tokens = ids.host().len();
            if tokens == 0 {
                return Tensor::zeros((0, self.h), self.dtype, ids.on_device().device());
            }
            let idx = ids.on_device().contiguous()?;
            let (gi, li) = idx.storage_and_layout();
            let Storage::Cuda(ci) = &*gi else {
                candle_core::bail!("embedding: ids not on CUDA")
            };
            let ids_view = ci.as_cuda_slice::<u32>()?.slice(li.start_offset()..);
            // 16-byte packs when a row is whole packs (the base is page-aligned).
            let per_pack = 16 / self.dtype.size_in_bytes();
            let (name, per_thread) = if self.h % per_pack == 0 {
                ("gather_sum_vec", per_pack)
            } else {
                ("gather_sum", 1)
            };
            let sfx = suffix(self.dtype).unwrap_or("bf16");
            let func = dev.get_or_load_custom_func(
                &format!("{name}_{sfx}"),
                "moeq_routing",
                crate::ops::kernels::ROUTING,
            )?;
            let cfg =
                LaunchConfig::for_num_elems((tokens * self.h / per_thread).min(1 << 30) as u32);
            let (k, h) = (1i32, self.h);
            macro_rules! run {
                ($t:ty) => {{
                    // SAFETY: the kernel writes every output element.
                    let out = unsafe { dev.alloc::<$t>(tokens * h)? };
                    let mut b = func.builder();
                    b.arg(&self.addr);
                    b.arg(&ids_view);
                    b.arg(&out);
                    b.arg(&tokens);
                    b.arg(&k);
                    b.arg(&h);
                    // SAFETY: arguments match kernels/routing.cu's gather_sum (src, idx, out,
                    // tokens, k, h); every id is below `vocab` (checked above), so reads stay in
                    // the table, which lives as long as `self`.
                    unsafe { b.launch(cfg) }.w()?;
                    Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
                }};
            }
            let storage = match self.dtype {
                DType::F32 => run!(f32),
                DType::BF16 => run!(half::bf16),
                DType::F16 => run!(half::f16),
                other => candle_core::bail!("embedding: no device gather for {other:?}"),
            };
            Ok(Tensor::from_storage(
                storage,
                (tokens, h),
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }

        /// Bytes held in page-locked memory.
        pub fn num_bytes(&self) -> usize {
            self.bytes.num_bytes()
        }
    }

    impl Drop for PinnedTable {
        fn drop(&mut self) {
            // Gathers still queued read this memory.
            let _ = self.dev.cuda_stream().synchronize();
        }
    }

    /// `n` bytes of a host storage from element `from`.
    fn cpu_bytes(cpu: &candle_core::CpuStorage, from: usize, n: usize) -> Result<&[u8]> {
        fn bytes<T>(v: &[T], from: usize, n: usize) -> Result<&[u8]> {
            let v = &v[from..];
            if std::mem::size_of_val(v) < n {
                candle_core::bail!("embedding: table shorter than its shape");
            }
            // SAFETY: plain numeric elements viewed as their bytes, within `v`.
            Ok(unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n) })
        }
        match cpu {
            candle_core::CpuStorage::BF16(v) => bytes(v, from, n),
            candle_core::CpuStorage::F16(v) => bytes(v, from, n),
            candle_core::CpuStorage::F32(v) => bytes(v, from, n),
            _ => candle_core::bail!("embedding: table dtype not supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gather_host_rows;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn host_rows_match_index_select_and_refuse_unknown_ids() {
        let table = Tensor::randn(0f32, 1.0, (50, 24), &Device::Cpu).unwrap();
        let ids = [3u32, 49, 0, 3, 17];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = table.to_dtype(dtype).unwrap();
            let want = t
                .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
                .unwrap();
            let got = gather_host_rows(&t, &ids).unwrap();
            let rows = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows(got), rows(want), "{dtype:?}");
        }
        let err = gather_host_rows(&table, &[50]).unwrap_err().to_string();
        assert!(err.contains("token id 50"), "{err}");
    }

    #[test]
    fn many_host_rows_split_over_threads_match_index_select() {
        // 2,501 rows of 512 (over the 2^20 elements where the copy is split; an odd count so
        // the last thread's share is shorter).
        let table = Tensor::randn(0f32, 1.0, (1000, 512), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ids: Vec<u32> = (0..2501u32).map(|i| (i * 7919 + 13) % 1000).collect();
        let want = table
            .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
            .unwrap();
        let got = gather_host_rows(&table, &ids).unwrap();
        let rows = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows(got), rows(want));
        let mut bad = ids.clone();
        bad[2000] = 1000;
        let err = gather_host_rows(&table, &bad).unwrap_err().to_string();
        assert!(err.contains("token id 1000"), "{err}");
    }
}
