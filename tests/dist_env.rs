//! Rank resolution from flags, torchrun and SLURM environments, host-list expansion, and the
//! one-line errors for incomplete or contradictory environments.

use moeq::distributed::{expand_hostlist, resolve, DistEnv, EnvSource, RankFlags};
use std::collections::HashMap;

fn run(vars: &[(&str, &str)], flags: RankFlags) -> Result<DistEnv, String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    resolve(&flags, &|k| map.get(k).cloned()).map_err(|e| e.to_string())
}

#[test]
fn single_process_by_default() {
    let e = run(&[], RankFlags::default()).unwrap();
    assert_eq!(
        (e.rank, e.world_size, e.local_world_size, e.source),
        (0, 1, 1, EnvSource::Single)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.master_port),
        ("127.0.0.1", 29500)
    );
}

#[test]
fn torchrun_variables() {
    let vars = [
        ("RANK", "5"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.1.2.3"),
        ("MASTER_PORT", "29600"),
        // Launched by torchrun inside a SLURM allocation: SLURM's numbers differ and are ignored.
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
    ];
    let e = run(&vars, RankFlags::default()).unwrap();
    assert_eq!(
        (e.rank, e.local_rank, e.world_size, e.local_world_size),
        (5, 1, 8, 4)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.master_port, e.source),
        ("10.1.2.3", 29600, EnvSource::Torchrun)
    );
}

#[test]
fn slurm_variables_with_compact_node_list() {
    let vars = [
        ("SLURM_PROCID", "11"),
        ("SLURM_LOCALID", "3"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_NTASKS_PER_NODE", "8(x2)"),
        ("SLURM_NODEID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[07-08]"),
    ];
    let e = run(&vars, RankFlags::default()).unwrap();
    assert_eq!(
        (e.rank, e.local_rank, e.world_size, e.local_world_size),
        (11, 3, 16, 8)
    );
    assert_eq!(
        (e.master_addr.as_str(), e.source),
        ("gpu07", EnvSource::Slurm)
    );
}

#[test]
fn flags_win_over_the_environment() {
    let flags = RankFlags {
        rank: Some(1),
        world_size: Some(2),
        master_port: Some(1234),
        ..RankFlags::default()
    };
    let e = run(&[("RANK", "0"), ("WORLD_SIZE", "4")], flags).unwrap();
    assert_eq!(
        (e.rank, e.world_size, e.local_rank, e.master_port, e.source),
        (1, 2, 1, 1234, EnvSource::Flags)
    );
}

#[test]
fn host_lists_expand_like_slurm() {
    assert_eq!(
        expand_hostlist("gpu[01-04,07]").unwrap(),
        ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
    );
    assert_eq!(
        expand_hostlist("a[1-2],login1,b3").unwrap(),
        ["a1", "a2", "login1", "b3"]
    );
    assert_eq!(
        expand_hostlist("n[9-11]-ib").unwrap(),
        ["n9-ib", "n10-ib", "n11-ib"]
    );
    assert_eq!(
        expand_hostlist("r[1-2]n[1-2]").unwrap(),
        ["r1n1", "r1n2", "r2n1", "r2n2"]
    );
    assert_eq!(expand_hostlist("single").unwrap(), ["single"]);
}

#[test]
fn bad_environments_name_the_variables() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("RANK", "0")], "RANK set but WORLD_SIZE missing: launch with torchrun or moeq-launch, or unset them"),
        (&[("RANK", "4"), ("WORLD_SIZE", "4")], "RANK=4 and WORLD_SIZE=4 disagree: the rank must be below the world size"),
        (
            &[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "2")],
            "LOCAL_RANK=2 and LOCAL_WORLD_SIZE=2 disagree: the local rank must be below the local world size",
        ),
        (&[("RANK", "x"), ("WORLD_SIZE", "4")], "RANK='x' is not a valid number"),
        (&[("SLURM_PROCID", "0")], "SLURM_PROCID is set but SLURM_NTASKS is not: run under srun, or unset SLURM_PROCID"),
        (
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_JOB_NODELIST", "gpu[3-1]")],
            "SLURM_JOB_NODELIST='gpu[3-1]': range 3-1 runs backwards",
        ),
        (
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_JOB_NODELIST", "gpu[1-2")],
            "SLURM_JOB_NODELIST='gpu[1-2': unbalanced brackets",
        ),
        (&[("MASTER_PORT", "99999")], "MASTER_PORT='99999' is not a valid number"),
    ];
    for (vars, want) in cases {
        assert_eq!(
            run(vars, RankFlags::default()).unwrap_err(),
            *want,
            "{vars:?}"
        );
    }
    let half = RankFlags {
        rank: Some(0),
        ..RankFlags::default()
    };
    assert_eq!(
        run(&[], half).unwrap_err(),
        "--rank and --world-size must be given together"
    );
}
