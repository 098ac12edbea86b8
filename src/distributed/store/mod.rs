//! The rendezvous store (docs/ARCHITECTURE.md, decision 10): rank 0 hosts it at the master address; every
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
//!
//! `server` is the store (tokio), `client` the blocking connection every rank holds, `watch` the
//! progress clock its heartbeat thread checks.

mod client;
mod server;
mod watch;

pub use client::StoreClient;
pub use server::StoreServer;
pub use watch::{on_exit, run_exit_hooks, ExitHook, Watch, WATCH};

use std::time::Duration;

/// Default frame limit: large enough for the CPU collective's payloads in tests and CPU runs.
pub const MAX_FRAME: usize = 256 << 20;
/// The largest first frame of a connection (the hello: job token and rank). Until the token is
/// checked, nothing larger is read, so a stranger costs the store at most this much memory.
pub const HELLO_MAX_FRAME: usize = 64 << 10;
/// Connections that have not passed the token check yet, at most; more are closed at once
/// (a rank's client retries until its rendezvous timeout).
pub const MAX_UNAUTHENTICATED: usize = 64;
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
    /// A connection must send its hello within this time, or it is closed.
    pub hello_timeout: Duration,
}

impl StoreOptions {
    pub fn new(world_size: usize, token: &str) -> StoreOptions {
        StoreOptions {
            world_size,
            token: token.to_string(),
            max_frame: MAX_FRAME,
            heartbeat_timeout: Duration::from_secs(60),
            join_timeout: Duration::from_secs(300),
            hello_timeout: Duration::from_secs(10),
        }
    }
}
