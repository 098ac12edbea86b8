//! The rendezvous store (DESIGN decision 10): rank 0 hosts it at the master address; every
//! rank connects, presents the job token, and uses it for key/value, barriers, the exchange
//! of byte chunks the CPU collective is built on (`comm::TcpComm`), the NCCL unique id, and
//! heartbeats.
//!
//! Failure is sticky: when a rank reports a failure, or a rank's connection closes without
//! saying goodbye (its process died), or its heartbeats stop, the job is marked failed with
//! a message naming that rank; every waiting and later request of every rank gets that
//! message, so all ranks stop with the same first cause.
//!
//! Wire format, both directions: frames `[len: u32 LE][body]`, `len <= max_frame`. A request
//! body is `[op: u8]` then fields `[n: u32 LE][n bytes]`; a reply is `[status: u8]` (0 ok,
//! 1 error) then fields. The first request of a connection must be `Hello(token, rank)`.
//! An oversized frame, an unknown op, malformed fields or a wrong token get an error reply
//! and the connection is closed; the store and its other connections carry on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// Default frame limit: large enough for the CPU collective's payloads in tests and CPU runs.
pub const MAX_FRAME: usize = 256 << 20;
/// Rank number of a connection that is not a rank (the launcher, monitoring).
pub const OBSERVER: u32 = u32::MAX;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum StoreError {
    /// The job failed (first cause), or the store refused the request.
    #[error("{0}")]
    Remote(String),
    #[error("rendezvous store at {addr}: {problem}")]
    Connection { addr: String, problem: String },
    #[error("timed out after {secs:.0} s waiting for {what} (a rank is slow, hung or dead; MOEQ_COLLECTIVE_TIMEOUT sets the limit)")]
    Timeout { secs: f64, what: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    Set = 2,
    Get = 3,
    Add = 4,
    Exchange = 5,
    Heartbeat = 6,
    Fail = 7,
    Bye = 8,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::Set,
            3 => Op::Get,
            4 => Op::Add,
            5 => Op::Exchange,
            6 => Op::Heartbeat,
            7 => Op::Fail,
            8 => Op::Bye,
            _ => return None,
        })
    }
}

fn encode(head: u8, fields: &[&[u8]]) -> Vec<u8> {
    let body: usize = 1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(head);
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Splits a frame body after its head byte into fields; None when malformed.
fn decode(body: &[u8]) -> Option<(u8, Vec<Vec<u8>>)> {
    let (&head, mut rest) = body.split_first()?;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let f = rest.get(4..4 + n)?;
        fields.push(f.to_vec());
        rest = &rest[4 + n..];
    }
    Some((head, fields))
}

fn u64_field(f: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(f.try_into().ok()?))
}

/// Options of the store server.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub world_size: usize,
    pub token: String,
    pub max_frame: usize,
    /// A rank whose last heartbeat is older than this fails the job.
    pub heartbeat_timeout: Duration,
    /// Every rank must have connected within this time of the store's start.
    pub join_timeout: Duration,
}

impl StoreOptions {
    pub fn new(world_size: usize, token: &str) -> StoreOptions {
        StoreOptions {
            world_size,
            token: token.to_string(),
            max_frame: MAX_FRAME,
            heartbeat_timeout: Duration::from_secs(60),
            join_timeout: Duration::from_secs(300),
        }
    }
}

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
    // Handshake: Hello(token, rank).
    let rank = match read_frame(&mut s, max).await {
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

/// A blocking connection to the store.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    rank: u32,
    world: usize,
    token: String,
    /// Set by `finish`: dropping the client then says goodbye instead of reporting a failure.
    clean: bool,
    seq: u64,
    timeout: Duration,
    max_frame: usize,
    heartbeat: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

/// Connects and says hello; returns the stream and the job's world size.
fn connect_once(
    addr: &str,
    token: &str,
    rank: u32,
    max_frame: usize,
) -> Result<(TcpStream, usize), StoreError> {
    let conn_err = |problem: String| StoreError::Connection {
        addr: addr.to_string(),
        problem,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| conn_err(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| conn_err("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| conn_err(e.to_string()))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| conn_err(e.to_string()))?;
    s.write_all(&encode(
        Op::Hello as u8,
        &[token.as_bytes(), &rank.to_le_bytes()],
    ))
    .map_err(|e| conn_err(e.to_string()))?;
    let f = read_reply(&mut s, addr, max_frame, "the handshake", 30.0)?;
    let world = f
        .first()
        .and_then(|w| u64_field(w))
        .ok_or_else(|| conn_err("malformed handshake reply".into()))?;
    Ok((s, world as usize))
}

fn read_reply(
    s: &mut TcpStream,
    addr: &str,
    max_frame: usize,
    what: &str,
    secs: f64,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut len = [0u8; 4];
    let io = |e: std::io::Error| -> StoreError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => StoreError::Timeout {
                secs,
                what: what.to_string(),
            },
            _ => StoreError::Connection {
                addr: addr.to_string(),
                problem: format!(
                    "lost during {what}: {e} (the store lives in rank 0: did it stop?)"
                ),
            },
        }
    };
    s.read_exact(&mut len).map_err(io)?;
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > max_frame.max(1 << 20) {
        return Err(StoreError::Connection {
            addr: addr.to_string(),
            problem: format!("reply of {n} bytes"),
        });
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).map_err(io)?;
    let (status, fields) = decode(&body).ok_or_else(|| StoreError::Connection {
        addr: addr.to_string(),
        problem: "malformed reply".into(),
    })?;
    if status == 0 {
        Ok(fields)
    } else {
        Err(StoreError::Remote(
            fields
                .first()
                .map(|m| String::from_utf8_lossy(m).to_string())
                .unwrap_or_default(),
        ))
    }
}

impl StoreClient {
    /// Connects as `rank` (or `OBSERVER`), retrying until `wait` has passed: ranks start in
    /// any order and rank 0 may not be listening yet. A refused token is not retried.
    pub fn connect(
        addr: &str,
        token: &str,
        rank: u32,
        wait: Duration,
    ) -> Result<StoreClient, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            match connect_once(addr, token, rank, MAX_FRAME) {
                Ok((stream, world)) => {
                    return Ok(StoreClient {
                        stream,
                        world,
                        token: token.to_string(),
                        clean: false,
                        addr: addr.to_string(),
                        rank,
                        seq: 0,
                        timeout: Duration::from_secs(300),
                        max_frame: MAX_FRAME,
                        heartbeat: None,
                    })
                }
                Err(e @ StoreError::Remote(_)) => return Err(e),
                Err(e) if Instant::now() >= deadline => {
                    return Err(match e {
                        StoreError::Connection { addr, problem } => StoreError::Connection {
                            addr,
                            problem: format!("{problem} (after {:.0} s of retries: is rank 0 running and MASTER_ADDR/MASTER_PORT right?)", wait.as_secs_f64()),
                        },
                        other => other,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// How long a request may wait for the other ranks (the collective timeout).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn request(
        &mut self,
        op: Op,
        fields: &[&[u8]],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let frame = encode(op as u8, fields);
        if frame.len() - 4 > self.max_frame {
            return Err(StoreError::Remote(format!(
                "{what}: {} bytes exceed the store's frame limit of {}",
                frame.len(),
                self.max_frame
            )));
        }
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        self.stream
            .write_all(&frame)
            .map_err(|e| StoreError::Connection {
                addr: self.addr.clone(),
                problem: format!(
                    "lost during {what}: {e} (the store lives in rank 0: did it stop?)"
                ),
            })?;
        read_reply(
            &mut self.stream,
            &self.addr,
            self.max_frame,
            what,
            self.timeout.as_secs_f64(),
        )
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.request(Op::Set, &[key.as_bytes(), value], &format!("set '{key}'"))
            .map(|_| ())
    }

    /// The value of `key`, waiting until some rank sets it.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        let mut f = self.request(Op::Get, &[key.as_bytes()], &format!("key '{key}'"))?;
        f.pop()
            .ok_or_else(|| StoreError::Remote("get: empty reply".into()))
    }

    /// Adds `delta` to the counter `key` and returns the new value.
    pub fn add(&mut self, key: &str, delta: u64) -> Result<u64, StoreError> {
        let f = self.request(
            Op::Add,
            &[key.as_bytes(), &delta.to_le_bytes()],
            &format!("add '{key}'"),
        )?;
        f.first()
            .and_then(|v| u64_field(v))
            .ok_or_else(|| StoreError::Remote("add: malformed reply".into()))
    }

    /// Sends `chunks[d]` to rank d and returns what every rank sent to this one, in rank
    /// order. Every rank must call the same exchanges in the same order; `name` catches
    /// ranks that do not.
    pub fn exchange(&mut self, name: &str, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.seq += 1;
        let seq = self.seq.to_le_bytes();
        let mut fields: Vec<&[u8]> = vec![&seq, name.as_bytes()];
        fields.extend_from_slice(chunks);
        self.request(Op::Exchange, &fields, name)
    }

    pub fn barrier(&mut self, name: &str) -> Result<(), StoreError> {
        let empty: Vec<&[u8]> = vec![&[]; self.world];
        self.exchange(&format!("barrier {name}"), &empty)
            .map(|_| ())
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Tells the store (and so every rank) that this rank failed, on a connection of its own
    /// (the main one may be waiting in a collective).
    pub fn fail(&self, msg: &str) {
        if let Ok((mut s, _)) = connect_once(&self.addr, &self.token, self.rank, MAX_FRAME) {
            let _ = s.write_all(&encode(Op::Fail as u8, &[msg.as_bytes()]));
            let _ = read_reply(&mut s, &self.addr, MAX_FRAME, "a failure report", 5.0);
        }
    }

    /// This rank's work is done: dropping the client is a goodbye, not a failure.
    pub fn finish(&mut self) {
        self.clean = true;
    }

    /// Starts a thread that sends a heartbeat every `every` on its own connection. With
    /// `watch`, the thread is also the rank's watchdog: when the job has failed (the store
    /// answers a heartbeat with the first cause), when the store is gone, or when this rank
    /// made no progress within the watch's limit (it reports that to the store first), it
    /// prints the cause and ends the process with exit code 1 — the main thread may be stuck
    /// in a collective that will never complete.
    pub fn start_heartbeat(
        &mut self,
        token: &str,
        every: Duration,
        watch: Option<&'static Watch>,
    ) -> Result<(), StoreError> {
        let (mut s, _) = connect_once(&self.addr, token, self.rank, MAX_FRAME)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let addr = self.addr.clone();
        let t = std::thread::Builder::new()
            .name("moeq-heartbeat".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let sent = s.write_all(&encode(Op::Heartbeat as u8, &[]));
                    let reply = sent
                        .map_err(|e| StoreError::Connection {
                            addr: addr.clone(),
                            problem: e.to_string(),
                        })
                        .and_then(|_| read_reply(&mut s, &addr, MAX_FRAME, "a heartbeat", 30.0));
                    if flag.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match (reply, watch) {
                        (Ok(_), Some(w)) => {
                            if let Some(stalled) = w.stalled() {
                                let msg = format!(
                                    "no progress for {:.0} s (stuck in a collective or a kernel)",
                                    stalled.as_secs_f64()
                                );
                                let _ = s.write_all(&encode(Op::Fail as u8, &[msg.as_bytes()]));
                                let cause =
                                    read_reply(&mut s, &addr, MAX_FRAME, "a failure report", 5.0)
                                        .and_then(|_| {
                                            let _ = s.write_all(&encode(Op::Heartbeat as u8, &[]));
                                            read_reply(&mut s, &addr, MAX_FRAME, "a heartbeat", 5.0)
                                        });
                                match cause {
                                    Err(StoreError::Remote(first)) => w.exit(&first),
                                    _ => w.exit(&format!("rank {}: {msg}", w.rank())),
                                }
                            }
                        }
                        (Ok(_), None) => {}
                        (Err(StoreError::Remote(msg)), Some(w)) => w.exit(&msg),
                        (Err(e), Some(w)) => w.exit(&format!("lost the rendezvous store: {e}")),
                        (Err(_), None) => return,
                    }
                    let until = Instant::now() + every;
                    while Instant::now() < until && !flag.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                let _ = s.write_all(&encode(Op::Bye as u8, &[]));
                let _ = read_reply(&mut s, &addr, MAX_FRAME, "goodbye", 5.0);
            })
            .map_err(|e| StoreError::Connection {
                addr: self.addr.clone(),
                problem: e.to_string(),
            })?;
        self.heartbeat = Some((stop, t));
        Ok(())
    }
}

impl Drop for StoreClient {
    fn drop(&mut self) {
        // Without `finish` (an error, a panic) leaving is a failure: the other ranks must not
        // wait for this one. Observers just leave.
        if !self.clean && self.rank != OBSERVER {
            self.fail(&format!(
                "rank {} stopped before finishing its work",
                self.rank
            ));
        }
        // A goodbye: the store does not count this rank as dead.
        if let Some((stop, t)) = self.heartbeat.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(5)));
        if self.stream.write_all(&encode(Op::Bye as u8, &[])).is_ok() {
            let mut len = [0u8; 4];
            let _ = self.stream.read(&mut len);
        }
    }
}

/// A rank's progress clock, read by its heartbeat thread (see `StoreClient::start_heartbeat`).
/// The trainer calls `progress` as it completes work and sets the allowed gap with `limit`.
pub struct Watch {
    rank: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `origin` at the last progress.
    last_ms: std::sync::atomic::AtomicU64,
    /// Allowed gap in milliseconds; 0: not watching.
    limit_ms: std::sync::atomic::AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

/// This process's watch.
pub static WATCH: Watch = Watch {
    rank: std::sync::atomic::AtomicUsize::new(0),
    last_ms: std::sync::atomic::AtomicU64::new(0),
    limit_ms: std::sync::atomic::AtomicU64::new(0),
    origin: std::sync::OnceLock::new(),
};

impl Watch {
    fn now_ms(&self) -> u64 {
        self.origin.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub fn set_rank(&self, rank: usize) {
        self.rank.store(rank, std::sync::atomic::Ordering::Relaxed);
    }

    fn rank(&self) -> usize {
        self.rank.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Work completed now.
    pub fn progress(&self) {
        self.last_ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on, a gap longer than `limit` between progress calls is a hang.
    pub fn limit(&self, limit: Duration) {
        self.progress();
        self.limit_ms.store(
            limit.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Stops watching (long I/O); returns the limit to give back to `resume`.
    pub fn pause(&self) -> u64 {
        self.limit_ms.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Watches again with the limit `pause` returned, from now.
    pub fn resume(&self, limit_ms: u64) {
        self.progress();
        self.limit_ms
            .store(limit_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The gap since the last progress, when it exceeds the limit.
    fn stalled(&self) -> Option<Duration> {
        let limit = self.limit_ms.load(std::sync::atomic::Ordering::Relaxed);
        let gap = self
            .now_ms()
            .saturating_sub(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        (limit > 0 && gap > limit).then(|| Duration::from_millis(gap))
    }

    fn exit(&self, msg: &str) -> ! {
        eprintln!("error: rank {}: job stopped: {msg}", self.rank());
        std::process::exit(1)
    }
}
