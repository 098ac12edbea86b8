//! Resolving rank, local rank, world size, local world size and the master address, in this
//! order: explicit flags; torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); SLURM's (`SLURM_PROCID`, `SLURM_LOCALID`,
//! `SLURM_NTASKS`, `SLURM_NTASKS_PER_NODE`, `SLURM_NODEID`, master = first host of
//! `SLURM_JOB_NODELIST`); otherwise a single process. torchrun inside a SLURM allocation is
//! normal (its numbers differ from SLURM's), so torchrun's variables win without complaint;
//! a set that is incomplete or contradicts itself is an error naming the variables.

pub const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    Flags,
    Torchrun,
    Slurm,
    Single,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub source: EnvSource,
}

/// Values given on the command line (all or none of rank and world size).
#[derive(Debug, Clone, Default)]
pub struct RankFlags {
    pub rank: Option<usize>,
    pub local_rank: Option<usize>,
    pub world_size: Option<usize>,
    pub local_world_size: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DistError {
    #[error("{0}")]
    Env(String),
}

fn err(msg: impl Into<String>) -> DistError {
    DistError::Env(msg.into())
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, DistError> {
    value
        .trim()
        .parse()
        .map_err(|_| err(format!("{name}='{value}' is not a valid number")))
}

/// Checks the invariants every source must satisfy; `names` says what the values came from.
fn check(e: DistEnv, names: [&str; 4]) -> Result<DistEnv, DistError> {
    let [rank, local_rank, world, local_world] = names;
    if e.world_size == 0 {
        return Err(err(format!("{world}=0: the world size must be at least 1")));
    }
    if e.rank >= e.world_size {
        return Err(err(format!(
            "{rank}={} and {world}={} disagree: the rank must be below the world size",
            e.rank, e.world_size
        )));
    }
    if e.local_world_size == 0 || e.local_world_size > e.world_size {
        return Err(err(format!(
            "{local_world}={} and {world}={} disagree: the local world size must be between 1 and the world size",
            e.local_world_size, e.world_size
        )));
    }
    if e.local_rank >= e.local_world_size {
        return Err(err(format!(
            "{local_rank}={} and {local_world}={} disagree: the local rank must be below the local world size",
            e.local_rank, e.local_world_size
        )));
    }
    Ok(e)
}

/// `SLURM_NTASKS_PER_NODE` / `SLURM_TASKS_PER_NODE` forms: `8`, `8(x2)`, `4(x2),2` — the
/// count of node `node` (0-based).
fn tasks_on_node(value: &str, node: usize) -> Result<usize, DistError> {
    let mut counts = Vec::new();
    for part in value.split(',') {
        let (n, times) = match part.split_once("(x") {
            Some((n, rest)) => (
                n,
                parse::<usize>("SLURM_NTASKS_PER_NODE", rest.trim_end_matches(')'))?,
            ),
            None => (part, 1),
        };
        let n: usize = parse("SLURM_NTASKS_PER_NODE", n)?;
        counts.extend(std::iter::repeat_n(n, times));
    }
    match counts.len() {
        0 => Err(err("SLURM_NTASKS_PER_NODE is empty")),
        1 => Ok(counts[0]),
        _ => counts.get(node).copied().ok_or_else(|| {
            err(format!(
                "SLURM_NTASKS_PER_NODE='{value}' has no entry for SLURM_NODEID={node}"
            ))
        }),
    }
}

/// Expands a SLURM host list: `gpu[01-04,07],login1` → gpu01, gpu02, gpu03, gpu04, gpu07,
/// login1. Zero padding is kept; several bracket groups in one name expand as a product.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, DistError> {
    let bad = |why: &str| err(format!("SLURM_JOB_NODELIST='{list}': {why}"));
    // Split at top-level commas (commas inside brackets belong to ranges).
    let mut names = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                names.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced or nested brackets"));
        }
    }
    if depth != 0 {
        return Err(bad("unbalanced brackets"));
    }
    names.push(&list[start..]);
    let mut hosts = Vec::new();
    for name in names.into_iter().filter(|n| !n.is_empty()) {
        let mut partial = vec![String::new()];
        let mut rest = name;
        while let Some(open) = rest.find('[') {
            let close = rest[open..]
                .find(']')
                .map(|c| open + c)
                .ok_or_else(|| bad("unbalanced brackets"))?;
            let prefix = &rest[..open];
            let mut options = Vec::new();
            for range in rest[open + 1..close].split(',') {
                match range.split_once('-') {
                    Some((a, b)) => {
                        let (lo, hi): (usize, usize) = (
                            parse("SLURM_JOB_NODELIST", a)?,
                            parse("SLURM_JOB_NODELIST", b)?,
                        );
                        if lo > hi {
                            return Err(bad(&format!("range {range} runs backwards")));
                        }
                        let width = a.len();
                        options.extend((lo..=hi).map(|k| format!("{k:0width$}")));
                    }
                    None => {
                        parse::<usize>("SLURM_JOB_NODELIST", range)?;
                        options.push(range.to_string());
                    }
                }
            }
            partial = partial
                .iter()
                .flat_map(|p| options.iter().map(move |o| format!("{p}{prefix}{o}")))
                .collect();
            rest = &rest[close + 1..];
        }
        hosts.extend(partial.into_iter().map(|p| format!("{p}{rest}")));
    }
    if hosts.is_empty() {
        return Err(bad("no hosts"));
    }
    Ok(hosts)
}

/// Resolves this process's place in the job. `env` reads an environment variable (tests pass
/// a map; the binaries pass `std::env::var`).
pub fn resolve(
    flags: &RankFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DistEnv, DistError> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let port =
        |k: &str| -> Result<Option<u16>, DistError> { get(k).map(|v| parse(k, &v)).transpose() };
    let master_addr = flags.master_addr.clone().or_else(|| get("MASTER_ADDR"));
    let master_port = match flags.master_port {
        Some(p) => p,
        None => port("MASTER_PORT")?.unwrap_or(DEFAULT_MASTER_PORT),
    };
    if let (Some(rank), Some(world)) = (flags.rank, flags.world_size) {
        let local_world = flags.local_world_size.unwrap_or(world);
        let e = DistEnv {
            rank,
            local_rank: flags.local_rank.unwrap_or(rank % local_world.max(1)),
            world_size: world,
            local_world_size: local_world,
            master_addr: master_addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            source: EnvSource::Flags,
        };
        return check(
            e,
            [
                "--rank",
                "--local-rank",
                "--world-size",
                "--local-world-size",
            ],
        );
    }
    if flags.rank.is_some() != flags.world_size.is_some() {
        return Err(err("--rank and --world-size must be given together"));
    }
    let torchrun = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"];
    let present: Vec<&str> = torchrun
        .iter()
        .copied()
        .filter(|k| get(k).is_some())
        .collect();
    if !present.is_empty() {
        if present.len() < 2 || get("RANK").is_none() || get("WORLD_SIZE").is_none() {
            let missing: Vec<&str> = ["RANK", "WORLD_SIZE"]
                .into_iter()
                .filter(|k| get(k).is_none())
                .collect();
            return Err(err(format!(
                "{} set but {} missing: launch with torchrun or moeq-launch, or unset them",
                present.join(", "),
                missing.join(", ")
            )));
        }
        let num = |k: &str| -> Result<Option<usize>, DistError> {
            get(k).map(|v| parse(k, &v)).transpose()
        };
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        let local_world = num("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let rank = num("RANK")?.unwrap_or(0);
        let e = DistEnv {
            rank,
            local_rank: num("LOCAL_RANK")?.unwrap_or(rank % local_world.max(1)),
            world_size: world,
            local_world_size: local_world,
            master_addr: master_addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            source: EnvSource::Torchrun,
        };
        return check(e, ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"]);
    }
    if let Some(procid) = get("SLURM_PROCID") {
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                err(format!(
                    "SLURM_PROCID is set but {k} is not: run under srun, or unset SLURM_PROCID"
                ))
            })
        };
        let rank: usize = parse("SLURM_PROCID", &procid)?;
        let world: usize = parse("SLURM_NTASKS", &need("SLURM_NTASKS")?)?;
        let node: usize = get("SLURM_NODEID")
            .map(|v| parse("SLURM_NODEID", &v))
            .transpose()?
            .unwrap_or(0);
        let per_node = match get("SLURM_NTASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE")) {
            Some(v) => tasks_on_node(&v, node)?,
            None => world,
        };
        let local_rank: usize = parse("SLURM_LOCALID", &need("SLURM_LOCALID")?)?;
        let master = match master_addr {
            Some(a) => a,
            None => expand_hostlist(&need("SLURM_JOB_NODELIST")?)?.remove(0),
        };
        let e = DistEnv {
            rank,
            local_rank,
            world_size: world,
            local_world_size: per_node,
            master_addr: master,
            master_port,
            source: EnvSource::Slurm,
        };
        return check(
            e,
            [
                "SLURM_PROCID",
                "SLURM_LOCALID",
                "SLURM_NTASKS",
                "SLURM_NTASKS_PER_NODE",
            ],
        );
    }
    Ok(DistEnv {
        rank: 0,
        local_rank: 0,
        world_size: 1,
        local_world_size: 1,
        master_addr: master_addr.unwrap_or_else(|| "127.0.0.1".into()),
        master_port,
        source: EnvSource::Single,
    })
}
