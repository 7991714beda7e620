//! The process's allocator, mimalloc, and how long it keeps memory that was freed.
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

/// How long freed memory stays with the process before mimalloc returns it to the system,
/// unless `MIMALLOC_PURGE_DELAY` says otherwise.
const PURGE_DELAY_MS: i64 = 10_000;

/// `mi_option_purge_delay`, the option's number in the mimalloc (v3) that `libmimalloc-sys`
/// builds (its `mimalloc.h`); the crate names no constant for it. A test checks the number
/// against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the environment sets
/// `MIMALLOC_PURGE_DELAY` (mimalloc reads it itself at load). Call it first in `main`, while no
/// other thread exists.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` stores an integer in mimalloc's table of options and takes no
    // pointer. It must not race another thread's use of the option, so it is called once, from
    // `main`, before any other thread starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Option 15 is the purge delay: unset, it holds that option's default, 1,000 ms in
    /// mimalloc v3, which no other option of v3 has. Fails if an upgrade of the allocator
    /// renumbers its options.
    #[test]
    #[allow(unsafe_code)]
    fn purge_delay_option() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("MIMALLOC_PURGE_DELAY is set: the option's default cannot be read");
            return;
        }
        // SAFETY: reads an integer from mimalloc's table of options; no test sets options.
        let ms = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            ms, 1000,
            "option {MI_OPTION_PURGE_DELAY} of mimalloc is not the purge delay"
        );
    }
}
