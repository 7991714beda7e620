//! The process's allocator, mimalloc: how long it keeps memory that was freed, and the size of
//! the pages it takes from the kernel.
//!
//! mimalloc returns freed memory to the system more readily than glibc's allocator under the
//! many-threaded, bursty allocations of encoding batches, which keeps peak RSS down. It returns
//! it in sweeps: the first free after a sweep arms a timer (its `purge_delay`, 1 s by default),
//! and when the timer fires every range freed since goes back, however recently it was freed.
//! An ingest request that comes next allocates its buffers (the body, the column builders, the
//! encoded payload: a few MB at 5,000 events) from memory the kernel must fault in and zero
//! again, up to 1,300 faults in one request. That happened in about one request in ten at half
//! the peak rate of `tarn bench`, and made the slowest 1% of acks two to three times slower
//! than the rest. With a 10 s delay a busy server reuses its memory between sweeps, and an idle
//! one still gives it back within seconds.
//!
//! The process also takes its memory from the kernel in 4 KiB pages, not transparent huge
//! pages. mimalloc asks for huge pages on every arena it maps (`madvise(MADV_HUGEPAGE)`), and
//! then the first touch of any byte of a 2 MiB range has the kernel zero all of it, on the
//! touching thread; mimalloc's purges give ranges back in pieces that split huge pages, so the
//! zeroing comes back. In `tarn bench` page zeroing was 16% of the server's CPU while it
//! ingested flat out; without huge pages it ingested about 1.2x as many events per second
//! (medians of 16 and 7 runs: 773K against 627K) with about half the ack p99 at full speed
//! (54 against 115 ms), and peak RSS no higher (613 to 742 MiB against 697 to 767).

/// How long freed memory stays with the process before mimalloc returns it to the system,
/// unless `MIMALLOC_PURGE_DELAY` says otherwise.
const PURGE_DELAY_MS: i64 = 10_000;

/// `mi_option_purge_delay`, the option's number in the mimalloc (v3) that `libmimalloc-sys`
/// builds (its `mimalloc.h`); the crate names no constant for it. A test checks the number
/// against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_allow_thp`, likewise; a test checks it by its neighbours' defaults.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the environment sets
/// `MIMALLOC_PURGE_DELAY` (mimalloc reads it itself at load), and turns transparent huge pages
/// off for the process (and the processes it starts), unless the environment sets
/// `MIMALLOC_ALLOW_THP`. Call it first in `main`, while no other thread exists.
#[allow(unsafe_code)]
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores an integer in mimalloc's table of options and takes no
        // pointer. It must not race another thread's use of the option, so it is called once,
        // from `main`, before any other thread starts.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above. With it off, mimalloc no longer asks for huge pages on the arenas
        // it maps from now on.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) }
        no_huge_pages();
    }
}

/// Turns transparent huge pages off for this process's memory, with the process-wide switch
/// rather than mimalloc's own option: mimalloc maps its first arena at the first allocation,
/// before `main`, and the switch covers memory mapped already.
#[allow(unsafe_code)]
fn no_huge_pages() {
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` takes integers only and sets a flag of
    // this process's memory map; it fails only on a kernel without the switch (before 3.15),
    // which is then left as it is.
    #[cfg(target_os = "linux")]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of `options`, which hold their defaults unless the environment sets `env`
    /// (then `None`: mimalloc read it at load).
    #[allow(unsafe_code)]
    fn defaults<const N: usize>(
        env: &str,
        options: [libmimalloc_sys::mi_option_t; N],
    ) -> Option<[std::ffi::c_long; N]> {
        if std::env::var_os(env).is_some() {
            eprintln!("{env} is set: the option's default cannot be read");
            return None;
        }
        // SAFETY: reads integers from mimalloc's table of options; no test sets options.
        Some(options.map(|o| unsafe { libmimalloc_sys::mi_option_get(o) }))
    }

    /// Option 43 allows huge pages: unset, it holds 1, between option 42 (pages reclaimed
    /// across threads, 32) and option 44 (the smallest purge, 0).
    #[test]
    fn allow_thp_option() {
        let o = MI_OPTION_ALLOW_THP;
        let Some(around) = defaults("MIMALLOC_ALLOW_THP", [o - 1, o, o + 1]) else {
            return;
        };
        assert_eq!(around, [32, 1, 0], "option {o} of mimalloc is not allow_thp");
    }

    /// The kernel then reports huge pages off for the process (the `THP_enabled` line of its
    /// status, 1 before).
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_off() {
        let flag = || {
            let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("THP_enabled:"))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(flag().as_deref(), Some("1"));
        no_huge_pages();
        assert_eq!(flag().as_deref(), Some("0"));
    }

    /// Option 15 is the purge delay: unset, it holds that option's default, 1,000 ms in
    /// mimalloc v3, which no other option of v3 has. Fails if an upgrade of the allocator
    /// renumbers its options.
    #[test]
    fn purge_delay_option() {
        let Some([ms]) = defaults("MIMALLOC_PURGE_DELAY", [MI_OPTION_PURGE_DELAY]) else {
            return;
        };
        assert_eq!(
            ms, 1000,
            "option {MI_OPTION_PURGE_DELAY} of mimalloc is not the purge delay"
        );
    }
}
