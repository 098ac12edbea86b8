//! Collectives among some ranks (`distributed::group`), with real TCP collectives between six
//! threads: `expert_parallel_size` 3 makes the groups {0, 1, 2} and {3, 4, 5}, and the replica
//! groups {0, 3}, {1, 4}, {2, 5}. Every group runs its collective at the same time, as in
//! training. Sums are compared bit for bit with the members' tensors added in member order in
//! f32 (what the group sum promises); moved data is compared exactly.

use candle_core::{Device, Tensor};
use moeq::distributed::group::{Layout, Subgroup};
use moeq::distributed::store::{StoreClient, StoreOptions, StoreServer};
use moeq::distributed::{Communicator, TcpComm};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const WORLD: usize = 6;

/// Rank `r`'s random values for collective `k`.
fn values(r: usize, k: u64, n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 * k + r as u64);
    (0..n).map(|_| rng.random_range(-3.0..3.0)).collect()
}

/// The sum of `members`' values in member order, from zero, in f32.
fn sum_of(members: &[usize], k: u64, n: usize) -> Vec<f32> {
    let mut acc = vec![0f32; n];
    for &m in members {
        for (a, v) in acc.iter_mut().zip(values(m, k, n)) {
            *a += v;
        }
    }
    acc
}

fn on_rank(r: usize, world: Arc<dyn Communicator>) {
    let layout = Layout::new(3, WORLD).unwrap();
    let (members, replicas) = (layout.group_of(r), layout.replicas_of(r));
    let group = Subgroup::new(world.clone(), members.clone()).unwrap();
    let copies = Subgroup::new(world, replicas.clone()).unwrap();
    assert_eq!((group.rank(), group.world_size()), (r % 3, 3));
    assert_eq!((copies.rank(), copies.world_size()), (r / 3, 2));
    let dev = Device::Cpu;

    // Sums: 16 values over 3 members (pieces of 6, 6, 4), 5 over 2 (3, 2), 2 over 3 (a member
    // with an empty piece).
    for (comm, ranks, k, n) in [
        (&group, &members, 1, 16),
        (&copies, &replicas, 2, 5),
        (&group, &members, 3, 2),
    ] {
        let x = Tensor::from_vec(values(r, k, n), n, &dev).unwrap();
        let got: Vec<f32> = comm.all_reduce_sum(&x).unwrap().to_vec1().unwrap();
        assert_eq!(got, sum_of(ranks, k, n), "rank {r}, sum {k}");
    }
    // A 2-D tensor keeps its shape.
    let x = Tensor::from_vec(values(r, 4, 12), (4, 3), &dev).unwrap();
    let got = group.all_reduce_sum(&x).unwrap();
    assert_eq!(got.dims(), &[4, 3]);

    // All-to-all: member i sends i + j + 1 rows of 2 values to member j, each row
    // [sender, row index].
    let me = group.rank();
    let send: Vec<usize> = (0..3).map(|j| me + j + 1).collect();
    let recv: Vec<usize> = (0..3).map(|i| i + me + 1).collect();
    let rows: Vec<f32> = send
        .iter()
        .flat_map(|&n| (0..n).flat_map(|k| [r as f32, k as f32]))
        .collect();
    let x = Tensor::from_vec(rows, (send.iter().sum::<usize>(), 2), &dev).unwrap();
    let got = group
        .all_to_all(&x, &send, &recv)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want: Vec<Vec<f32>> = recv
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| {
            let sender = members[i] as f32;
            (0..n).map(move |k| vec![sender, k as f32])
        })
        .collect();
    assert_eq!(got, want, "rank {r}: all_to_all");

    // All-gather and broadcast within the replica group.
    let x = Tensor::new(&[r as f32], &dev).unwrap();
    let parts: Vec<f32> = copies
        .all_gather(&x)
        .unwrap()
        .iter()
        .map(|t| t.to_vec1::<f32>().unwrap()[0])
        .collect();
    assert_eq!(
        parts,
        replicas.iter().map(|&m| m as f32).collect::<Vec<_>>()
    );
    let b = group.broadcast(&x, 1).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(b, vec![members[1] as f32], "rank {r}: broadcast");
    group.barrier().unwrap();
}

#[test]
fn group_collectives_with_every_group_at_once() {
    let token = "groups";
    let server = StoreServer::start("127.0.0.1:0", StoreOptions::new(WORLD, token)).unwrap();
    let addr = server.addr.to_string();
    let handles: Vec<_> = (0..WORLD)
        .map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c =
                    StoreClient::connect(&addr, token, r as u32, Duration::from_secs(5)).unwrap();
                on_rank(r, Arc::new(TcpComm::new(c, r)))
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn layouts_split_neighbours_into_groups() {
    let l = Layout::new(2, 8).unwrap();
    assert_eq!(l.group_of(5), vec![4, 5]);
    assert_eq!(l.replicas_of(5), vec![1, 3, 5, 7]);
    let one = Layout::new(8, 8).unwrap();
    assert_eq!(one.group_of(3), (0..8).collect::<Vec<_>>());
    assert_eq!(one.replicas_of(3), vec![3]);
    for (size, world) in [(4, 6), (0, 4), (8, 4)] {
        let e = Layout::new(size, world).err().unwrap();
        assert!(
            e.starts_with(&format!(
                "expert_parallel_size {size} does not divide the {world} ranks"
            )),
            "{e}"
        );
    }
}
