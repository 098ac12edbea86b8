//! The rendezvous store and the CPU collective over it, with real TCP connections on
//! loopback: token, frame limits and garbage, failure propagation, and the collectives'
//! results (uneven all-to-all splits, a rank that receives nothing, deterministic sums).

use candle_core::{DType, Device, Tensor};
use moeq::distributed::store::{
    StoreClient, StoreError, StoreOptions, StoreServer, HELLO_MAX_FRAME, MAX_FRAME,
    MAX_UNAUTHENTICATED, OBSERVER,
};
use moeq::distributed::{Communicator, TcpComm};
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn server(world: usize) -> StoreServer {
    StoreServer::start("127.0.0.1:0", StoreOptions::new(world, TOKEN)).unwrap()
}

fn client(s: &StoreServer, rank: u32) -> StoreClient {
    StoreClient::connect(&s.addr.to_string(), TOKEN, rank, Duration::from_secs(5)).unwrap()
}

/// Runs `f(rank, comm)` on `world` threads, each with its own connection; results by rank.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, TcpComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let s = server(world);
    let addr = s.addr.to_string();
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let (f, addr) = (f.clone(), addr.clone());
            std::thread::spawn(move || {
                let c =
                    StoreClient::connect(&addr, TOKEN, r as u32, Duration::from_secs(5)).unwrap();
                f(r, TcpComm::new(c, r))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn frame(head: u8, fields: &[&[u8]]) -> Vec<u8> {
    let body: usize = 1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = (body as u32).to_le_bytes().to_vec();
    out.push(head);
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Reads one reply frame: (status, first field as text); None when the connection closed.
fn read_reply(s: &mut TcpStream) -> Option<(u8, String)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    let text = if body.len() > 5 {
        String::from_utf8_lossy(&body[5..]).to_string()
    } else {
        String::new()
    };
    Some((body[0], text))
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn wrong_token_is_rejected_and_others_keep_working() {
    let s = server(2);
    let mut good = client(&s, 0);
    let bad = StoreClient::connect(
        &s.addr.to_string(),
        "not-the-token",
        1,
        Duration::from_secs(2),
    );
    match bad {
        Err(StoreError::Remote(msg)) => assert!(msg.contains("wrong job token"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a wrong token was accepted"),
    }
    // A token that is a prefix of the real one is wrong too.
    assert!(
        StoreClient::connect(&s.addr.to_string(), &TOKEN[..8], 1, Duration::from_secs(2)).is_err()
    );
    good.set("k", b"v").unwrap();
    assert_eq!(good.get("k").unwrap(), b"v");
    assert!(
        s.failure().is_none(),
        "a refused connection must not fail the job"
    );
}

#[test]
fn oversized_and_garbage_frames_are_refused_while_others_keep_working() {
    let mut opts = StoreOptions::new(2, TOKEN);
    opts.max_frame = 4096;
    let s = StoreServer::start("127.0.0.1:0", opts).unwrap();
    let addr = s.addr.to_string();
    let mut good = client(&s, 0);
    good.set("before", b"1").unwrap();

    // Oversized frame before the handshake.
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    let (status, msg) = read_reply(&mut raw).expect("an error reply");
    assert_eq!(status, 1);
    assert!(msg.contains("refused"), "{msg}");
    assert!(closed(&mut raw));

    // Random garbage.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let mut raw = TcpStream::connect(&addr).unwrap();
        let n = rng.random_range(1..64);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let _ = raw.write_all(&junk);
        let _ = raw.shutdown(std::net::Shutdown::Write);
        // The store closes the connection, after an error reply or at once.
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        // A reset (the store closed with junk unread) counts as closed.
        let _ = raw.read_to_end(&mut rest);
        assert!(rest.is_empty() || rest.get(4) == Some(&1), "{rest:?}");
    }

    // A valid handshake as an observer, then an unknown op, then a malformed field.
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&frame(1, &[TOKEN.as_bytes(), &OBSERVER.to_le_bytes()]))
        .unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 0);
    raw.write_all(&frame(99, &[b"x"])).unwrap();
    let (status, msg) = read_reply(&mut raw).unwrap();
    assert_eq!(status, 1);
    assert!(msg.contains("unknown request"), "{msg}");
    assert!(closed(&mut raw));
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&frame(1, &[TOKEN.as_bytes(), &OBSERVER.to_le_bytes()]))
        .unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 0);
    let mut bad = 6u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&[2, 200, 0, 0, 0, 1]); // set: a field claiming 200 bytes
    raw.write_all(&bad).unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 1);
    // Oversized after the handshake.
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&frame(1, &[TOKEN.as_bytes(), &OBSERVER.to_le_bytes()]))
        .unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 0);
    raw.write_all(&frame(2, &[b"big", &vec![0u8; 8192]]))
        .unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 1);

    // The good client and a new rank still work; nothing failed.
    assert_eq!(good.get("before").unwrap(), b"1");
    let mut other = client(&s, 1);
    other.set("after", b"2").unwrap();
    assert_eq!(good.get("after").unwrap(), b"2");
    assert_eq!(good.add("n", 3).unwrap(), 3);
    assert_eq!(other.add("n", 4).unwrap(), 7);
    assert!(s.failure().is_none(), "{:?}", s.failure());
    // Rank numbers outside the world are refused.
    assert!(StoreClient::connect(&addr, TOKEN, 2, Duration::from_secs(1)).is_err());
}

/// This process's resident memory in bytes (/proc/self/statm: pages).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Nothing before the token check costs the store memory: strangers that declare big first
/// frames (and send their bodies), that say nothing, or that come in crowds are refused or
/// closed, the store's memory stays flat, and the ranks of the job keep working.
#[test]
fn strangers_cost_the_store_nothing_before_the_token() {
    let mut opts = StoreOptions::new(2, TOKEN);
    opts.hello_timeout = Duration::from_secs(2);
    let s = StoreServer::start("127.0.0.1:0", opts).unwrap();
    let addr = s.addr.to_string();
    let mut good = client(&s, 0);
    good.set("before", b"1").unwrap();
    let body = std::sync::Arc::new(vec![7u8; 8 << 20]);
    let before = resident_bytes();

    // 10 connections each declaring a 50 MB first frame (allowed after the hello, not before)
    // and sending 8 MB of it. The store refuses at the length and reads none of the body; had
    // it read them, the 80 MB would sit in this process until the hello timeout. Measured
    // while the strangers wait for their answer.
    const { assert!(50 << 20 < MAX_FRAME && 50 << 20 > HELLO_MAX_FRAME) };
    let sent = std::sync::Arc::new(std::sync::Barrier::new(11));
    let measured = std::sync::Arc::new(std::sync::Barrier::new(11));
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let (addr, body) = (addr.clone(), body.clone());
            let (sent, measured) = (sent.clone(), measured.clone());
            std::thread::spawn(move || {
                let mut raw = TcpStream::connect(&addr).unwrap();
                raw.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                raw.write_all(&(50u32 << 20).to_le_bytes()).unwrap();
                // Refused: writing the rest fails part way (or is discarded).
                let _ = raw.write_all(&body);
                sent.wait();
                measured.wait();
                let mut rest = Vec::new();
                raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = raw.read_to_end(&mut rest);
                rest
            })
        })
        .collect();
    sent.wait();
    std::thread::sleep(Duration::from_millis(200));
    let grown = resident_bytes().saturating_sub(before);
    measured.wait();
    assert!(
        grown < 24 << 20,
        "resident memory grew by {} MB",
        grown >> 20
    );
    for h in handles {
        let rest = h.join().unwrap();
        // An error reply (status 1) or a reset: never accepted.
        let head = &rest[..rest.len().min(16)];
        assert!(rest.is_empty() || rest.get(4) == Some(&1), "{head:?}");
    }

    // Silent connections beyond the limit: all closed within the hello timeout, and a crowd
    // larger than the limit does not keep a rank out for long.
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..MAX_UNAUTHENTICATED + 20)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for raw in idle.iter_mut() {
        // Closed by the store, after an error reply or at once (a reset counts as closed).
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let end = raw.read_to_end(&mut rest);
        let timed_out = matches!(&end, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(!timed_out, "an idle stranger was kept open");
        assert!(rest.is_empty() || rest.get(4) == Some(&1), "{rest:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut other = client(&s, 1);
    other.set("after", b"2").unwrap();
    assert_eq!(good.get("after").unwrap(), b"2");
    assert_eq!(good.get("before").unwrap(), b"1");
    assert!(s.failure().is_none(), "{:?}", s.failure());
}

#[test]
fn get_waits_for_a_later_set() {
    let s = server(2);
    let addr = s.addr.to_string();
    let waiter = std::thread::spawn(move || {
        let mut c = StoreClient::connect(&addr, TOKEN, 1, Duration::from_secs(5)).unwrap();
        c.get("nccl_id").unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    client(&s, 0).set("nccl_id", &[1, 2, 3]).unwrap();
    assert_eq!(waiter.join().unwrap(), vec![1, 2, 3]);
}

#[test]
fn a_dead_rank_fails_every_waiting_rank_with_its_name() {
    let s = server(3);
    let addr = s.addr.to_string();
    let waiters: Vec<_> = (0..2)
        .map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = StoreClient::connect(&addr, TOKEN, r, Duration::from_secs(5)).unwrap();
                c.barrier("step").map(|_| ()).unwrap_err().to_string()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Rank 2 connects and vanishes without a goodbye (as a killed process does).
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&frame(1, &[TOKEN.as_bytes(), &2u32.to_le_bytes()]))
        .unwrap();
    assert_eq!(read_reply(&mut raw).unwrap().0, 0);
    let started = Instant::now();
    drop(raw);
    for w in waiters {
        let msg = w.join().unwrap();
        assert!(msg.contains("rank 2") && msg.contains("died"), "{msg}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Later requests get the same first cause.
    let mut late = client(&s, 0);
    let msg = late.barrier("again").unwrap_err().to_string();
    assert!(msg.contains("rank 2"), "{msg}");
}

#[test]
fn a_reported_failure_reaches_the_other_ranks() {
    let msgs = on_ranks(2, |r, comm| {
        if r == 1 {
            comm.abort("out of memory in step 3");
            String::new()
        } else {
            comm.barrier().unwrap_err().to_string()
        }
    });
    assert!(
        msgs[0].contains("rank 1 failed: out of memory in step 3"),
        "{}",
        msgs[0]
    );
}

#[test]
fn collectives_out_of_step_are_an_error_not_a_hang() {
    let msgs = on_ranks(2, |r, comm| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let res = if r == 0 {
            comm.all_reduce_sum(&x).map(|_| ())
        } else {
            comm.all_gather(&x).map(|_| ())
        };
        res.unwrap_err().to_string()
    });
    for m in msgs {
        assert!(m.contains("out of step"), "{m}");
    }
}

fn random(seed: u64, shape: &[usize]) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn all_reduce_is_deterministic_and_in_rank_order() {
    let world = 3;
    let sums = on_ranks(world, |r, comm| {
        comm.all_reduce_sum(&random(r as u64, &[5, 7]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    let mut want = random(0, &[5, 7]);
    for r in 1..world {
        want = (want + random(r as u64, &[5, 7])).unwrap();
    }
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for s in &sums {
        // Bit-for-bit: the same additions in the same order.
        assert_eq!(s, &want);
    }
}

#[test]
fn all_gather_and_broadcast_with_uneven_sizes() {
    let world = 3;
    let out = on_ranks(world, |r, comm| {
        let mine = random(10 + r as u64, &[r, 4]); // rank 0 has no rows
        let all = comm.all_gather(&mine).unwrap();
        let b = comm
            .broadcast(&random(if r == 2 { 99 } else { 0 }, &[2, 2]), 2)
            .unwrap();
        (all, b)
    });
    for (all, b) in out {
        assert_eq!(all.len(), world);
        for (r, t) in all.iter().enumerate() {
            assert_eq!(t.dims(), &[r, 4]);
            let want = random(10 + r as u64, &[r, 4]);
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            random(99, &[2, 2])
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

/// Row values encode (source rank, destination rank, index) so every row can be checked.
fn tagged(src: usize, send: &[usize]) -> Tensor {
    let mut v = Vec::new();
    for (d, &n) in send.iter().enumerate() {
        for i in 0..n {
            v.extend_from_slice(&[src as f32, d as f32, i as f32]);
        }
    }
    Tensor::from_vec(v, (send.iter().sum::<usize>(), 3), &Device::Cpu).unwrap()
}

#[test]
fn all_to_all_uneven_splits_and_a_rank_that_receives_nothing() {
    // send[s][d]: rows rank s sends to rank d. Rank 1 receives nothing; rank 2 sends nothing.
    let send = [
        vec![2, 0, 3, 1],
        vec![1, 0, 0, 4],
        vec![0, 0, 0, 0],
        vec![5, 0, 2, 2],
    ];
    let out = on_ranks(4, move |r, comm| {
        let send = [
            vec![2, 0, 3, 1],
            vec![1, 0, 0, 4],
            vec![0, 0, 0, 0],
            vec![5, 0, 2, 2],
        ];
        let recv: Vec<usize> = (0..4).map(|s| send[s][r]).collect();
        let got = comm
            .all_to_all(&tagged(r, &send[r]), &send[r], &recv)
            .unwrap();
        // And back again: the mirror returns the original rows.
        let back = comm.all_to_all(&got, &recv, &send[r]).unwrap();
        (
            got.to_vec2::<f32>().unwrap(),
            back.to_vec2::<f32>().unwrap(),
        )
    });
    for (r, (got, back)) in out.iter().enumerate() {
        let mut want = Vec::new();
        for (s, row) in send.iter().enumerate() {
            for i in 0..row[r] {
                want.push(vec![s as f32, r as f32, i as f32]);
            }
        }
        assert_eq!(got, &want, "rank {r}");
        assert_eq!(back, &tagged(r, &send[r]).to_vec2::<f32>().unwrap());
    }
    assert!(out[1].0.is_empty());
}

#[test]
fn exchange_counts_transposes_the_count_matrix() {
    let out = on_ranks(3, |r, comm| {
        let send: Vec<Vec<u64>> = (0..3).map(|d| vec![(10 * r + d) as u64; d + 1]).collect();
        comm.exchange_counts(&send).unwrap()
    });
    for (r, got) in out.iter().enumerate() {
        for (s, v) in got.iter().enumerate() {
            assert_eq!(v, &vec![(10 * s + r) as u64; r + 1]);
        }
    }
}

#[test]
fn a_rank_that_never_joins_fails_the_job_with_its_number() {
    let mut opts = StoreOptions::new(3, TOKEN);
    opts.join_timeout = Duration::from_millis(500);
    let s = StoreServer::start("127.0.0.1:0", opts).unwrap();
    let mut c0 = client(&s, 0);
    let _c1 = client(&s, 1);
    let started = Instant::now();
    let msg = c0.barrier("start").unwrap_err().to_string();
    assert!(msg.contains("ranks [2] did not join"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn leaving_without_finishing_is_a_failure_and_finishing_is_not() {
    let s = server(2);
    let mut c0 = client(&s, 0);
    let mut c1 = client(&s, 1);
    c1.finish();
    drop(c1);
    c0.set("still", b"fine").unwrap();
    assert!(s.failure().is_none(), "{:?}", s.failure());
    let c1 = client(&s, 1);
    drop(c1); // an error path: no finish
    let msg = c0.barrier("after").unwrap_err().to_string();
    assert!(msg.contains("rank 1 stopped before finishing"), "{msg}");
}
