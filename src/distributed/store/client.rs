//! The blocking connection a rank holds to the store, and its heartbeat thread.

use super::*;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

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
