//! The token dispatcher with real TCP collectives between threads: uneven splits, experts
//! that receive no tokens, a rank that receives no tokens, and the mirror backward.
//!
//! Each rank routes random rows to the 7 experts of 3 ranks (owners: 0..3, 3..5, 5..7). The
//! "expert" on the receiving side multiplies a row by (global expert + 1), so after combine
//! every row must come back scaled by its expert's factor, and the gradient of
//! `Σ combine(dispatch(x)) · g` with respect to x must be `g · (expert + 1)`. Pure data
//! movement and one multiplication per element: results are exact, compared bit for bit.

use candle_core::{Device, Tensor, Var};
use moeq::arch::ExchangePlan;
use moeq::distributed::dispatch::{expert_ranges, Dispatch};
use moeq::distributed::store::{StoreClient, StoreOptions, StoreServer};
use moeq::distributed::{Communicator, TcpComm};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const H: usize = 5;
const E: usize = 7;

/// Rows per global expert on rank `r`: random, with experts 1 and 4 never chosen and the
/// experts of rank 2 (5, 6) never chosen, so rank 2 receives nothing.
fn counts(r: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(100 + r as u64);
    (0..E)
        .map(|e| match e {
            1 | 4 | 5 | 6 => 0,
            _ => rng.random_range(0..6) + usize::from(e == 0),
        })
        .collect()
}

fn rows(r: usize, n: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(200 + r as u64);
    let v: Vec<f32> = (0..n * H).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(v, (n, H), &Device::Cpu).unwrap()
}

fn expert_of_rows(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| std::iter::repeat_n(e, c))
        .collect()
}

struct RankResult {
    recv: Vec<usize>,
    local_counts: Vec<usize>,
    received: Vec<Vec<f32>>,
    y: Vec<Vec<f32>>,
    grad: Vec<Vec<f32>>,
}

fn on_rank(r: usize, comm: Arc<dyn Communicator>) -> RankResult {
    let world = comm.world_size();
    let ranges = expert_ranges(E, world);
    let c = counts(r);
    let n: usize = c.iter().sum();
    let x = Var::from_tensor(&rows(r, n)).unwrap();
    let d = Dispatch::plan(&comm, &c, &ranges, &Device::Cpu).unwrap();
    let xr = d.dispatch(x.as_tensor()).unwrap(); // grouped by local expert
                                                 // The expert: scale the rows of local expert k by (global expert + 1).
    let mine = ranges[r].clone();
    let factors: Vec<f32> = d
        .local_counts
        .iter()
        .enumerate()
        .flat_map(|(k, &m)| std::iter::repeat_n((mine.start + k + 1) as f32, m))
        .collect();
    let f = Tensor::from_vec(factors.clone(), (factors.len(), 1), &Device::Cpu).unwrap();
    let yr = xr.broadcast_mul(&f).unwrap();
    let y = d.combine(&yr).unwrap();
    let g = rows(50 + r, n);
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = grads.get(x.as_tensor()).unwrap().clone();
    RankResult {
        recv: d.recv.clone(),
        local_counts: d.local_counts.clone(),
        received: xr.to_vec2().unwrap(),
        y: y.to_vec2().unwrap(),
        grad: grad.to_vec2().unwrap(),
    }
}

#[test]
fn dispatch_combine_and_backward_with_uneven_and_empty_splits() {
    let world = 3;
    let token = "dispatch-test";
    let server = StoreServer::start("127.0.0.1:0", StoreOptions::new(world, token)).unwrap();
    let addr = server.addr.to_string();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c =
                    StoreClient::connect(&addr, token, r as u32, Duration::from_secs(5)).unwrap();
                on_rank(r, Arc::new(TcpComm::new(c, r)))
            })
        })
        .collect();
    let results: Vec<RankResult> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ranges = expert_ranges(E, world);

    // Rank 2 owns experts 5 and 6, which nobody chose.
    assert_eq!(results[2].recv, vec![0, 0, 0]);
    assert!(results[2].received.is_empty());
    for (r, res) in results.iter().enumerate() {
        // What arrived: for each local expert, the rows of source 0, then 1, then 2.
        let mut want = Vec::new();
        let mut want_counts = vec![0; ranges[r].len()];
        for (k, e) in ranges[r].clone().enumerate() {
            for s in 0..world {
                let c = counts(s);
                let start: usize = c[..e].iter().sum();
                let x = rows(s, c.iter().sum()).to_vec2::<f32>().unwrap();
                want.extend_from_slice(&x[start..start + c[e]]);
                want_counts[k] += c[e];
            }
        }
        assert_eq!(res.received, want, "rank {r} received");
        assert_eq!(res.local_counts, want_counts, "rank {r} counts");
        // Back at the source: each row scaled by its expert's factor; gradient likewise.
        let c = counts(r);
        let x = rows(r, c.iter().sum()).to_vec2::<f32>().unwrap();
        let g = rows(50 + r, c.iter().sum()).to_vec2::<f32>().unwrap();
        for (i, e) in expert_of_rows(&c).into_iter().enumerate() {
            let f = (e + 1) as f32;
            let y: Vec<f32> = x[i].iter().map(|v| v * f).collect();
            let dx: Vec<f32> = g[i].iter().map(|v| v * f).collect();
            assert_eq!(res.y[i], y, "rank {r} row {i} (expert {e})");
            assert_eq!(res.grad[i], dx, "rank {r} row {i} gradient");
        }
    }
    // Experts 1 and 4 received nothing, yet their owners took part.
    assert_eq!(results[0].local_counts[1], 0);
    assert_eq!(results[1].local_counts[1], 0);
}
