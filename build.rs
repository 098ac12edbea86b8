//! With the `cuda` feature, compiles every `kernels/*.cu` to PTX in OUT_DIR (included by
//! `src/ops/kernels.rs`). The target architecture comes from CUDA_COMPUTE_CAP (default 80);
//! PTX is JIT-compiled by the driver for newer GPUs.
//!
//! `kernels/sm90/*.cu` are CUTLASS kernels for Hopper with their host code, compiled for sm_90a
//! (headers from MOEQ_CUTLASS_DIR, default `~/.cache/moeq-cutlass-4.2.0`;
//! `launch/fetch-cutlass.sh` puts them there). `kernels/cudnn/*.cpp` drive cuDNN through
//! cudnn-frontend, which opens cuDNN at run time (headers from MOEQ_CUDNN_DIR, default
//! `~/.cache/moeq-cudnn-9.19-fe1.32`; `launch/fetch-cudnn.sh`). Both go into one static
//! library linked with the static CUDA runtime.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=MOEQ_CUTLASS_DIR");
    println!("cargo:rerun-if-env-changed=MOEQ_CUDNN_DIR");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let toolchain = toolchain(&nvcc);
    let headers = files_ending("kernels", "cuh");
    for src in cu_files("kernels") {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 kernel name");
        let ptx = out.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-Ikernels")
            .arg(&src)
            .arg("-o")
            .arg(&ptx);
        let inputs: Vec<PathBuf> = headers.iter().chain([&src]).cloned().collect();
        compile(cmd, &toolchain, &ptx, &inputs);
    }
    native_library(&nvcc, &toolchain, &out);
}

/// What identifies the compiler: its resolved path and `--version` output.
fn toolchain(nvcc: &str) -> String {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or put nvcc on PATH): {e}"));
    let path = which(nvcc).and_then(|p| std::fs::canonicalize(p).ok());
    format!("{path:?}\n{version}")
}

/// Runs `cmd` (nvcc) unless its last run made `output` with the same command line and
/// `toolchain`, and no file of `inputs` changed since that run began: cargo reruns this script
/// when any file under `kernels/` changes, and the CUTLASS objects take minutes each. The
/// stamp `{output}.cmd` holds the line and is written before the run (its time is the run's
/// start: an input edited while nvcc reads it is older than the output but newer than the
/// stamp) and kept only if the run succeeds.
fn compile(mut cmd: Command, toolchain: &str, output: &Path, inputs: &[PathBuf]) {
    let line = format!("{cmd:?}\n{toolchain}");
    let stamp = output.with_extension(format!(
        "{}.cmd",
        output.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = output.is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == line)
        && modified(&stamp).is_some_and(|began| {
            inputs
                .iter()
                .all(|i| modified(i).is_some_and(|changed| changed < began))
        });
    if fresh {
        return;
    }
    let pending = stamp.with_extension("cmd.pending");
    std::fs::write(&pending, &line).expect("OUT_DIR is writable");
    let _ = std::fs::remove_file(&stamp);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {line} (set NVCC or put nvcc on PATH): {e}"));
    assert!(status.success(), "nvcc failed: {line}");
    std::fs::rename(&pending, &stamp).expect("OUT_DIR is writable");
}

/// The `.cu` files directly in `dir`, sorted.
fn cu_files(dir: &str) -> Vec<PathBuf> {
    files_ending(dir, "cu")
}

/// The files directly in `dir` with extension `ext`, sorted.
fn files_ending(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

/// `$var`, else `~/{default}`, when it holds `probe`; else a panic naming the fetch script.
fn header_dir(var: &str, default: &str, probe: &str, fetch: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)))
        .filter(|d| d.join(probe).is_file())
        .unwrap_or_else(|| {
            panic!(
                "{probe} not found: run `eval \"$({fetch})\"` (or set {var}) before building \
                 with --features cuda"
            )
        })
}

/// `kernels/sm90/*.cu` and `kernels/cudnn/*.cpp` → `libmoeq_native.a`, linked with the static
/// CUDA runtime.
fn native_library(nvcc: &str, toolchain: &str, out: &Path) {
    let cutlass = header_dir(
        "MOEQ_CUTLASS_DIR",
        ".cache/moeq-cutlass-4.2.0",
        "include/cutlass/cutlass.h",
        "launch/fetch-cutlass.sh",
    );
    let cudnn = header_dir(
        "MOEQ_CUDNN_DIR",
        ".cache/moeq-cudnn-9.19-fe1.32",
        "include/cudnn_frontend.h",
        "launch/fetch-cudnn.sh",
    );
    let mut objects = Vec::new();
    for src in cu_files("kernels/sm90") {
        let flags = [
            "-O3",
            "-std=c++20",
            "-arch=sm_90a",
            "--expt-relaxed-constexpr",
        ]
        .map(String::from)
        .into_iter()
        .chain([
            format!("-I{}", cutlass.join("include").display()),
            format!("-I{}", cutlass.join("tools/util/include").display()),
        ]);
        objects.push(object(
            (nvcc, toolchain),
            out,
            "sm90",
            &src,
            flags.collect(),
        ));
    }
    for src in files_ending("kernels/cudnn", "cpp") {
        let flags = [
            "-O2",
            "-std=c++17",
            "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("-I{}", cudnn.join("include").display())]);
        objects.push(object(
            (nvcc, toolchain),
            out,
            "cudnn",
            &src,
            flags.collect(),
        ));
    }
    let lib = out.join("libmoeq_native.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(&lib)
        .args(&objects)
        .status()
        .expect("ar runs");
    assert!(status.success(), "ar failed on {}", lib.display());
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=moeq_native");
    let cudart = cudart_static_dir(nvcc).unwrap_or_else(|| {
        panic!("libcudart_static.a not found next to {nvcc} (set CUDA_ROOT to the CUDA toolkit)")
    });
    println!("cargo:rustc-link-search=native={}", cudart.display());
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["stdc++", "dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

/// `src` compiled by nvcc with `flags` (plus `-c -DNDEBUG -fPIC`) into `{out}/{prefix}_{stem}.o`
/// (unless that object is up to date: `compile`; its inputs are `src`, the project's headers
/// beside it and `kernels/*.cuh`).
fn object(
    (nvcc, toolchain): (&str, &str),
    out: &Path,
    prefix: &str,
    src: &Path,
    flags: Vec<String>,
) -> PathBuf {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("utf-8 name");
    let obj = out.join(format!("{prefix}_{stem}.o"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-c", "-DNDEBUG", "-Xcompiler", "-fPIC"])
        .args(&flags)
        .arg(src)
        .arg("-o")
        .arg(&obj);
    let dir = src.parent().and_then(|d| d.to_str()).unwrap_or("kernels");
    let mut inputs = vec![src.to_path_buf()];
    for (d, ext) in [(dir, "cuh"), (dir, "h"), (dir, "hpp"), ("kernels", "cuh")] {
        inputs.extend(files_ending(d, ext));
    }
    compile(cmd, toolchain, &obj, &inputs);
    obj
}

/// `program` as given when it names a path, else the first match on PATH.
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// The folder holding `libcudart_static.a`: `$CUDA_ROOT/lib64` or `lib`, or beside nvcc's real
/// location (toolkits unpacked from PyPI keep it in `../lib`).
fn cudart_static_dir(nvcc: &str) -> Option<PathBuf> {
    let nvcc_path = which(nvcc)?;
    let real_bin = std::fs::canonicalize(&nvcc_path)
        .ok()?
        .parent()?
        .to_path_buf();
    let mut candidates = Vec::new();
    if let Some(root) = std::env::var_os("CUDA_ROOT").map(PathBuf::from) {
        candidates.push(root.join("lib64"));
        candidates.push(root.join("lib"));
    }
    for bin in [nvcc_path.parent().map(Path::to_path_buf), Some(real_bin)]
        .into_iter()
        .flatten()
    {
        candidates.push(bin.join("../lib64"));
        candidates.push(bin.join("../lib"));
    }
    candidates
        .into_iter()
        .find(|d| d.join("libcudart_static.a").is_file())
}
