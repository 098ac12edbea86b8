//! Collectives between ranks (docs/ARCHITECTURE.md, decision 9): one trait, three engines.
//! - `Solo`: one rank; every collective is the identity.
//! - `TcpComm`: the CPU collective through the rendezvous store over TCP, for tests and CPU
//!   runs (not a production path). Deterministic: a reduction adds the ranks' tensors in rank
//!   order in f32 on every rank, so every rank holds the same bits.
//! - `NcclComm` (`nccl` feature): NCCL on the GPU.
//!
//! Every rank must call the same collectives in the same order with matching shapes.

use super::store::StoreClient;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Mutex;

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Elementwise sum over ranks; the same result on every rank.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Every rank's tensor in rank order; sizes of the first dimension may differ.
    fn all_gather(&self, x: &Tensor) -> Result<Vec<Tensor>>;
    /// `root`'s tensor on every rank (`x` gives the shape on the others).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// x: [Σsend, …] with `send[d]` leading rows for rank d, in rank order →
    /// [Σrecv, …]: `recv[s]` rows from rank s, in rank order.
    fn all_to_all(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    /// Tells the other ranks this one failed, so they stop with `msg` as the cause.
    fn abort(&self, _msg: &str) {}
    /// This rank finished its work: leaving now is not a failure.
    fn finish(&self) {}

    /// Host values `send[d]` for rank d → what each rank sent here, in rank order (the
    /// per-expert token counts before a dispatch).
    fn exchange_counts(&self, send: &[Vec<u64>]) -> Result<Vec<Vec<u64>>> {
        let world = self.world_size();
        if send.len() != world {
            candle_core::bail!("exchange_counts: {} lists for {world} ranks", send.len());
        }
        let lens: Vec<u64> = send.iter().map(|v| v.len() as u64).collect();
        let flat: Vec<i64> = send.concat().iter().map(|&v| v as i64).collect();
        let n = flat.len();
        let x = Tensor::from_vec(flat, n, &Device::Cpu)?;
        // Row counts are exchanged first so each side knows how many values arrive.
        let len_t = Tensor::from_vec(
            lens.iter().map(|&l| l as i64).collect::<Vec<_>>(),
            world,
            &Device::Cpu,
        )?;
        let got_lens = self.all_to_all(&len_t, &vec![1; world], &vec![1; world])?;
        let recv: Vec<usize> = got_lens
            .to_vec1::<i64>()?
            .iter()
            .map(|&l| l as usize)
            .collect();
        let send_rows: Vec<usize> = send.iter().map(|v| v.len()).collect();
        let got = self.all_to_all(&x, &send_rows, &recv)?.to_vec1::<i64>()?;
        let mut out = Vec::with_capacity(world);
        let mut at = 0;
        for n in recv {
            out.push(got[at..at + n].iter().map(|&v| v as u64).collect());
            at += n;
        }
        Ok(out)
    }
}

/// One rank: collectives are the identity.
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn all_gather(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![x.clone()])
    }

    fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn all_to_all(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor> {
        check_split(x, send, recv, 1)?;
        if send != recv {
            candle_core::bail!("all_to_all on one rank: sends {send:?} but receives {recv:?}");
        }
        Ok(x.clone())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

fn check_split(x: &Tensor, send: &[usize], recv: &[usize], world: usize) -> Result<()> {
    if send.len() != world || recv.len() != world {
        candle_core::bail!(
            "all_to_all: {} send and {} receive counts for {world} ranks",
            send.len(),
            recv.len()
        );
    }
    let rows = x.dims().first().copied().unwrap_or(0);
    if send.iter().sum::<usize>() != rows {
        candle_core::bail!("all_to_all: send counts {send:?} do not add up to {rows} rows");
    }
    Ok(())
}

/// Element types the collectives carry, with their little-endian encoding.
trait Wire: candle_core::WithDType {
    const WIDTH: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

macro_rules! wire {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut w = [0u8; std::mem::size_of::<$t>()];
                w.copy_from_slice(b);
                <$t>::from_le_bytes(w)
            }
        }
    )*};
}
wire!(f32, f64, half::bf16, half::f16, u32, i64, u8);

fn encode_as<T: Wire>(x: &Tensor) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(x.elem_count() * T::WIDTH);
    for v in x.to_vec1::<T>()? {
        v.put(&mut out);
    }
    Ok(out)
}

fn decode_as<T: Wire>(b: &[u8], shape: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<T> = b.chunks_exact(T::WIDTH).map(T::get).collect();
    Tensor::from_vec(v, shape, device)
}

/// Raw little-endian bytes of a tensor (contiguous, on the host).
pub fn tensor_bytes(x: &Tensor) -> Result<Vec<u8>> {
    let x = x.to_device(&Device::Cpu)?.flatten_all()?;
    match x.dtype() {
        DType::F32 => encode_as::<f32>(&x),
        DType::F64 => encode_as::<f64>(&x),
        DType::BF16 => encode_as::<half::bf16>(&x),
        DType::F16 => encode_as::<half::f16>(&x),
        DType::U32 => encode_as::<u32>(&x),
        DType::I64 => encode_as::<i64>(&x),
        DType::U8 => encode_as::<u8>(&x),
        other => candle_core::bail!("collectives: dtype {other:?} is not supported"),
    }
}

/// The inverse of `tensor_bytes`.
pub fn tensor_from_bytes(
    b: &[u8],
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if b.len() != n * dtype.size_in_bytes() {
        candle_core::bail!(
            "collectives: {} bytes received for {shape:?} {dtype:?}",
            b.len()
        );
    }
    match dtype {
        DType::F32 => decode_as::<f32>(b, shape, device),
        DType::F64 => decode_as::<f64>(b, shape, device),
        DType::BF16 => decode_as::<half::bf16>(b, shape, device),
        DType::F16 => decode_as::<half::f16>(b, shape, device),
        DType::U32 => decode_as::<u32>(b, shape, device),
        DType::I64 => decode_as::<i64>(b, shape, device),
        DType::U8 => decode_as::<u8>(b, shape, device),
        other => candle_core::bail!("collectives: dtype {other:?} is not supported"),
    }
}

/// The CPU collective: chunks go through the rank-0 store (a star; fine for tests and tiny
/// CPU runs, not for scale).
pub struct TcpComm {
    client: Mutex<StoreClient>,
    rank: usize,
    world: usize,
}

fn comm_err(e: super::store::StoreError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl TcpComm {
    pub fn new(client: StoreClient, rank: usize) -> TcpComm {
        let world = client.world_size();
        TcpComm {
            client: Mutex::new(client),
            rank,
            world,
        }
    }

    fn exchange(&self, name: &str, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        c.exchange(name, chunks).map_err(comm_err)
    }

    /// Every rank's raw bytes of `x` together with its first dimension.
    fn gather_bytes(&self, name: &str, x: &Tensor) -> Result<Vec<Vec<u8>>> {
        // One chunk: the store hands it to every rank.
        let bytes = tensor_bytes(x)?;
        self.exchange(name, &[bytes.as_slice()])
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        // In pieces, so a frame (and the store's reply of every rank's piece) stays small.
        const PIECE: usize = 1 << 20;
        let flat = x.flatten_all()?;
        let n = flat.elem_count();
        // f64 (host statistics) is summed in f64, everything else in f32.
        let acc_dtype = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut out = Vec::new();
        for start in (0..n.max(1)).step_by(PIECE) {
            let len = PIECE.min(n - start.min(n));
            let piece = flat.narrow(0, start.min(n), len)?;
            let mut acc: Option<Tensor> = None;
            for b in self.gather_bytes("all_reduce", &piece)? {
                let t =
                    tensor_from_bytes(&b, x.dtype(), &[len], &Device::Cpu)?.to_dtype(acc_dtype)?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            match acc {
                Some(a) => out.push(a),
                None => candle_core::bail!("all_reduce: no ranks"),
            }
        }
        Tensor::cat(&out, 0)?
            .to_dtype(x.dtype())?
            .reshape(x.dims())?
            .to_device(x.device())
    }

    fn all_gather(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let row: usize = x.dims().iter().skip(1).product();
        let row_bytes = row.max(1) * x.dtype().size_in_bytes();
        let parts = self.gather_bytes("all_gather", x)?;
        parts
            .iter()
            .map(|b| {
                let mut shape = x.dims().to_vec();
                if let Some(first) = shape.first_mut() {
                    *first = if row == 0 { 0 } else { b.len() / row_bytes };
                }
                tensor_from_bytes(b, x.dtype(), &shape, &Device::Cpu)?.to_device(x.device())
            })
            .collect()
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            candle_core::bail!("broadcast from rank {root} in a world of {}", self.world);
        }
        let bytes = if self.rank == root {
            tensor_bytes(x)?
        } else {
            Vec::new()
        };
        let got = self.exchange("broadcast", &[bytes.as_slice()])?;
        tensor_from_bytes(&got[root], x.dtype(), x.dims(), &Device::Cpu)?.to_device(x.device())
    }

    fn all_to_all(&self, x: &Tensor, send: &[usize], recv: &[usize]) -> Result<Tensor> {
        check_split(x, send, recv, self.world)?;
        let row: usize = x.dims().iter().skip(1).product();
        let row_bytes = row * x.dtype().size_in_bytes();
        let bytes = tensor_bytes(x)?;
        let mut chunks = Vec::with_capacity(self.world);
        let mut at = 0;
        for &n in send {
            chunks.push(&bytes[at * row_bytes..(at + n) * row_bytes]);
            at += n;
        }
        let got = self.exchange("all_to_all", &chunks)?;
        for (s, (b, &n)) in got.iter().zip(recv).enumerate() {
            if b.len() != n * row_bytes {
                candle_core::bail!(
                    "all_to_all: expected {n} rows from rank {s}, received {}",
                    b.len() / row_bytes.max(1)
                );
            }
        }
        let mut shape = x.dims().to_vec();
        shape[0] = recv.iter().sum();
        tensor_from_bytes(&got.concat(), x.dtype(), &shape, &Device::Cpu)?.to_device(x.device())
    }

    fn barrier(&self) -> Result<()> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        c.barrier("comm").map_err(comm_err)
    }

    fn abort(&self, msg: &str) {
        let c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        c.fail(msg);
    }

    fn finish(&self) {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        c.finish();
    }
}
