//! Tensors parked in page-locked host memory while the GPU works on, and fetched back before
//! they are needed (activation offloading: the layer inputs — and attention outputs, where
//! kept — a recompute step keeps, docs/ARCHITECTURE.md decision 28).
//!
//! On CUDA the copies run on a stream of their own, ordered against the compute stream by
//! events: a park waits for the tensor's producers (an event recorded on the compute stream
//! at the call) and its device memory is released only once the copy has finished (polled,
//! never waited for); a fetch allocates on the compute stream, the copy waits for that point,
//! and [`Fetching::ready`] makes the compute stream wait for the copy — so a fetch started a
//! layer ahead overlaps that layer's work. Host buffers are pooled across steps (page-locking
//! is slow). On the CPU parking keeps the tensor as it is.

use candle_core::{Device, Result, Tensor};

/// A tensor in host memory (CUDA) or kept as it is (CPU).
pub enum Parked {
    Kept(Tensor),
    #[cfg(feature = "cuda")]
    Host(cuda::HostCopy),
}

/// A parked tensor on its way back.
pub enum Fetching {
    Kept(Tensor),
    #[cfg(feature = "cuda")]
    Copying(cuda::InFlight),
}

impl Fetching {
    /// The tensor, once the compute stream has been made to wait for its copy.
    pub fn ready(self) -> Result<Tensor> {
        match self {
            Fetching::Kept(t) => Ok(t),
            #[cfg(feature = "cuda")]
            Fetching::Copying(f) => f.ready(),
        }
    }
}

/// Parks and fetches tensors of one device. On CUDA every offloader of a thread and device
/// shares one copier (its stream and host buffer pool live as long as the thread: pooled
/// page-locked buffers are what makes later steps cheap).
pub struct Offloader {
    #[cfg(feature = "cuda")]
    copier: Option<std::rc::Rc<std::cell::RefCell<cuda::Copier>>>,
}

#[cfg(feature = "cuda")]
thread_local! {
    static COPIERS: std::cell::RefCell<Vec<std::rc::Rc<std::cell::RefCell<cuda::Copier>>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Offloader {
    pub fn new(device: &Device) -> Result<Offloader> {
        #[cfg(feature = "cuda")]
        return Ok(Offloader {
            copier: match device {
                Device::Cuda(dev) => Some(COPIERS.with(|all| -> Result<_> {
                    let mut all = all.borrow_mut();
                    if let Some(c) = all.iter().find(|c| c.borrow().serves(dev)) {
                        return Ok(c.clone());
                    }
                    let c = std::rc::Rc::new(std::cell::RefCell::new(cuda::Copier::new(dev)?));
                    all.push(c.clone());
                    Ok(c)
                })?),
                _ => None,
            },
        });
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Offloader {})
        }
    }

    /// Starts copying `t` to host memory; its device memory goes once the copy has finished.
    pub fn park(&mut self, t: Tensor) -> Result<Parked> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.copier {
            return Ok(Parked::Host(c.borrow_mut().park(t)?));
        }
        Ok(Parked::Kept(t))
    }

    /// Starts copying a parked tensor back to the device.
    pub fn fetch(&mut self, p: Parked) -> Result<Fetching> {
        match p {
            Parked::Kept(t) => Ok(Fetching::Kept(t)),
            #[cfg(feature = "cuda")]
            Parked::Host(h) => match &self.copier {
                Some(c) => Ok(Fetching::Copying(c.borrow_mut().fetch(h)?)),
                None => candle_core::bail!("offload: a host copy without its copier"),
            },
        }
    }

    /// Releases the device memory of parked tensors whose copies have finished.
    pub fn release_finished(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.copier {
            c.borrow_mut().release_finished()?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DevicePtr};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaDevice, DType, Result, Shape, Storage, Tensor};
    use std::collections::VecDeque;
    use std::rc::Rc;

    /// The copy stream, destroyed after its last user.
    struct CopyStream(sys::CUstream);

    impl Drop for CopyStream {
        fn drop(&mut self) {
            // SAFETY: the stream was created by `Copier::new`; pending copies finish first.
            unsafe {
                let _ = result::stream::synchronize(self.0);
                let _ = result::stream::destroy(self.0);
            }
        }
    }

    /// Page-locked host memory; freed after the copy stream has finished with it.
    pub(crate) struct HostBuf {
        ptr: *mut u8,
        bytes: usize,
        stream: Rc<CopyStream>,
    }

    impl Drop for HostBuf {
        fn drop(&mut self) {
            // SAFETY: allocated by `malloc_host`; no copy is in flight once the stream is idle.
            unsafe {
                let _ = result::stream::synchronize(self.stream.0);
                let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }

    struct Event(sys::CUevent);

    impl Event {
        fn recorded_on(stream: sys::CUstream) -> Result<Event> {
            let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).w()?;
            // SAFETY: a fresh event on a live stream.
            unsafe { result::event::record(e, stream) }.w()?;
            Ok(Event(e))
        }

        fn finished(&self) -> Result<bool> {
            // SAFETY: a live event.
            match unsafe { result::event::query(self.0) } {
                Ok(()) => Ok(true),
                Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                Err(e) => Err(e).w(),
            }
        }

        /// `stream` waits for this event.
        fn make_wait(&self, stream: sys::CUstream) -> Result<()> {
            // SAFETY: a live event and stream.
            unsafe {
                result::stream::wait_event(
                    stream,
                    self.0,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .w()
        }
    }

    impl Drop for Event {
        fn drop(&mut self) {
            // SAFETY: created by `Event::recorded_on`; the driver releases it once done.
            unsafe {
                let _ = result::event::destroy(self.0);
            }
        }
    }

    pub struct HostCopy {
        buf: HostBuf,
        shape: Shape,
        dtype: DType,
    }

    pub struct InFlight {
        tensor: Tensor,
        copied: Event,
        compute: sys::CUstream,
    }

    impl InFlight {
        pub(crate) fn ready(self) -> Result<Tensor> {
            self.copied.make_wait(self.compute)?;
            Ok(self.tensor)
        }
    }

    pub(crate) struct Copier {
        dev: CudaDevice,
        stream: Rc<CopyStream>,
        pool: Vec<HostBuf>,
        /// Parked tensors with the event after their copy: released when it has passed.
        pending: VecDeque<(Event, Tensor)>,
    }

    /// The device address and byte length of a contiguous CUDA tensor from offset 0.
    fn address(
        t: &Tensor,
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<(u64, usize)> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let (storage, layout) = t.storage_and_layout();
        if layout.contiguous_offsets() != Some((0, t.elem_count())) {
            candle_core::bail!("offload: the tensor must own a contiguous buffer from offset 0");
        }
        let Storage::Cuda(c) = &*storage else {
            candle_core::bail!("offload: not a CUDA tensor")
        };
        let ptr = match &c.slice {
            S::U8(s) => s.device_ptr(stream).0,
            S::U32(s) => s.device_ptr(stream).0,
            S::I64(s) => s.device_ptr(stream).0,
            S::BF16(s) => s.device_ptr(stream).0,
            S::F16(s) => s.device_ptr(stream).0,
            S::F32(s) => s.device_ptr(stream).0,
            S::F64(s) => s.device_ptr(stream).0,
            _ => candle_core::bail!("offload: {:?} not supported", t.dtype()),
        };
        Ok((ptr, bytes))
    }

    impl Copier {
        pub(crate) fn new(dev: &CudaDevice) -> Result<Copier> {
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking).w()?;
            Ok(Copier {
                dev: dev.clone(),
                stream: Rc::new(CopyStream(stream)),
                pool: Vec::new(),
                pending: VecDeque::new(),
            })
        }

        /// Whether this copier serves `dev`.
        pub(crate) fn serves(&self, dev: &CudaDevice) -> bool {
            self.dev.same_device(dev)
        }

        fn compute(&self) -> sys::CUstream {
            self.dev.cuda_stream().cu_stream()
        }

        /// A pooled host buffer of at least `bytes` (the smallest that fits), or a new one.
        fn host_buf(&mut self, bytes: usize) -> Result<HostBuf> {
            let best = (0..self.pool.len())
                .filter(|&i| self.pool[i].bytes >= bytes)
                .min_by_key(|&i| self.pool[i].bytes);
            if let Some(i) = best {
                return Ok(self.pool.swap_remove(i));
            }
            // SAFETY: page-locked memory of `bytes`; written by the copy before any read.
            let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }.w()? as *mut u8;
            Ok(HostBuf {
                ptr,
                bytes,
                stream: self.stream.clone(),
            })
        }

        pub(crate) fn park(&mut self, t: Tensor) -> Result<HostCopy> {
            self.release_finished()?;
            let t = crate::ops::at_offset_zero(&t)?;
            let stream = self.dev.cuda_stream();
            let (src, bytes) = address(&t, &stream)?;
            let buf = self.host_buf(bytes)?;
            // The copy starts after everything the compute stream has been given so far.
            Event::recorded_on(self.compute())?.make_wait(self.stream.0)?;
            // SAFETY: `buf` holds ≥ bytes; `t` stays alive (pending) until the copy is done.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(buf.ptr, bytes);
                result::memcpy_dtoh_async(dst, src, self.stream.0).w()?;
            }
            self.pending
                .push_back((Event::recorded_on(self.stream.0)?, t.clone()));
            Ok(HostCopy {
                buf,
                shape: t.shape().clone(),
                dtype: t.dtype(),
            })
        }

        pub(crate) fn fetch(&mut self, h: HostCopy) -> Result<InFlight> {
            self.release_finished()?;
            let n = h.shape.elem_count();
            let tensor = uninit(&self.dev, n, h.dtype)?.reshape(h.shape.clone())?;
            let stream = self.dev.cuda_stream();
            let (dst, bytes) = address(&tensor, &stream)?;
            // The buffer was allocated on the compute stream: copy into it after that point.
            Event::recorded_on(self.compute())?.make_wait(self.stream.0)?;
            // SAFETY: the host buffer holds the parked bytes; the device buffer `bytes`.
            unsafe {
                let src = std::slice::from_raw_parts(h.buf.ptr, bytes);
                result::memcpy_htod_async(dst, src, self.stream.0).w()?;
            }
            let copied = Event::recorded_on(self.stream.0)?;
            // Later copies on the same stream come after this one: the buffer can be reused.
            self.pool.push(h.buf);
            Ok(InFlight {
                tensor,
                copied,
                compute: self.compute(),
            })
        }

        pub(crate) fn release_finished(&mut self) -> Result<()> {
            while let Some((e, _)) = self.pending.front() {
                if !e.finished()? {
                    break;
                }
                self.pending.pop_front();
            }
            Ok(())
        }
    }

    impl Drop for Copier {
        fn drop(&mut self) {
            // SAFETY: the copier's own stream.
            unsafe {
                let _ = result::stream::synchronize(self.stream.0);
            }
            self.pending.clear();
        }
    }

    /// An uninitialised device tensor of `n` elements (written by a copy before any read).
    fn uninit(dev: &CudaDevice, n: usize, dtype: DType) -> Result<Tensor> {
        macro_rules! alloc {
            ($t:ty) => {{
                // SAFETY: the fetch's copy writes every byte before the compute stream reads.
                let s = unsafe { dev.alloc::<$t>(n)? };
                candle_core::CudaStorage::wrap_cuda_slice(s, dev.clone())
            }};
        }
        let storage = match dtype {
            DType::U8 => alloc!(u8),
            DType::U32 => alloc!(u32),
            DType::I64 => alloc!(i64),
            DType::BF16 => alloc!(half::bf16),
            DType::F16 => alloc!(half::f16),
            DType::F32 => alloc!(f32),
            DType::F64 => alloc!(f64),
            other => candle_core::bail!("offload: {other:?} not supported"),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            n,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}
