//! The NCCL engine under `NcclComm`: the communicator with its own stream and the two events
//! that order it against candle's stream (see `super`'s module doc), staging of host tensors,
//! and the element types both NCCL and candle know.

use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, Result, Tensor};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DeviceRepr};
use cudarc::nccl::{Comm, NcclType};
use std::sync::Arc;

pub(super) fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> candle_core::Error {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string.
    let text = unsafe {
        let p = cudarc::nccl::sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    let debug = if text.contains("NCCL_DEBUG") {
        ""
    } else {
        "; rerun with NCCL_DEBUG=WARN for NCCL's own account"
    };
    candle_core::Error::Msg(format!("NCCL {what}: {:?} ({text}){debug}", e.0))
}

pub(super) fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL communicator, {what}: {e:?}"))
}

/// A stream created with the driver directly (see the module doc for why), destroyed on drop.
pub(super) struct OwnedStream {
    pub(super) stream: Arc<CudaStream>,
}

impl OwnedStream {
    pub(super) fn new(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<OwnedStream> {
        use cudarc::driver::result::stream::{create, StreamKind};
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let raw = create(StreamKind::NonBlocking).map_err(|e| cuda_err("creating a stream", e))?;
        // SAFETY: `raw` belongs to `ctx` and lives until this struct's drop, after the
        // communicator that uses it (field order in `Engine`).
        let stream = unsafe { ctx.wrap_borrowed_stream(raw) };
        Ok(OwnedStream { stream })
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        if ctx.bind_to_thread().is_ok() {
            // SAFETY: created in `new`, used by nothing else; pending work still completes.
            let _ = unsafe { cudarc::driver::result::stream::destroy(self.stream.cu_stream()) };
        }
    }
}

/// NCCL state used under the lock. Field order is drop order: the communicator goes first,
/// its stream last.
pub(super) struct Engine {
    /// None once aborted (`NcclComm::abort_comm`).
    pub(super) comm: Option<Comm>,
    /// Recorded on candle's stream, waited on by the NCCL stream.
    pub(super) ready: CudaEvent,
    /// Recorded on the NCCL stream, waited on by candle's stream.
    pub(super) done: CudaEvent,
    pub(super) stream: OwnedStream,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap;
// `NcclComm` only touches it under a mutex.
unsafe impl Send for Engine {}

impl Engine {
    /// Runs `f` (NCCL calls on the NCCL stream) ordered after everything queued on `compute`
    /// so far, and orders later work on `compute` after it. `grouped` wraps `f` in
    /// ncclGroupStart/End (point-to-point calls must be grouped to not deadlock).
    pub(super) fn run(
        &self,
        compute: &CudaStream,
        what: &str,
        grouped: bool,
        f: impl FnOnce(&Comm) -> Result<()>,
    ) -> Result<()> {
        let nccl = &self.stream.stream;
        self.ready
            .record(compute)
            .map_err(|e| cuda_err("recording an event", e))?;
        nccl.wait(&self.ready)
            .map_err(|e| cuda_err("waiting on an event", e))?;
        let Some(comm) = &self.comm else {
            candle_core::bail!("{what}: the NCCL communicator was aborted");
        };
        let out = if grouped {
            cudarc::nccl::group_start().map_err(|e| nccl_err(what, e))?;
            let r = f(comm);
            // The group must be closed even when a call inside failed.
            let end = cudarc::nccl::group_end().map_err(|e| nccl_err(what, e));
            r.and(end.map(|_| ()))
        } else {
            f(comm)
        };
        // Even after a failure, later compute must not overtake what was queued.
        self.done
            .record(nccl)
            .map_err(|e| cuda_err("recording an event", e))?;
        compute
            .wait(&self.done)
            .map_err(|e| cuda_err("waiting on an event", e))?;
        out
    }
}

/// A tensor's elements on the communicator's GPU: borrowed from a CUDA tensor, or uploaded
/// from a host tensor.
pub(super) enum Staged<T> {
    Device(Tensor),
    Uploaded(CudaSlice<T>),
}

/// Device buffer of `n` elements. One more when `n` is 0: the driver refuses empty
/// allocations, and a tensor may own more storage than its shape covers.
///
/// SAFETY: the memory is uninitialised; every caller has NCCL write all `n` elements.
pub(super) unsafe fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    dev.alloc::<T>(n.max(1))
}

macro_rules! by_dtype {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::U32 => {
                type $t = u32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::U8 => {
                type $t = u8;
                $body
            }
            other => candle_core::bail!(
                "{}: dtype {other:?} is not supported by the NCCL communicator (F32, F64, BF16, F16, U32, I64, U8)",
                $what
            ),
        }
    };
}

/// The element types NCCL and candle's CUDA storage both know.
pub(super) trait Elem: NcclType + CudaDType + DeviceRepr + candle_core::WithDType {}
impl<T: NcclType + CudaDType + DeviceRepr + candle_core::WithDType> Elem for T {}

pub(super) use by_dtype;
