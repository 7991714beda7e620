//! Files whose pages go to the disk as they are written, not all at their final sync.
//!
//! The log's group commit syncs every few milliseconds, and each of those syncs flushes the
//! disk's write cache: whatever else was written since the last flush is flushed with it. A
//! raw object (about 14 MB in `tarn bench`) or a compacted file (up to 128 MB) written whole
//! into the page cache and synced at its end reaches the disk in one burst, and the
//! acknowledgements whose flush lands in that burst wait for all of it: at half the peak rate
//! in `tarn bench`, the log's syncs that overlapped a raw object's had a p99 of 12.8 to 20.5 ms
//! against 5.4 to 9.4 ms for the others.
//!
//! So a [`WriteBehind`] file asks the kernel to start writing each megabyte back as soon as it
//! is written, without waiting for it, and [`finish`] asks for the rest of the file once it is
//! complete. The bytes then reach the disk at the pace they are produced (encoding and
//! compression set it), each of the log's flushes carries about a megabyte of them, and the
//! final sync finds them written or on their way.
//!
//! Asking at the end matters for curate's commits, which write one small file per partition
//! (600 files of about 60 KB a commit in `tarn bench`) and sync them all in one pass before the
//! commit: without it, each file's data waited in the page cache until that pass, which then
//! wrote all of them at once. Asked for as each file is finished, the data goes out while the
//! other partitions are still being encoded, and the pass mostly waits for the file system's
//! journal: in `tarn bench` it took 62 ms a commit at the median and at most 145 ms, against
//! 119 and 354 ms before.
//!
//! The durability of a file is unchanged: it is durable only once its own sync returns.
//!
//! The request is `posix_fadvise(POSIX_FADV_DONTNEED)` over the bytes just written: on Linux
//! it starts writeback of the range's dirty pages (asynchronously) and then drops those of its
//! pages that are already clean, which right after the request are few; the pages under
//! writeback stay cached. It is advice: where it fails, or does nothing, the file is written
//! as before. The call exists on Linux only; elsewhere the file is written as before.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::num::NonZeroU64;
use std::path::Path;

use crate::{Error, Result, io_err};

/// Bytes written between two requests to start writeback.
const WRITE_BEHIND_BYTES: u64 = 1 << 20;

/// A file being written whose pages are sent toward the disk every [`WRITE_BEHIND_BYTES`].
pub(crate) struct WriteBehind {
    file: File,
    /// Bytes written through this writer.
    written: u64,
    /// Bytes whose writeback has been requested.
    sent: u64,
    /// Requests made.
    requests: u64,
    /// Requests the kernel refused.
    refused: u64,
}

impl WriteBehind {
    /// Wraps a file opened for writing at its start.
    fn new(file: File) -> Self {
        Self {
            file,
            written: 0,
            sent: 0,
            requests: 0,
            refused: 0,
        }
    }

    /// How many times writeback was requested so far, and how many of those the kernel
    /// refused.
    #[cfg(test)]
    fn requests(&self) -> (u64, u64) {
        (self.requests, self.refused)
    }

    /// The file, for its final sync.
    fn into_inner(self) -> File {
        self.file
    }

    fn send(&mut self) {
        let Some(len) = NonZeroU64::new(self.written - self.sent) else {
            return;
        };
        #[cfg(target_os = "linux")]
        if let Err(e) = rustix::fs::fadvise(&self.file, self.sent, Some(len), rustix::fs::Advice::DontNeed) {
            self.refused += 1;
            tracing::debug!(
                error = %e,
                refused = self.refused,
                requests = self.requests + 1,
                "could not start writeback early; the final sync writes it all"
            );
        }
        #[cfg(not(target_os = "linux"))]
        let _ = len;
        self.sent = self.written;
        self.requests += 1;
    }
}

/// A new file at `path`, buffered [`WRITE_BEHIND_BYTES`] at a time, so that each write the
/// buffer lets through is one request to start writeback.
pub(crate) fn create(path: &Path) -> Result<BufWriter<WriteBehind>> {
    let file = File::create(path).map_err(io_err(path))?;
    Ok(BufWriter::with_capacity(
        WRITE_BEHIND_BYTES as usize,
        WriteBehind::new(file),
    ))
}

/// Writes out what `w` still buffers, asks for the writeback of whatever of the file has not
/// been asked for yet, and gives back the file, for its size and its sync.
pub(crate) fn finish(w: BufWriter<WriteBehind>, path: &Path) -> Result<File> {
    complete(w, path).map(WriteBehind::into_inner)
}

/// [`finish`], giving back the writer.
fn complete(w: BufWriter<WriteBehind>, path: &Path) -> Result<WriteBehind> {
    let mut w = w.into_inner().map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    w.send();
    Ok(w)
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.sent >= WRITE_BEHIND_BYTES {
            self.send();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn writes_every_byte_and_requests_writeback_each_megabyte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = WriteBehind::new(File::create(&path).expect("create"));
        // Odd-sized writes, so that the megabyte boundaries fall inside writes: 13 writes are
        // 1,011,101 bytes and 14 are 1,088,878, so a request follows every 14th write; 68
        // writes make the 5 MB and more, so 4 requests.
        let chunk: Vec<u8> = (0..77_777u32).map(|i| (i % 251) as u8).collect();
        let mut want = Vec::new();
        while want.len() < 5 * WRITE_BEHIND_BYTES as usize + 1000 {
            w.write_all(&chunk).expect("write");
            want.extend_from_slice(&chunk);
        }
        w.flush().expect("flush");
        assert_eq!(want.len(), 68 * chunk.len());
        assert_eq!(w.requests(), (4, 0));
        let f = w.into_inner();
        f.sync_all().expect("sync");
        drop(f);
        assert_eq!(std::fs::read(&path).expect("read"), want);
    }

    #[test]
    fn megabyte_writes_ask_once_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = WriteBehind::new(File::create(&path).expect("create"));
        for i in 0..3u8 {
            w.write_all(&vec![i; WRITE_BEHIND_BYTES as usize]).expect("write");
            assert_eq!(w.requests(), (u64::from(i) + 1, 0));
        }
        w.write_all(&[9u8; 10]).expect("write");
        assert_eq!(w.requests(), (3, 0));
        drop(w);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            3 * WRITE_BEHIND_BYTES + 10
        );
    }

    #[test]
    fn a_small_file_asks_once_when_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = create(&path).expect("create");
        w.write_all(&[7u8; 1000]).expect("write");
        assert_eq!(
            w.get_ref().requests(),
            (0, 0),
            "no request before a megabyte or the end"
        );
        let mut w = complete(w, &path).expect("complete");
        assert_eq!(w.requests(), (1, 0));
        w.send();
        assert_eq!(w.requests(), (1, 0), "nothing new written, nothing asked");
        drop(w);
        assert_eq!(std::fs::read(&path).expect("read"), vec![7u8; 1000]);
    }

    #[test]
    fn finish_asks_for_what_the_megabytes_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = create(&path).expect("create");
        // Two megabytes and a half through the buffer: a request for each megabyte the buffer
        // lets through, and one at the end for the half megabyte it still holds.
        let half = WRITE_BEHIND_BYTES as usize / 2;
        for i in 0..5u8 {
            w.write_all(&vec![i; half]).expect("write");
        }
        assert_eq!(w.get_ref().requests(), (2, 0));
        let w = complete(w, &path).expect("complete");
        assert_eq!(w.requests(), (3, 0));
        w.into_inner().sync_all().expect("sync");
        let want: Vec<u8> = (0..5u8).flat_map(|i| vec![i; half]).collect();
        assert_eq!(std::fs::read(&path).expect("read"), want);
    }
}
