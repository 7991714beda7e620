//! One segment file: a header, then records. Encoding, scanning and recovery live here.
//!
//! Segment header (28 bytes): magic `TARNLOG2`, base sequence (u64 LE), salt (u64 LE, random
//! per segment file), CRC-32C of the first 24 bytes. Record: payload length (u32 LE), CRC-32C
//! of (salt, sequence, payload) (u32 LE), sequence (u64 LE), payload.
//!
//! The salt is there because segment files are reused (a consumed segment becomes the next
//! segment of any topic, so that appends overwrite blocks the file system has already
//! allocated): past a segment's last record lie an earlier segment's bytes, and a record of
//! theirs fails its checksum under the new salt, so recovery ends at the last record written
//! under this header.
//!
//! Segments written before the salt (magic `TARNLOG1`, a 20-byte header without it, records
//! checksummed over (sequence, payload)) are still read, and appended to until they roll.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::{Error, Result, io_err};

pub(crate) const MAGIC: &[u8; 8] = b"TARNLOG2";
const MAGIC_V1: &[u8; 8] = b"TARNLOG1";
/// Length of the header of the segments written now.
pub(crate) const HEADER_LEN: u64 = 28;
const HEADER_LEN_V1: u64 = 20;
pub(crate) const RECORD_HEADER_LEN: usize = 16;

/// What a segment's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub base: u64,
    /// Mixed into every record's checksum; `None` in a segment of the first format.
    pub salt: Option<u64>,
    /// Bytes of the header: where the first record starts.
    pub len: u64,
}

impl Header {
    /// A header for a new segment file, with a fresh salt.
    pub(crate) fn new(base: u64) -> Self {
        use std::hash::BuildHasher;
        let salt = std::collections::hash_map::RandomState::new().hash_one((
            base,
            std::process::id(),
            std::time::SystemTime::now(),
        ));
        Self {
            base,
            salt: Some(salt),
            len: HEADER_LEN,
        }
    }
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// The bytes of a header of the current format (`salt` must be set).
pub(crate) fn encode_header(h: &Header) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&h.base.to_le_bytes());
    b[16..24].copy_from_slice(&h.salt.unwrap_or(0).to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn record_crc(salt: Option<u64>, seq: u64, payload: &[u8]) -> u32 {
    let c = match salt {
        Some(s) => crc32c::crc32c_append(crc32c::crc32c(&s.to_le_bytes()), &seq.to_le_bytes()),
        None => crc32c::crc32c(&seq.to_le_bytes()),
    };
    crc32c::crc32c_append(c, payload)
}

pub(crate) fn encode_record_header(salt: Option<u64>, seq: u64, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&record_crc(salt, seq, payload).to_le_bytes());
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

/// Reads and checks a segment header, of either format.
pub(crate) fn read_header(path: &Path, f: &mut impl Read) -> Result<Header> {
    let short = |e: std::io::Error| corrupt(path, 0, format!("short segment header: {e}"));
    let mut h = [0u8; HEADER_LEN as usize];
    f.read_exact(&mut h[..HEADER_LEN_V1 as usize]).map_err(short)?;
    let len = match &h[..8] {
        m if m == MAGIC => {
            f.read_exact(&mut h[HEADER_LEN_V1 as usize..]).map_err(short)?;
            HEADER_LEN
        }
        m if m == MAGIC_V1 => HEADER_LEN_V1,
        _ => return Err(corrupt(path, 0, "bad segment magic")),
    };
    let at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let body = len as usize - 4;
    let crc = u32::from_le_bytes([h[body], h[body + 1], h[body + 2], h[body + 3]]);
    if crc != crc32c::crc32c(&h[..body]) {
        return Err(corrupt(path, 0, "segment header checksum mismatch"));
    }
    Ok(Header {
        base: at(8),
        salt: (len == HEADER_LEN).then(|| at(16)),
        len,
    })
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

/// Reads the record at the reader's position. `limit` is how many bytes may be read from here;
/// `salt` is the segment's.
pub(crate) fn read_record(
    r: &mut impl Read,
    limit: u64,
    record_bytes_max: usize,
    salt: Option<u64>,
) -> Result<Next, std::io::Error> {
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
    if record_crc(salt, seq, &payload) != crc {
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
    pub header: Header,
    /// Bytes of valid data (header included); the file is truncated to this.
    pub valid_len: u64,
    /// The sequence after the last valid record.
    pub next_seq: u64,
}

/// Scans a segment from its start, truncating what follows its last whole record: a torn or
/// corrupt tail, or the bytes of the earlier segment a reused file held.
pub(crate) fn recover(path: &Path, record_bytes_max: usize) -> Result<Recovered> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, &file);
    let header = read_header(path, &mut r)?;
    let mut pos = header.len;
    let mut next = header.base;
    loop {
        match read_record(&mut r, file_len - pos, record_bytes_max, header.salt).map_err(io_err(path))? {
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
                // A reused file always has bytes past its last record: only a tail of the
                // first format (never reused) or a short one is a sign of a torn write.
                if header.salt.is_none() || file_len - pos < RECORD_HEADER_LEN as u64 {
                    tracing::warn!(path = %path.display(), pos, %reason, "truncating torn log tail");
                } else {
                    tracing::info!(path = %path.display(), pos, bytes = file_len - pos, %reason,
                        "truncating the log segment after its last whole record (a torn write or a reused file's old bytes)");
                }
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
        header,
        valid_len: pos,
        next_seq: next,
    })
}

/// A file read no further than `end`. The buffered reader over it never reads ahead past the
/// durable end it was given: in a reused file, the bytes beyond are an older segment's until
/// the writer overwrites them, and a buffer holding them would go stale.
struct Bounded {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.end.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Bounded {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

/// A sequential reader over one segment, bounded by a byte limit (the durable end).
pub(crate) struct SegmentReader {
    pub path: PathBuf,
    header: Header,
    reader: BufReader<Bounded>,
    pub pos: u64,
    pub next_seq: u64,
}

impl SegmentReader {
    /// Opens the segment that starts at `base` (which its header must say).
    pub fn open(path: &Path, base: u64) -> Result<Self> {
        let f = File::open(path).map_err(io_err(path))?;
        // The header is durable before the file takes its name; a header of the first format
        // is shorter, and its file was never reused.
        let bounded = Bounded {
            file: f,
            pos: 0,
            end: HEADER_LEN,
        };
        let mut reader = BufReader::with_capacity(256 << 10, bounded);
        let header = read_header(path, &mut reader)?;
        if header.base != base {
            return Err(corrupt(
                path,
                0,
                format!("the header says the segment starts at {}", header.base),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            reader,
            pos: header.len,
            next_seq: header.base,
        })
    }

    pub fn base(&self) -> u64 {
        self.header.base
    }

    /// Reads the next record if it ends before `end` (a byte offset in this file).
    pub fn next(&mut self, end: u64, record_bytes_max: usize) -> Result<Option<(u64, Vec<u8>)>> {
        if self.pos >= end {
            return Ok(None);
        }
        self.reader.get_mut().end = end;
        match read_record(&mut self.reader, end - self.pos, record_bytes_max, self.header.salt)
            .map_err(io_err(&self.path))?
        {
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
                .seek(SeekFrom::Start(self.header.len))
                .map_err(io_err(&self.path))?;
            self.pos = self.header.len;
            self.next_seq = self.header.base;
        }
        while self.next_seq < seq {
            if self.next(end, record_bytes_max)?.is_none() {
                break;
            }
        }
        Ok(())
    }
}
