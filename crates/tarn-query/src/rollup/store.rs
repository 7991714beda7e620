//! Persistence of a rollup: chunk files plus a manifest, replaced atomically.
//!
//! Layout under `lake/rollups/<rollup>/`:
//! - `MANIFEST.json`: format version, the definition's fingerprint, the checkpoint generation,
//!   the last log sequence applied per shard, pending rebuild ranges, and the chunk files.
//! - `<grain>-<chunk start>-<generation>.chunk`: the buckets of one grain in one chunk of time
//!   (an hour of minutes, a day of hours, 31 days of days): a magic, the encoded buckets and a
//!   CRC-32C.
//!
//! A checkpoint writes the chunks that changed as new files (each synced), then the manifest
//! (temporary file, sync, rename, sync of the directory), and only then deletes the files it
//! replaced. A crash at any point leaves the previous manifest and every file it names intact;
//! files no manifest names are deleted on open. What a checkpoint holds and the sequences it
//! records always agree, so a replay after a crash applies exactly the batches after them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tarn_core::Grain;

use super::cube::{Cube, Def};

const MAGIC: &[u8; 6] = b"TRNRC1";
pub const MANIFEST: &str = "MANIFEST.json";

/// The span of one chunk file of a grain, in seconds.
pub fn chunk_span(g: Grain) -> i64 {
    match g {
        Grain::Minute => 3_600,
        Grain::Hour => 86_400,
        Grain::Day => 31 * 86_400,
    }
}

pub fn chunk_of(g: Grain, bucket: i64) -> i64 {
    bucket - bucket.rem_euclid(chunk_span(g))
}

/// Rows already counted by a rebuild: those of days in `[from_secs, to_secs)` with a sequence
/// at or below `through[shard]`. The live subscriber skips them until it has passed them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rebuilt {
    pub from_secs: i64,
    pub to_secs: i64,
    pub through: BTreeMap<u32, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub grain: Grain,
    pub start: i64,
    pub generation: u64,
    pub bytes: u64,
}

impl ChunkRef {
    fn file_name(&self) -> String {
        format!("{}-{}-{}.chunk", self.grain.as_str(), self.start, self.generation)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub fingerprint: String,
    pub generation: u64,
    /// The last log sequence applied, per shard of the dataset.
    pub applied: BTreeMap<u32, u64>,
    #[serde(default)]
    pub rebuilt: Vec<Rebuilt>,
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    fn new(fingerprint: String) -> Manifest {
        Manifest {
            version: 1,
            fingerprint,
            generation: 0,
            applied: BTreeMap::new(),
            rebuilt: Vec::new(),
            chunks: Vec::new(),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What opening a rollup's directory found.
pub struct Opened {
    pub cube: Cube,
    pub manifest: Manifest,
    /// Why earlier state was dropped, if it was (the definition changed).
    pub reset: Option<String>,
}

/// Opens (or creates) a rollup's directory and loads its state.
pub fn open(dir: &Path, def: &Def) -> Result<Opened, String> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mpath = dir.join(MANIFEST);
    let mut reset = None;
    let manifest = match std::fs::read(&mpath) {
        Ok(b) => {
            let m: Manifest = serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", mpath.display()))?;
            if m.version != 1 {
                return Err(format!(
                    "{}: manifest version {} is not supported",
                    mpath.display(),
                    m.version
                ));
            }
            if m.fingerprint != def.fingerprint() {
                reset = Some(
                    "the rollup's definition changed: its earlier buckets were dropped; `tarn rollup rebuild` refills them from the lake".to_string(),
                );
                Manifest::new(def.fingerprint())
            } else {
                m
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::new(def.fingerprint()),
        Err(e) => return Err(format!("{}: {e}", mpath.display())),
    };
    let mut cube = Cube::default();
    let mut named = BTreeSet::new();
    for c in &manifest.chunks {
        let name = c.file_name();
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let body = check(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        cube.decode_into(c.grain, def, body)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        named.insert(name);
    }
    if reset.is_some() {
        write_manifest(dir, &manifest)?;
    }
    // Files no manifest names: from a checkpoint that crashed before its manifest, or
    // replaced by one that crashed before deleting them.
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".chunk") || name.ends_with(".tmp")) && !named.contains(&name) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(Opened { cube, manifest, reset })
}

fn check(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a rollup chunk".into());
    }
    let (body, crc) = bytes[MAGIC.len()..].split_at(bytes.len() - MAGIC.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != want {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| e.to_string())?;
    write_synced(&dir.join(MANIFEST), &bytes)?;
    sync_dir(dir)
}

/// Writes `chunks` (each the encoded buckets of one grain and chunk start; an empty one
/// removes the chunk) and then a manifest naming them, with `manifest`'s sequences. Returns
/// the bytes written.
pub fn checkpoint(dir: &Path, manifest: &mut Manifest, chunks: &[((Grain, i64), Vec<u8>)]) -> Result<u64, String> {
    let dirty: BTreeSet<(Grain, i64)> = chunks.iter().map(|(k, _)| *k).collect();
    let generation = manifest.generation + 1;
    let mut written = 0u64;
    let mut next: Vec<ChunkRef> = manifest
        .chunks
        .iter()
        .filter(|c| !dirty.contains(&(c.grain, c.start)))
        .cloned()
        .collect();
    let replaced: Vec<PathBuf> = manifest
        .chunks
        .iter()
        .filter(|c| dirty.contains(&(c.grain, c.start)))
        .map(|c| dir.join(c.file_name()))
        .collect();
    for ((g, start), body) in chunks {
        if body.len() <= 1 {
            continue; // no tenant has a bucket here any more
        }
        let mut bytes = Vec::with_capacity(body.len() + 10);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        let c = ChunkRef {
            grain: *g,
            start: *start,
            generation,
            bytes: bytes.len() as u64,
        };
        let path = dir.join(c.file_name());
        write_synced(&path, &bytes)?;
        written += bytes.len() as u64;
        next.push(c);
    }
    next.sort_by_key(|c| (c.grain, c.start));
    sync_dir(dir)?;
    let mut m = manifest.clone();
    m.generation = generation;
    m.chunks = next;
    let bytes = serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?;
    write_synced(&dir.join(MANIFEST), &bytes)?;
    // Renamed: this is the manifest now (a generation is never written twice), even if the
    // directory sync below fails.
    *manifest = m;
    sync_dir(dir)?;
    // Replaced files are garbage; one left behind is deleted on the next open.
    for p in replaced {
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot delete a replaced rollup chunk");
        }
    }
    Ok(written)
}
