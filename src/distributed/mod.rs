//! Distribution: who this process is (`env`), the rendezvous store (`store`), collectives
//! (`comm`; `nccl` with the `nccl` feature; among some ranks: `group`), and the launcher's
//! logic (`launch`).

pub mod comm;
pub mod dispatch;
pub mod env;
pub mod group;
pub mod job;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod store;

pub use comm::{Communicator, Solo, TcpComm};
pub use env::{expand_hostlist, resolve, DistEnv, DistError, EnvSource, RankFlags};
pub use job::RankCtx;
