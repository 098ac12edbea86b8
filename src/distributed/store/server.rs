//! The store server: one tokio task per connection, shared state behind a mutex, a watchdog
//! task for heartbeats and joining.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

type Reply = Result<Vec<Vec<u8>>, String>;

struct Pending {
    name: String,
    chunks: Vec<Option<Vec<Vec<u8>>>>,
    waiters: Vec<Option<oneshot::Sender<Reply>>>,
}

#[derive(Default)]
struct State {
    kv: HashMap<String, Vec<u8>>,
    kv_waiters: HashMap<String, Vec<oneshot::Sender<Reply>>>,
    exchanges: HashMap<u64, Pending>,
    failed: Option<String>,
    /// Last heartbeat of the ranks that send them.
    last_seen: HashMap<u32, Instant>,
    left: Vec<bool>,
    /// Ranks that have connected.
    joined: std::collections::BTreeSet<u32>,
}

impl State {
    /// Marks the job failed (the first cause wins) and answers every waiter with it.
    fn fail(&mut self, msg: String) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!("job failed: {msg}");
        self.failed = Some(msg.clone());
        for (_, waiters) in self.kv_waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(msg.clone()));
            }
        }
        for (_, p) in self.exchanges.drain() {
            for w in p.waiters.into_iter().flatten() {
                let _ = w.send(Err(msg.clone()));
            }
        }
    }
}

struct Shared {
    opts: StoreOptions,
    state: Mutex<State>,
    /// Connections not yet past the token check (at most `MAX_UNAUTHENTICATED`).
    unauthenticated: AtomicUsize,
}

/// Holds one of the `MAX_UNAUTHENTICATED` places until the hello is answered.
struct Unauthenticated<'a>(&'a AtomicUsize);

impl<'a> Unauthenticated<'a> {
    fn enter(count: &'a AtomicUsize) -> Option<Unauthenticated<'a>> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_UNAUTHENTICATED).then_some(n + 1)
            })
            .ok()
            .map(|_| Unauthenticated(count))
    }
}

impl Drop for Unauthenticated<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running store; dropping it stops the server.
pub struct StoreServer {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `addr` (host:port; port 0 picks a free one) and serves on a background thread.
    pub fn start(addr: &str, opts: StoreOptions) -> Result<StoreServer, StoreError> {
        let conn_err = |problem: String| StoreError::Connection {
            addr: addr.to_string(),
            problem,
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(|e| {
            conn_err(format!(
                "cannot listen: {e} (is another job using this port? set MASTER_PORT)"
            ))
        })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| conn_err(e.to_string()))?;
        let local = std_listener
            .local_addr()
            .map_err(|e| conn_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                left: vec![false; opts.world_size],
                ..State::default()
            }),
            opts,
            unauthenticated: AtomicUsize::new(0),
        });
        let (tx, rx) = oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("moeq-store".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("rendezvous store: cannot start its runtime: {e}");
                        return;
                    }
                };
                rt.block_on(serve(std_listener, s, rx));
            })
            .map_err(|e| conn_err(e.to_string()))?;
        Ok(StoreServer {
            addr: local,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Waits until every rank said goodbye (or the job failed, or `timeout` passed), so the
    /// host does not pull the store from under ranks finishing their last requests.
    pub fn wait_all_left(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            {
                let st = self.shared.state();
                if st.left.iter().all(|&l| l) {
                    return;
                }
                if st.failed.is_some() {
                    drop(st);
                    // Long enough for every rank's next heartbeat to fetch the cause.
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The job's failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.state().failed.clone()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("rendezvous store: {e}");
            return;
        }
    };
    let watchdog = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let started = Instant::now();
            loop {
                tick.tick().await;
                let mut st = shared.state();
                let world = shared.opts.world_size;
                if st.joined.len() < world && started.elapsed() > shared.opts.join_timeout {
                    let missing: Vec<usize> = (0..world)
                        .filter(|r| !st.joined.contains(&(*r as u32)))
                        .collect();
                    st.fail(format!(
                        "ranks {missing:?} did not join within {} s (did they fail to start? MOEQ_RENDEZVOUS_TIMEOUT sets the limit)",
                        shared.opts.join_timeout.as_secs()
                    ));
                }
                let limit = shared.opts.heartbeat_timeout;
                let stale = st
                    .last_seen
                    .iter()
                    .filter(|(&r, _)| !st.left.get(r as usize).copied().unwrap_or(true))
                    .find(|(_, t)| t.elapsed() > limit)
                    .map(|(&r, _)| r);
                if let Some(r) = stale {
                    st.fail(format!(
                        "rank {r} sent no heartbeat for {} s (host down or process stopped)",
                        limit.as_secs()
                    ));
                }
            }
        })
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, shared.clone()));
                }
            }
        }
    }
    watchdog.abort();
}

async fn read_frame(
    s: &mut tokio::net::TcpStream,
    max_frame: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > max_frame || n == 0 {
        return Err(format!("frame of {n} bytes refused (limit {max_frame})"));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(Some(body))
}

async fn reply(s: &mut tokio::net::TcpStream, r: Reply) -> bool {
    let frame = match &r {
        Ok(fields) => encode(0, &fields.iter().map(|f| f.as_slice()).collect::<Vec<_>>()),
        Err(msg) => encode(1, &[msg.as_bytes()]),
    };
    s.write_all(&frame).await.is_ok()
}

fn token_matches(given: &[u8], want: &str) -> bool {
    let want = want.as_bytes();
    let mut diff = (given.len() != want.len()) as u8;
    for (i, &w) in want.iter().enumerate() {
        diff |= w ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn connection(mut s: tokio::net::TcpStream, shared: Arc<Shared>) {
    let max = shared.opts.max_frame;
    // Handshake: Hello(token, rank). Until the token is checked, a connection holds one of a
    // few places, may send one small frame, and has `hello_timeout` to do it.
    let Some(place) = Unauthenticated::enter(&shared.unauthenticated) else {
        return;
    };
    let hello = tokio::time::timeout(
        shared.opts.hello_timeout,
        read_frame(&mut s, HELLO_MAX_FRAME.min(max)),
    )
    .await
    .unwrap_or_else(|_| Err("no hello within the time allowed".into()));
    let rank = match hello {
        Ok(Some(body)) => match decode(&body) {
            Some((op, f)) if op == Op::Hello as u8 && f.len() == 2 && f[1].len() == 4 => {
                if !token_matches(&f[0], &shared.opts.token) {
                    let _ = reply(&mut s, Err("wrong job token (MOEQ_JOB_TOKEN must be the same for every rank of the job)".into())).await;
                    return;
                }
                let rank = u32::from_le_bytes([f[1][0], f[1][1], f[1][2], f[1][3]]);
                if rank != OBSERVER && rank as usize >= shared.opts.world_size {
                    let _ = reply(
                        &mut s,
                        Err(format!(
                            "rank {rank} outside the world of {}",
                            shared.opts.world_size
                        )),
                    )
                    .await;
                    return;
                }
                if rank != OBSERVER {
                    shared.state().joined.insert(rank);
                }
                let world = (shared.opts.world_size as u64).to_le_bytes().to_vec();
                if !reply(&mut s, Ok(vec![world])).await {
                    return;
                }
                rank
            }
            _ => {
                let _ = reply(
                    &mut s,
                    Err("expected a hello frame with the job token".into()),
                )
                .await;
                return;
            }
        },
        Ok(None) => return,
        Err(e) => {
            let _ = reply(&mut s, Err(e)).await;
            return;
        }
    };
    drop(place);
    let mut said_bye = false;
    loop {
        let body = match read_frame(&mut s, max).await {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                let _ = reply(&mut s, Err(e)).await;
                break;
            }
        };
        let Some((op, fields)) = decode(&body) else {
            let _ = reply(&mut s, Err("malformed frame".into())).await;
            break;
        };
        let r = match Op::from_u8(op) {
            Some(Op::Bye) => {
                said_bye = true;
                if rank != OBSERVER {
                    let mut st = shared.state();
                    st.last_seen.remove(&rank);
                    if let Some(l) = st.left.get_mut(rank as usize) {
                        *l = true;
                    }
                }
                let _ = reply(&mut s, Ok(vec![])).await;
                break;
            }
            Some(Op::Heartbeat) => {
                let mut st = shared.state();
                if rank != OBSERVER {
                    st.last_seen.insert(rank, Instant::now());
                }
                // The reply carries the job's failure, so a rank stuck elsewhere learns it.
                match &st.failed {
                    Some(msg) => Err(msg.clone()),
                    None => Ok(vec![]),
                }
            }
            Some(op) => match handle(&shared, rank, op, fields) {
                Handled::Now(r) => r,
                Handled::Later(rx) => rx.await.unwrap_or_else(|_| Err("store shut down".into())),
                Handled::Reject(msg) => {
                    let _ = reply(&mut s, Err(msg)).await;
                    break;
                }
            },
            None => {
                let _ = reply(&mut s, Err(format!("unknown request {op}"))).await;
                break;
            }
        };
        if !reply(&mut s, r).await {
            break;
        }
    }
    if rank != OBSERVER && !said_bye {
        let mut st = shared.state();
        if !st.left.get(rank as usize).copied().unwrap_or(true) {
            st.fail(format!(
                "rank {rank} lost its connection to the store (the process died or was killed)"
            ));
        }
    }
}

enum Handled {
    Now(Reply),
    Later(oneshot::Receiver<Reply>),
    /// Malformed request: answer and close the connection.
    Reject(String),
}

fn handle(shared: &Shared, rank: u32, op: Op, f: Vec<Vec<u8>>) -> Handled {
    let mut st = shared.state();
    if let Some(msg) = &st.failed {
        return Handled::Now(Err(msg.clone()));
    }
    let key = |f: &[Vec<u8>]| f.first().and_then(|k| String::from_utf8(k.clone()).ok());
    match op {
        Op::Set => match (key(&f), f.get(1)) {
            (Some(k), Some(v)) => {
                for w in st.kv_waiters.remove(&k).unwrap_or_default() {
                    let _ = w.send(Ok(vec![v.clone()]));
                }
                st.kv.insert(k, v.clone());
                Handled::Now(Ok(vec![]))
            }
            _ => Handled::Reject("set: expected key and value".into()),
        },
        Op::Get => match key(&f) {
            Some(k) => match st.kv.get(&k) {
                Some(v) => Handled::Now(Ok(vec![v.clone()])),
                None => {
                    let (tx, rx) = oneshot::channel();
                    st.kv_waiters.entry(k).or_default().push(tx);
                    Handled::Later(rx)
                }
            },
            None => Handled::Reject("get: expected a key".into()),
        },
        Op::Add => match (key(&f), f.get(1).and_then(|v| u64_field(v))) {
            (Some(k), Some(delta)) => {
                let old = st.kv.get(&k).and_then(|v| u64_field(v)).unwrap_or(0);
                let new = old.wrapping_add(delta).to_le_bytes().to_vec();
                st.kv.insert(k, new.clone());
                Handled::Now(Ok(vec![new]))
            }
            _ => Handled::Reject("add: expected key and an 8-byte delta".into()),
        },
        Op::Fail => {
            let msg = f
                .first()
                .map(|m| String::from_utf8_lossy(m).to_string())
                .unwrap_or_default();
            let who = if rank == OBSERVER {
                "the launcher".to_string()
            } else {
                format!("rank {rank}")
            };
            // Name who the pending collectives still wait for: with a hung rank, that is it.
            let mut waiting: Vec<(u64, String, Vec<usize>)> = st
                .exchanges
                .iter()
                .map(|(seq, p)| {
                    let missing = (0..p.chunks.len())
                        .filter(|&r| p.chunks[r].is_none())
                        .collect();
                    (*seq, p.name.clone(), missing)
                })
                .collect();
            waiting.sort();
            let pending = match waiting.first() {
                Some((seq, name, missing)) => {
                    format!(" (collective #{seq} '{name}' is still waiting for ranks {missing:?})")
                }
                None => String::new(),
            };
            st.fail(format!("{who} failed: {msg}{pending}"));
            Handled::Now(Ok(vec![]))
        }
        Op::Exchange => exchange(shared, &mut st, rank, f),
        Op::Hello | Op::Heartbeat | Op::Bye => Handled::Reject("unexpected request".into()),
    }
}

/// Exchange `seq`: rank r sends `world` chunks (chunk d for rank d) and receives, once every
/// rank has sent, the chunks addressed to it in rank order. Fields: seq (8 bytes), name, then
/// the chunks.
fn exchange(shared: &Shared, st: &mut State, rank: u32, f: Vec<Vec<u8>>) -> Handled {
    let world = shared.opts.world_size;
    if rank == OBSERVER {
        return Handled::Reject("exchange: only ranks take part in collectives".into());
    }
    let (Some(seq), Some(name)) = (
        f.first().and_then(|s| u64_field(s)),
        f.get(1).map(|n| String::from_utf8_lossy(n).to_string()),
    ) else {
        return Handled::Reject("exchange: expected sequence number and name".into());
    };
    let mut chunks: Vec<Vec<u8>> = f.into_iter().skip(2).collect();
    // One chunk is for every rank (all-gather, broadcast): sent once, copied here.
    if chunks.len() == 1 && world > 1 {
        chunks = vec![chunks[0].clone(); world];
    }
    if chunks.len() != world {
        return Handled::Reject(format!(
            "exchange: {} chunks for a world of {world}",
            chunks.len()
        ));
    }
    let p = st.exchanges.entry(seq).or_insert_with(|| Pending {
        name: name.clone(),
        chunks: vec![None; world],
        waiters: (0..world).map(|_| None).collect(),
    });
    if p.name != name {
        let msg = format!(
            "collectives out of step: call #{seq} is '{}' on one rank and '{name}' on rank {rank}",
            p.name
        );
        st.fail(msg.clone());
        return Handled::Now(Err(msg));
    }
    if p.chunks[rank as usize].is_some() {
        return Handled::Reject(format!("exchange #{seq}: rank {rank} sent twice"));
    }
    p.chunks[rank as usize] = Some(chunks);
    let (tx, rx) = oneshot::channel();
    p.waiters[rank as usize] = Some(tx);
    if p.chunks.iter().all(|c| c.is_some()) {
        let Some(p) = st.exchanges.remove(&seq) else {
            return Handled::Now(Err("exchange vanished".into()));
        };
        let mut sent: Vec<Vec<Vec<u8>>> = p
            .chunks
            .into_iter()
            .map(|c| c.unwrap_or_default())
            .collect();
        for (dest, w) in p.waiters.into_iter().enumerate() {
            let incoming: Vec<Vec<u8>> = sent
                .iter_mut()
                .map(|from| std::mem::take(&mut from[dest]))
                .collect();
            if let Some(w) = w {
                let _ = w.send(Ok(incoming));
            }
        }
    }
    Handled::Later(rx)
}
