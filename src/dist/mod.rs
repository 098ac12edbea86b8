//! Distribution: who this process is (`env`), the rendezvous store (`store`), collectives
//! (`comm`), and the launcher's logic (`launch`).

pub mod comm;
pub mod env;
pub mod launch;
pub mod store;

pub use comm::{Communicator, Solo, TcpComm};
pub use env::{expand_hostlist, resolve, DistEnv, DistError, EnvSource, RankFlags};
