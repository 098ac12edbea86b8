//! Host memory accounting for load-time claims. `VmHWM` (peak RSS) counts the pages of the
//! memory-mapped checkpoint that were read, which are page cache, not allocations; the
//! anonymous resident set (`RssAnon`) is what the process itself holds, so its peak is
//! sampled at the points where it can be highest (after each tensor is loaded or written).

use std::sync::atomic::{AtomicU64, Ordering};

static PEAK_ANON: AtomicU64 = AtomicU64::new(0);

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Current anonymous resident memory, in bytes (Linux).
pub fn rss_anon_bytes() -> Option<u64> {
    status_kb("RssAnon:").map(|kb| kb * 1024)
}

/// Peak resident set including mapped file pages, in bytes (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Records the current anonymous resident memory if it is a new peak.
pub fn sample_peak() {
    if let Some(now) = rss_anon_bytes() {
        PEAK_ANON.fetch_max(now, Ordering::Relaxed);
    }
}

/// Largest sampled anonymous resident memory (0 if never sampled or not on Linux).
pub fn peak_anon_bytes() -> u64 {
    PEAK_ANON.load(Ordering::Relaxed)
}

static PEAK_GPU: AtomicU64 = AtomicU64::new(0);

/// Device memory in use on the current GPU (driver view: everything allocated on the device,
/// including allocator pools), in bytes; None without CUDA.
pub fn gpu_used_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let _ = device.synchronize();
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// Records the device memory in use if it is a new peak.
pub fn sample_gpu_peak(device: &candle_core::Device) {
    if let Some(now) = gpu_used_bytes(device) {
        PEAK_GPU.fetch_max(now, Ordering::Relaxed);
    }
}

/// Largest sampled device memory in use (0 if never sampled).
pub fn peak_gpu_bytes() -> u64 {
    PEAK_GPU.load(Ordering::Relaxed)
}

/// Makes the device's stream-ordered allocator keep freed memory for reuse instead of returning
/// it to the driver at every synchronization (the default release threshold is 0). The trainer
/// synchronizes at least once per MoE layer (routing), and re-mapping gigabytes of attention
/// scores after each one costs milliseconds; PyTorch's caching allocator keeps memory likewise.
/// The driver's "in use" figure therefore includes the pool, which is what the process holds.
pub fn keep_freed_gpu_memory(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = pool::default_pool(device)? {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: a plain driver call on a valid pool; the attribute takes a u64.
        let status = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
        };
        pool::check(status, "setting the release threshold")?;
    }
    let _ = device;
    Ok(())
}

/// The stream-ordered pool's high-water marks since the previous call (which resets them) of
/// memory in use and of memory reserved, and the device memory outside the pool (driver view
/// minus the pool's reservation), in bytes; None without CUDA.
pub fn pool_high_since_last(device: &candle_core::Device) -> Option<(u64, u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(Some(pool)) = pool::default_pool(device) {
        use candle_core::cuda_backend::cudarc::driver::sys::{
            cuMemPoolGetAttribute as get, cuMemPoolSetAttribute as set, CUmemPool_attribute as A,
            CUresult,
        };
        let _ = device.synchronize();
        let used = gpu_used_bytes(device)?;
        let (mut high, mut reserved_high, mut reserved, mut zero) = (0u64, 0u64, 0u64, 0u64);
        let at = |v: &mut u64| v as *mut u64 as *mut std::ffi::c_void;
        // SAFETY: plain driver calls on a valid pool; these attributes are u64s.
        let ok = unsafe {
            [
                get(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, at(&mut high)),
                get(
                    pool,
                    A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                    at(&mut reserved_high),
                ),
                get(
                    pool,
                    A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                    at(&mut reserved),
                ),
                set(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, at(&mut zero)),
                set(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, at(&mut zero)),
            ]
            .iter()
            .all(|s| *s == CUresult::CUDA_SUCCESS)
        };
        return ok.then(|| (high, reserved_high, used.saturating_sub(reserved)));
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    /// The default memory pool of a CUDA device; None on the CPU.
    pub fn default_pool(
        device: &candle_core::Device,
    ) -> candle_core::Result<Option<sys::CUmemoryPool>> {
        let candle_core::Device::Cuda(d) = device else {
            return Ok(None);
        };
        let cu_device = d.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain driver call on a valid device handle.
        check(
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) },
            "lookup",
        )?;
        Ok(Some(pool))
    }

    pub fn check(status: sys::CUresult, what: &str) -> candle_core::Result<()> {
        if status != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("CUDA memory pool ({what}): {status:?}");
        }
        Ok(())
    }
}
