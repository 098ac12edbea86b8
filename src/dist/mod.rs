//! Distribution: who this process is (rank, world, master) — launcher, rendezvous,
//! communicators and expert dispatch come with the distributed work.

pub mod env;

pub use env::{expand_hostlist, resolve, DistEnv, DistError, EnvSource, RankFlags};
