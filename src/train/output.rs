//! The output directory, checked before any work: creatable, writable, with room for a
//! checkpoint and the adapter.

use super::setup;
use crate::config::TrainConfig;
use std::path::Path;

/// Checks, without leaving anything behind, that `output_dir` can be created and written and
/// that its filesystem has `needed` bytes free: a run should not load a model for minutes and
/// then fail to save.
pub fn check_output_dir(dir: &Path, needed: u64) -> Result<(), String> {
    let shown = dir.display();
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(format!(
            "output_dir {shown}: {} is not a directory (choose another output_dir)",
            existing.display()
        ));
    }
    let probe = existing.join(format!(".moeq-write-probe-{}", std::process::id()));
    let written =
        std::fs::write(&probe, b"probe").and_then(|_| std::fs::File::open(&probe)?.sync_all());
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        format!(
            "output_dir {shown}: cannot write in {}: {e} (choose a writable output_dir with free space)",
            existing.display()
        )
    })?;
    if let Some(free) = free_bytes(existing) {
        if free < needed {
            return Err(format!(
                "output_dir {shown}: {:.1} MB free on its filesystem, but a checkpoint and the adapter need about {:.1} MB (free some space or choose another output_dir)",
                free as f64 / 1e6,
                needed as f64 / 1e6
            ));
        }
    }
    Ok(())
}

/// Bytes available to this user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes a run writes into output_dir at most at once: one checkpoint (adapter and two fp32
/// moments) being written next to the kept ones and the final adapter, plus logs.
pub fn output_bytes_needed(config: &TrainConfig, spec: &crate::arch::ArchSpec) -> u64 {
    let plan = crate::arch::LoraPlan {
        r: config.lora_r,
        modules: setup::lora_settings(config).target_modules,
        parameters: config.lora_target_parameters.clone(),
    };
    let (linear, experts) = plan.lora_params(spec);
    let adapter = (linear + experts) * 4;
    let keep = if config.save_steps.is_some() {
        config.save_total_limit.unwrap_or(1).max(1) as u64 + 1
    } else {
        0
    };
    adapter * (1 + 3 * keep) + (1 << 20)
}

/// Writes the final adapter into `output_dir` itself, as axolotl/PEFT users expect: saved to a
/// temporary folder first, then moved file by file.
pub(crate) fn save_final_adapter(
    config: &TrainConfig,
    adapters: &crate::lora::Adapters,
) -> Result<(), super::error::TrainError> {
    use super::error::failed;
    let files = ["adapter_config.json", "adapter_model.safetensors"];
    let tmp = config.output_dir.join(".final-adapter.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    crate::lora::peft::save(adapters, &config.base_model, &tmp)
        .map_err(|e| failed(format!("{}: {e}", tmp.display())))?;
    for f in files {
        std::fs::rename(tmp.join(f), config.output_dir.join(f)).map_err(failed)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    tracing::info!("saved adapter to {}", config.output_dir.display());
    Ok(())
}
