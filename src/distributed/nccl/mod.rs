//! `NcclComm`: the production `Communicator` (docs/ARCHITECTURE.md, decision 9) — NCCL on the GPU, one
//! process per GPU. Semantics match `comm::TcpComm`, the CPU reference `moeq nccl-check`
//! compares it with.
//!
//! - Rendezvous: rank 0 creates the NCCL unique id and publishes it in the store under
//!   `nccl_unique_id`; the other ranks wait for it there, then all call ncclCommInitRank.
//!   The store is used for nothing else (its exchanges are numbered per connection, so a
//!   `TcpComm` may share the store), except `abort`, which marks the job failed there.
//! - Abort: the communicator sits in an `Option` under the engine's lock; `abort_comm` (any
//!   thread) takes and drops it (cudarc's drop is ncclCommAbort); later calls fail, naming it.
//!   No thread holds the lock while it waits on the GPU.
//! - Streams: collectives run on a stream of their own. Before one, that stream waits for an
//!   event recorded on the input's candle stream; after it, the candle stream waits for an
//!   event recorded on the NCCL stream. Results, and the frees of inputs dropped later, are
//!   therefore ordered after the collective on candle's stream, and the host never waits
//!   (except for `barrier`, the first-dimension sizes of `all_gather`, and host tensors).
//!   The NCCL stream is created outside cudarc's stream count on purpose: a second cudarc
//!   stream switches the whole context into multi-stream mode, where every kernel launch
//!   records and waits on events per argument. Candle's default stream is the per-thread
//!   stream, so call the collectives from the thread that runs the compute.
//! - Host tensors (the trait's default `exchange_counts` moves I64 counts through
//!   `all_to_all` on the CPU) are uploaded, communicated, and downloaded.
//! - Only NCCL 2.28 calls are used (the device machines' version): CommInitRank, GetUniqueId,
//!   AllReduce, AllGather, Broadcast, Send, Recv, GroupStart/End, CommAbort, GetErrorString.
//!
//! Every rank must call the same collectives in the same order with matching shapes and
//! counts; NCCL cannot detect a mismatch, it hangs or moves the wrong bytes. If another rank
//! dies mid-collective, NCCL blocks; the heartbeat thread's watchdog (no progress) or the
//! store's failure report then stops this rank, and before it exits it aborts the communicator
//! (`store::on_exit` → ncclCommAbort), which releases the GPU from the stuck collective; the
//! launcher's group stop is the last resort. `moeq nccl-check --abort` checks the abort from
//! another thread on one GPU (a collective stuck on the GPU needs two: NCCL refuses two ranks
//! on one GPU and a receive from itself without a send).

mod engine;

use super::store::StoreClient;
use super::Communicator;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Result, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView};
use cudarc::nccl::{Comm, Id, ReduceOp};
use engine::{alloc, by_dtype, cuda_err, nccl_err, Elem, Engine, OwnedStream, Staged};
use std::sync::{Arc, Mutex};

/// The store key under which rank 0 publishes the NCCL unique id.
pub const UNIQUE_ID_KEY: &str = "nccl_unique_id";

/// The NCCL collective (`nccl` feature). Build one per process with `NcclComm::new`.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: CudaDevice,
    engine: Arc<Mutex<Engine>>,
    store: Mutex<StoreClient>,
}

impl NcclComm {
    /// Joins the NCCL communicator of the job. `device` must be this rank's GPU (a
    /// `Device::Cuda`); `store` is this rank's connection to the rendezvous store, kept for
    /// `abort`. Blocks until every rank has called `new`.
    pub fn new(
        mut store: StoreClient,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<NcclComm> {
        let Device::Cuda(dev) = device else {
            candle_core::bail!("NcclComm needs a CUDA device, got {device:?}");
        };
        if rank >= world {
            candle_core::bail!("NcclComm: rank {rank} outside a world of {world}");
        }
        if store.world_size() != world {
            candle_core::bail!(
                "NcclComm: the rendezvous store was started for {} ranks, not {world}",
                store.world_size()
            );
        }
        let store_err = |e: super::store::StoreError| candle_core::Error::Msg(e.to_string());
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("creating the unique id", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(UNIQUE_ID_KEY, &bytes).map_err(store_err)?;
            id
        } else {
            let bytes = store.get(UNIQUE_ID_KEY).map_err(store_err)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                candle_core::bail!(
                    "NcclComm: the store holds a {}-byte '{UNIQUE_ID_KEY}', expected {}",
                    bytes.len(),
                    internal.len()
                );
            }
            for (d, &b) in internal.iter_mut().zip(&bytes) {
                *d = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        let stream = OwnedStream::new(&ctx)?;
        // ncclCommInitRank takes the device from the calling thread's current context.
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let comm = Comm::from_rank(stream.stream.clone(), rank, world, id).map_err(|e| {
            // NCCL refuses two ranks of one communicator on the same GPU.
            let hint = if e.0 == cudarc::nccl::sys::ncclResult_t::ncclInvalidUsage {
                "; two ranks on one GPU? Each rank needs its own (check LOCAL_RANK and CUDA_VISIBLE_DEVICES)"
            } else {
                ""
            };
            nccl_err(
                &format!(
                    "ncclCommInitRank (rank {rank} of {world}, GPU {}{hint})",
                    ctx.ordinal()
                ),
                e,
            )
        })?;
        let event = || {
            ctx.new_event(None)
                .map_err(|e| cuda_err("creating an event", e))
        };
        let engine = Arc::new(Mutex::new(Engine {
            comm: Some(comm),
            ready: event()?,
            done: event()?,
            stream,
        }));
        // A rank stopped by the watchdog or by a failed peer aborts its communicator first.
        let weak = Arc::downgrade(&engine);
        super::store::on_exit(Box::new(move || {
            let engine = weak.upgrade()?;
            abort_comm(&engine, std::time::Duration::from_secs(5))
                .then(|| format!("rank {rank}: aborted the NCCL communicator (ncclCommAbort)"))
        }));
        Ok(NcclComm {
            rank,
            world,
            device: dev.clone(),
            engine,
            store: Mutex::new(store),
        })
    }

    /// Aborts the communicator now (ncclCommAbort, from any thread): collectives stuck on the
    /// GPU are released, every later call fails. True if this call aborted it.
    pub fn abort_comm(&self) -> bool {
        abort_comm(&self.engine, std::time::Duration::from_secs(5))
    }

    /// The GPU this communicator's collectives run on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NcclComm {
    /// The candle device whose stream orders a collective on `x`: `x`'s own for a tensor on
    /// this GPU, the communicator's for a host tensor.
    fn compute_device(&self, x: &Tensor, what: &str) -> Result<CudaDevice> {
        match x.device() {
            Device::Cpu => Ok(self.device.clone()),
            Device::Cuda(d) if x.device().location() == self.device().location() => Ok(d.clone()),
            other => candle_core::bail!(
                "{what}: the tensor is on {:?}, the NCCL communicator on {:?}",
                other.location(),
                self.device().location()
            ),
        }
    }

    /// `x`'s elements on the GPU, contiguous.
    fn stage<T: Elem>(&self, dev: &CudaDevice, x: &Tensor) -> Result<Staged<T>> {
        match x.device() {
            Device::Cpu => {
                let host = x.flatten_all()?.to_vec1::<T>()?;
                // SAFETY: all `host.len()` elements are written below before any use.
                let mut buf = unsafe { alloc::<T>(dev, host.len())? };
                if !host.is_empty() {
                    dev.memcpy_htod(&host, &mut buf.slice_mut(..host.len()))?;
                }
                Ok(Staged::Uploaded(buf))
            }
            _ => Ok(Staged::Device(x.contiguous()?)),
        }
    }

    /// Calls `f` with a view of the staged elements.
    fn with_view<T: Elem, R>(
        staged: &Staged<T>,
        n: usize,
        f: impl FnOnce(&CudaView<'_, T>) -> Result<R>,
    ) -> Result<R> {
        match staged {
            Staged::Uploaded(buf) => f(&buf.slice(..n)),
            Staged::Device(t) => {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(s) = &*storage else {
                    candle_core::bail!("NCCL communicator: staged tensor is not on the GPU");
                };
                let start = layout.start_offset();
                f(&s.as_cuda_slice::<T>()?.slice(start..start + n))
            }
        }
    }

    /// Wraps `buf` (at least `shape`'s element count) as a tensor on the GPU, or downloads it
    /// when the input was a host tensor.
    fn finish<T: Elem>(
        dev: &CudaDevice,
        buf: CudaSlice<T>,
        shape: &[usize],
        host: bool,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if host {
            // The download runs on candle's stream, which already waits for the collective.
            let v = if n == 0 {
                Vec::new()
            } else {
                dev.clone_dtoh(&buf.slice(..n))?
            };
            return Tensor::from_vec(v, shape, &Device::Cpu);
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    fn all_reduce_t<T: Elem>(&self, x: &Tensor) -> Result<Tensor> {
        let dev = self.compute_device(x, "all_reduce_sum")?;
        let n = x.elem_count();
        let staged = self.stage::<T>(&dev, x)?;
        // SAFETY: NCCL writes all n elements.
        let mut out = unsafe { alloc::<T>(&dev, n)? };
        if n > 0 {
            Self::with_view(&staged, n, |src| {
                self.engine()
                    .run(&dev.cuda_stream(), "all_reduce", false, |comm| {
                        comm.all_reduce(src, &mut out.slice_mut(..n), &ReduceOp::Sum)
                            .map(|_| ())
                            .map_err(|e| nccl_err("ncclAllReduce", e))
                    })
            })?;
        }
        Self::finish(&dev, out, x.dims(), x.device().is_cpu())
    }

    fn broadcast_t<T: Elem>(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let dev = self.compute_device(x, "broadcast")?;
        let n = x.elem_count();
        let staged = self.stage::<T>(&dev, x)?;
        // SAFETY: NCCL writes all n elements (root included: it copies its input).
        let mut out = unsafe { alloc::<T>(&dev, n)? };
        if n > 0 {
            Self::with_view(&staged, n, |src| {
                self.engine()
                    .run(&dev.cuda_stream(), "broadcast", false, |comm| {
                        comm.broadcast(Some(src), &mut out.slice_mut(..n), root as i32)
                            .map(|_| ())
                            .map_err(|e| nccl_err("ncclBroadcast", e))
                    })
            })?;
        }
        Self::finish(&dev, out, x.dims(), x.device().is_cpu())
    }

    /// Every rank's first-dimension size (rows), in rank order.
    fn gather_rows(&self, dev: &CudaDevice, rows: usize) -> Result<Vec<usize>> {
        let mine = dev.clone_htod(&[rows as i64])?;
        // SAFETY: NCCL writes all `world` elements.
        let mut all = unsafe { alloc::<i64>(dev, self.world)? };
        let world = self.world;
        self.engine()
            .run(&dev.cuda_stream(), "all_gather sizes", false, |comm| {
                comm.all_gather(&mine, &mut all.slice_mut(..world))
                    .map(|_| ())
                    .map_err(|e| nccl_err("ncclAllGather (sizes)", e))
            })?;
        let got = dev.clone_dtoh(&all.slice(..world))?;
        Ok(got.iter().map(|&r| r.max(0) as usize).collect())
    }

    fn all_gather_t<T: Elem>(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dev = self.compute_device(x, "all_gather")?;
        // A scalar travels as one row of one element.
        let (rows, row) = match x.dims().split_first() {
            Some((&r, rest)) => (r, rest.iter().product::<usize>()),
            None => (1, 1),
        };
        let counts = self.gather_rows(&dev, rows)?;
        let total: usize = counts.iter().sum();
        let staged = self.stage::<T>(&dev, x)?;
        // SAFETY: every rank's rows arrive, covering all total·row elements.
        let mut out = unsafe { alloc::<T>(&dev, total * row)? };
        let n = rows * row;
        if total * row > 0 {
            let even = counts.iter().all(|&c| c == rows);
            Self::with_view(&staged, n, |src| {
                let engine = self.engine();
                if even {
                    engine.run(&dev.cuda_stream(), "all_gather", false, |comm| {
                        comm.all_gather(src, &mut out.slice_mut(..total * row))
                            .map(|_| ())
                            .map_err(|e| nccl_err("ncclAllGather", e))
                    })
                } else {
                    // Uneven sizes: every rank sends its rows to every rank (itself included).
                    engine.run(&dev.cuda_stream(), "all_gather", true, |comm| {
                        let mut at = 0;
                        for (peer, &c) in counts.iter().enumerate() {
                            if n > 0 {
                                comm.send(src, peer as i32)
                                    .map_err(|e| nccl_err("ncclSend (all_gather)", e))?;
                            }
                            if c > 0 {
                                comm.recv(
                                    &mut out.slice_mut(at * row..(at + c) * row),
                                    peer as i32,
                                )
                                .map_err(|e| nccl_err("ncclRecv (all_gather)", e))?;
                            }
                            at += c;
                        }
                        Ok(())
                    })
                }
            })?;
        }
        let mut shape = x.dims().to_vec();
        if let Some(first) = shape.first_mut() {
            *first = total;
        } else {
            shape = vec![total];
        }
        let all = Self::finish(&dev, out, &shape, x.device().is_cpu())?;
        let mut parts = Vec::with_capacity(self.world);
        let mut at = 0;
        for &c in &counts {
            let mut dims = x.dims().to_vec();
            if let Some(first) = dims.first_mut() {
                *first = c;
            }
            parts.push(all.narrow(0, at, c)?.reshape(dims)?);
            at += c;
        }
        Ok(parts)
    }

    fn all_to_all_t<T: Elem>(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor> {
        let dev = self.compute_device(x, "all_to_all")?;
        let row: usize = x.dims().iter().skip(1).product();
        let rows_in: usize = send.iter().sum();
        let rows_out: usize = recv.iter().sum();
        let staged = self.stage::<T>(&dev, x)?;
        // SAFETY: the receives cover all rows_out·row elements.
        let mut out = unsafe { alloc::<T>(&dev, rows_out * row)? };
        if row > 0 && (rows_in > 0 || rows_out > 0) {
            Self::with_view(&staged, rows_in * row, |src| {
                self.engine()
                    .run(&dev.cuda_stream(), "all_to_all", true, |comm| {
                        let (mut s_at, mut r_at) = (0, 0);
                        for peer in 0..self.world {
                            let (s, r) = (send[peer], recv[peer]);
                            if s > 0 {
                                comm.send(&src.slice(s_at * row..(s_at + s) * row), peer as i32)
                                    .map_err(|e| nccl_err("ncclSend (all_to_all)", e))?;
                            }
                            if r > 0 {
                                comm.recv(
                                    &mut out.slice_mut(r_at * row..(r_at + r) * row),
                                    peer as i32,
                                )
                                .map_err(|e| nccl_err("ncclRecv (all_to_all)", e))?;
                            }
                            s_at += s;
                            r_at += r;
                        }
                        Ok(())
                    })
            })?;
        }
        let mut shape = x.dims().to_vec();
        shape[0] = rows_out;
        Self::finish(&dev, out, &shape, x.device().is_cpu())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        by_dtype!(x.dtype(), "all_reduce_sum", |T| self.all_reduce_t::<T>(x))
    }

    fn all_gather(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        by_dtype!(x.dtype(), "all_gather", |T| self.all_gather_t::<T>(x))
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            candle_core::bail!("broadcast from rank {root} in a world of {}", self.world);
        }
        by_dtype!(x.dtype(), "broadcast", |T| self.broadcast_t::<T>(x, root))
    }

    fn all_to_all(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor> {
        if send.len() != self.world || recv.len() != self.world {
            candle_core::bail!(
                "all_to_all: {} send and {} receive counts for {} ranks",
                send.len(),
                recv.len(),
                self.world
            );
        }
        let rows = x.dims().first().copied().unwrap_or(0);
        if x.rank() == 0 || send.iter().sum::<usize>() != rows {
            candle_core::bail!(
                "all_to_all: send counts {send:?} do not add up to the {rows} rows of {:?}",
                x.dims()
            );
        }
        by_dtype!(x.dtype(), "all_to_all", |T| self
            .all_to_all_t::<T>(x, send, recv))
    }

    /// Returns once every rank has reached it and this rank's queued GPU work (candle's
    /// stream included) has finished.
    fn barrier(&self) -> Result<()> {
        let dev = &self.device;
        let token = dev.clone_htod(&[1f32])?;
        // SAFETY: NCCL writes the element.
        let mut sum = unsafe { alloc::<f32>(dev, 1)? };
        let engine = self.engine();
        engine.run(&dev.cuda_stream(), "barrier", false, |comm| {
            comm.all_reduce(&token, &mut sum, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce (barrier)", e))
        })?;
        // Waited on without the lock, so an abort can take the communicator meanwhile.
        let nccl = engine.stream.stream.clone();
        drop(engine);
        nccl.synchronize()
            .map_err(|e| cuda_err("waiting for the barrier", e))?;
        let got = dev.clone_dtoh(&sum)?;
        if got.first().copied() != Some(self.world as f32) {
            candle_core::bail!(
                "barrier: {got:?} ranks arrived, expected {} (communicator out of step?)",
                self.world
            );
        }
        Ok(())
    }

    /// Marks the job failed in the store, so the other ranks (and the launcher) stop with
    /// `msg`. Collectives already blocked inside NCCL on other ranks are not interrupted.
    fn abort(&self, msg: &str) {
        let s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.fail(msg);
    }

    fn finish(&self) {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.finish();
    }
}

/// Takes the communicator out of `engine` and aborts it (cudarc's drop of a `Comm` is
/// ncclCommAbort), waiting at most `patience` for the lock. True if it was there to abort.
fn abort_comm(engine: &Mutex<Engine>, patience: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + patience;
    loop {
        match engine.try_lock() {
            Ok(mut e) => return abort_now(e.comm.take()),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                return abort_now(p.into_inner().comm.take())
            }
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(std::sync::TryLockError::WouldBlock) => return false,
        }
    }
}

/// Drops `comm` (ncclCommAbort), a panic of cudarc's drop on a failed abort included.
fn abort_now(comm: Option<Comm>) -> bool {
    match comm {
        Some(c) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(c))).is_ok(),
        None => false,
    }
}
