//! Tokenized samples cached on disk, keyed by everything that shapes them:
//! the tokenizer files, each dataset entry and the text of its chat template
//! (read from its file, plus today's date when the template calls
//! `strftime_now`), the bytes of every data file, `sequence_len`,
//! `train_on_inputs`, `skip_bad_samples`, `eot_tokens`. The
//! validation split and packing are recomputed (they are cheap), so changing
//! `val_set_size` or `seed` reuses the cache.
//!
//! File layout, little-endian: `MOEQDATA`, u32 version, u64 header length,
//! header JSON `{datasets, warnings, count}`, then per sample u32 length,
//! the ids (u32) and the labels (i32). Written to a temporary name and
//! renamed, so a reader never sees half a file; an unreadable file is
//! ignored and rebuilt.

use super::error::DataError;
use super::prepare::{template_source, Built, DatasetStats};
use super::source::dataset_files;
use super::tokenizer::TokenizerBundle;
use super::Sample;
use crate::config::{DatasetType, TrainConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"MOEQDATA";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    datasets: Vec<DatasetStats>,
    warnings: Vec<String>,
    count: usize,
}

/// Hex sha256 over everything that determines the samples.
pub(crate) fn key(config: &TrainConfig, tok: &TokenizerBundle) -> Result<String, DataError> {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(format!("moeq data cache v{VERSION}").as_bytes());
    put(tok.fingerprint.as_bytes());
    put(&(config.sequence_len as u64).to_le_bytes());
    put(&[
        u8::from(config.train_on_inputs),
        u8::from(config.skip_bad_samples),
    ]);
    if let Some(eot) = &config.eot_tokens {
        put(format!("eot:{}", serde_json::to_string(eot).unwrap_or_default()).as_bytes());
    }
    for (i, ds) in config.datasets.iter().enumerate() {
        // Tagged, so the Debug fallback can never collide with a JSON form.
        match serde_json::to_string(ds) {
            Ok(json) => put(format!("json:{json}").as_bytes()),
            Err(_) => put(format!("debug:{ds:?}").as_bytes()),
        }
        if ds.ds_type == DatasetType::ChatTemplate {
            let (source, _) = template_source(i, ds, config, tok)?;
            put(template_key(&source, &today()).as_bytes());
        }
        if ds.path.starts_with("synth://") {
            continue;
        }
        for file in dataset_files(i, ds)? {
            let bytes = std::fs::read(&file).map_err(|e| DataError::Read {
                path: file.display().to_string(),
                reason: e.to_string(),
            })?;
            put(file.display().to_string().as_bytes());
            put(&Sha256::digest(&bytes));
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// What of a template's source shapes its renderings: the text, and the date
/// when the template formats the current time (`strftime_now`).
fn template_key(source: &str, today: &str) -> String {
    if source.contains("strftime_now") {
        format!("{source}\0date:{today}")
    } else {
        source.to_string()
    }
}

fn today() -> String {
    match super::template::now() {
        Ok(t) => t.format("%Y-%m-%d").to_string(),
        Err(e) => e, // rendering reports it; here it only keys the cache
    }
}

pub(crate) fn load(path: &Path) -> Option<Built> {
    let bytes = std::fs::read(path).ok()?;
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let header_len = r.u64()? as usize;
    let header: Header = serde_json::from_slice(r.take(header_len)?).ok()?;
    // `count` and each length come from the file: bound them by the bytes
    // left (4 per sample header, 8 per token) so a corrupt file is ignored,
    // never a huge allocation.
    let mut samples = Vec::with_capacity(header.count.min(r.left() / 4));
    for _ in 0..header.count {
        let len = r.u32()? as usize;
        if len.checked_mul(8)? > r.left() {
            return None;
        }
        let input_ids = (0..len).map(|_| r.u32()).collect::<Option<Vec<u32>>>()?;
        let labels = (0..len)
            .map(|_| r.u32().map(|v| v as i32))
            .collect::<Option<Vec<i32>>>()?;
        samples.push(Sample { input_ids, labels });
    }
    (r.at == bytes.len()).then_some(Built {
        samples,
        datasets: header.datasets,
        warnings: header.warnings,
    })
}

pub(crate) fn store(path: &Path, built: &Built) -> Result<(), DataError> {
    let err = |e: std::io::Error| DataError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let header = serde_json::to_vec(&Header {
        datasets: built.datasets.clone(),
        warnings: built.warnings.clone(),
        count: built.samples.len(),
    })
    .map_err(|e| DataError::Read {
        path: path.display().to_string(),
        reason: format!("cannot serialize the cache header: {e}"),
    })?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for s in &built.samples {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        for id in &s.input_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for l in &s.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&out).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::template_key;

    #[test]
    fn templates_that_read_the_clock_key_on_the_date() {
        let plain = "{{ messages[0].content }}";
        assert_eq!(
            template_key(plain, "2026-01-01"),
            template_key(plain, "2026-01-02")
        );
        let dated = "{{ strftime_now('%d %b %Y') }}{{ messages[0].content }}";
        assert_ne!(
            template_key(dated, "2026-01-01"),
            template_key(dated, "2026-01-02")
        );
        assert_ne!(
            template_key(dated, "2026-01-01"),
            template_key(plain, "2026-01-01")
        );
    }
}
