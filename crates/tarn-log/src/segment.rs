//! One segment file: a header, then records. Encoding, scanning and recovery live here.
//!
//! Segment header (20 bytes): magic `TARNLOG1`, base sequence (u64 LE), CRC-32C of the first
//! 16 bytes. Record: payload length (u32 LE), CRC-32C of (sequence, payload) (u32 LE),
//! sequence (u64 LE), payload.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::{Error, Result, io_err};

pub(crate) const MAGIC: &[u8; 8] = b"TARNLOG1";
pub(crate) const HEADER_LEN: u64 = 20;
pub(crate) const RECORD_HEADER_LEN: usize = 16;

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

pub(crate) fn encode_header(base: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(crate) fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&seq.to_le_bytes());
    crc32c::crc32c_append(c, payload)
}

pub(crate) fn encode_record_header(seq: u64, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&record_crc(seq, payload).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Reads and checks a segment header; returns the base sequence.
pub(crate) fn read_header(path: &Path, f: &mut impl Read) -> Result<u64> {
    let mut h = [0u8; HEADER_LEN as usize];
    f.read_exact(&mut h)
        .map_err(|e| corrupt(path, 0, format!("short segment header: {e}")))?;
    if &h[..8] != MAGIC {
        return Err(corrupt(path, 0, "bad segment magic"));
    }
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if crc != crc32c::crc32c(&h[..16]) {
        return Err(corrupt(path, 0, "segment header checksum mismatch"));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[8..16]);
    Ok(u64::from_le_bytes(b))
}

/// What one step of a scan found.
pub(crate) enum Next {
    Record {
        seq: u64,
        payload: Vec<u8>,
        len: u64,
    },
    /// Clean end of data.
    End,
    /// A partial or corrupt record starts here.
    Bad(String),
}

/// Reads the record at the reader's position. `limit` is how many bytes may be read from here.
pub(crate) fn read_record(r: &mut impl Read, limit: u64, record_bytes_max: usize) -> Result<Next, std::io::Error> {
    if limit == 0 {
        return Ok(Next::End);
    }
    if limit < RECORD_HEADER_LEN as u64 {
        return Ok(Next::Bad(format!(
            "{limit} trailing bytes, shorter than a record header"
        )));
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    if let Err(e) = r.read_exact(&mut h) {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Ok(Next::Bad("truncated record header".into()));
        }
        return Err(e);
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let mut sb = [0u8; 8];
    sb.copy_from_slice(&h[8..16]);
    let seq = u64::from_le_bytes(sb);
    if len > record_bytes_max {
        return Ok(Next::Bad(format!(
            "record length {len} exceeds the limit {record_bytes_max}"
        )));
    }
    let total = (RECORD_HEADER_LEN + len) as u64;
    if total > limit {
        return Ok(Next::Bad(format!(
            "record of {total} bytes runs past the end ({limit} bytes left)"
        )));
    }
    let mut payload = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut payload) {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Ok(Next::Bad("truncated record payload".into()));
        }
        return Err(e);
    }
    if record_crc(seq, &payload) != crc {
        return Ok(Next::Bad(format!("checksum mismatch on record {seq}")));
    }
    Ok(Next::Record {
        seq,
        payload,
        len: total,
    })
}

/// The result of recovering the last segment.
pub(crate) struct Recovered {
    /// Bytes of valid data (header included); the file is truncated to this.
    pub valid_len: u64,
    /// The sequence after the last valid record.
    pub next_seq: u64,
}

/// Scans a segment from its start, truncating a torn or corrupt tail.
pub(crate) fn recover(path: &Path, record_bytes_max: usize) -> Result<Recovered> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, &file);
    let base = read_header(path, &mut r)?;
    let mut pos = HEADER_LEN;
    let mut next = base;
    loop {
        match read_record(&mut r, file_len - pos, record_bytes_max).map_err(io_err(path))? {
            Next::Record { seq, len, .. } => {
                if seq != next {
                    tracing::warn!(path = %path.display(), pos, seq, expected = next, "sequence gap in segment tail; truncating");
                    break;
                }
                pos += len;
                next += 1;
            }
            Next::End => break,
            Next::Bad(reason) => {
                tracing::warn!(path = %path.display(), pos, %reason, "truncating torn log tail");
                break;
            }
        }
    }
    drop(r);
    if pos < file_len {
        file.set_len(pos).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
    }
    Ok(Recovered {
        valid_len: pos,
        next_seq: next,
    })
}

/// A sequential reader over one segment, bounded by a byte limit (the durable end).
pub(crate) struct SegmentReader {
    pub path: PathBuf,
    pub base: u64,
    reader: BufReader<File>,
    pub pos: u64,
    pub next_seq: u64,
}

impl SegmentReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::with_capacity(256 << 10, f);
        let base = read_header(path, &mut reader)?;
        Ok(Self {
            path: path.to_path_buf(),
            base,
            reader,
            pos: HEADER_LEN,
            next_seq: base,
        })
    }

    /// Reads the next record if it ends before `end` (a byte offset in this file).
    pub fn next(&mut self, end: u64, record_bytes_max: usize) -> Result<Option<(u64, Vec<u8>)>> {
        if self.pos >= end {
            return Ok(None);
        }
        match read_record(&mut self.reader, end - self.pos, record_bytes_max).map_err(io_err(&self.path))? {
            Next::Record { seq, payload, len } => {
                if seq != self.next_seq {
                    return Err(corrupt(
                        &self.path,
                        self.pos,
                        format!("expected sequence {}, found {seq}", self.next_seq),
                    ));
                }
                self.pos += len;
                self.next_seq += 1;
                Ok(Some((seq, payload)))
            }
            Next::End => Ok(None),
            Next::Bad(reason) => Err(corrupt(&self.path, self.pos, reason)),
        }
    }

    /// Skips records until `seq` is next.
    pub fn seek_to(&mut self, seq: u64, end: u64, record_bytes_max: usize) -> Result<()> {
        if seq < self.next_seq {
            self.reader
                .seek(SeekFrom::Start(HEADER_LEN))
                .map_err(io_err(&self.path))?;
            self.pos = HEADER_LEN;
            self.next_seq = self.base;
        }
        while self.next_seq < seq {
            if self.next(end, record_bytes_max)?.is_none() {
                break;
            }
        }
        Ok(())
    }
}
