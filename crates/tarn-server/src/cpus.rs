//! A CPU kept free of delivery and curate while ingest requests arrive.
//!
//! The background threads run in the kernel's idle scheduling class, yet they still slow the
//! requests beside them. While one is runnable its CPU never counts as idle, so the kernel
//! neither pulls waiting request threads over to it nor spreads the request threads woken
//! later; and when a request thread uses up its time slice, the scheduler may run a
//! background thread for a whole slice (one tick, 4 ms at 250 Hz) before the request thread
//! gets the CPU back. A profile of the scheduler in `tarn bench` at half the peak rate showed
//! both: a 5 ms decode stretched by 4 ms of curate, and request threads waiting 5 to 10 ms
//! for a CPU behind another request while the other CPU ran background work.
//!
//! So, with `--ingest-cpus N`, while requests arrive the background threads may run only on
//! the CPUs not reserved for ingest; once none has arrived for [`RELEASE_AFTER`], they get
//! every CPU back, so catching up after a burst uses the whole machine. The request threads
//! themselves may run anywhere.
//!
//! It is off by default. Under ingest that keeps every CPU busy, the background then runs on
//! fewer CPUs until the requests stop, and catches up later: in `tarn bench` at 500 events per
//! request, rows were queryable 0.4 to 0.9 s later and the end-to-end rate fell by about a
//! sixth, while the ack p99 at half the peak rate fell by about a third.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, Pid};

/// How long after the last ingest request the background threads keep off the reserved CPUs.
pub const RELEASE_AFTER: Duration = Duration::from_millis(250);

/// The background threads' CPUs, narrowed while ingest is busy.
pub struct IngestCpus {
    /// Every CPU the process may use.
    all: CpuSet,
    /// `all` without the reserved CPUs; `None` when nothing is reserved.
    rest: Option<CpuSet>,
    /// The background threads: their ids, and whether they are narrowed now.
    threads: Mutex<Threads>,
    /// Ingest requests being answered now.
    inflight: AtomicU64,
    /// When the last ingest request ended, in ms since `epoch`.
    last_ms: AtomicU64,
    narrowed: AtomicBool,
    epoch: Instant,
    /// Times the background was moved off the reserved CPUs.
    narrowings: AtomicU64,
}

#[derive(Default)]
struct Threads {
    ids: HashSet<Pid>,
    narrowed: bool,
}

impl IngestCpus {
    /// Reserves `n` of the CPUs this process may use (the lowest-numbered). Reserving none or
    /// all of them reserves none.
    pub fn new(n: usize) -> Self {
        let all = rustix::thread::sched_getaffinity(None).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the process's CPUs; none is reserved for ingest");
            CpuSet::new()
        });
        let allowed: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| all.is_set(c)).collect();
        let rest = (n > 0 && n < allowed.len()).then(|| {
            let mut rest = all;
            for &c in &allowed[..n] {
                rest.unset(c);
            }
            rest
        });
        Self {
            all,
            rest,
            threads: Mutex::new(Threads::default()),
            inflight: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            narrowed: AtomicBool::new(false),
            epoch: Instant::now(),
            narrowings: AtomicU64::new(0),
        }
    }

    /// How many CPUs are reserved for ingest.
    pub fn reserved(&self) -> usize {
        self.rest
            .as_ref()
            .map_or(0, |r| (self.all.count() - r.count()) as usize)
    }

    /// Whether the background threads are kept off the reserved CPUs now.
    pub fn narrowed(&self) -> bool {
        self.narrowed.load(Relaxed)
    }

    /// Times the background threads were moved off the reserved CPUs.
    pub fn narrowings(&self) -> u64 {
        self.narrowings.load(Relaxed)
    }

    /// Called by each background thread as it starts: it takes the CPUs of the moment.
    pub fn thread_started(&self) {
        let id = rustix::thread::gettid();
        let mut t = self.lock();
        t.ids.insert(id);
        if t.narrowed
            && let Some(rest) = &self.rest
        {
            set(id, rest);
        }
    }

    /// Called by each background thread as it stops.
    pub fn thread_stopped(&self) {
        let id = rustix::thread::gettid();
        self.lock().ids.remove(&id);
    }

    /// Marks an ingest request as begun; the background leaves the reserved CPUs at once if
    /// it was on them. The request ends when the guard is dropped.
    pub fn request(&self) -> RequestGuard<'_> {
        if self.rest.is_none() {
            // Nothing reserved (the default): nothing to count on the request's path.
            return RequestGuard(None);
        }
        // The count goes up before the flag is read, and a release clears the flag before it
        // reads the count (all `SeqCst`): so either this request sees the flag cleared and
        // narrows again, or the release sees this request and gives up.
        self.inflight.fetch_add(1, SeqCst);
        if !self.narrowed.load(SeqCst) {
            self.apply(true);
        }
        RequestGuard(Some(self))
    }

    /// Gives the background every CPU back once no request is in flight and none has ended
    /// for [`RELEASE_AFTER`]. Called every few tens of ms.
    pub fn tick(&self) {
        if !self.narrowed.load(SeqCst) || self.inflight.load(SeqCst) > 0 {
            return;
        }
        let idle_ms = (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.last_ms.load(Relaxed));
        if idle_ms >= RELEASE_AFTER.as_millis() as u64 {
            self.apply(false);
        }
    }

    fn apply(&self, narrow: bool) {
        let Some(rest) = &self.rest else { return };
        let mut t = self.lock();
        if narrow == t.narrowed {
            return;
        }
        if !narrow {
            self.narrowed.store(false, SeqCst);
            if self.inflight.load(SeqCst) > 0 {
                // A request began meanwhile: it keeps the CPUs reserved.
                self.narrowed.store(true, SeqCst);
                return;
            }
        }
        let cpus = if narrow { rest } else { &self.all };
        for &id in &t.ids {
            set(id, cpus);
        }
        t.narrowed = narrow;
        self.narrowed.store(narrow, SeqCst);
        if narrow {
            self.narrowings.fetch_add(1, Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Threads> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An ingest request in flight; see [`IngestCpus::request`].
pub struct RequestGuard<'a>(Option<&'a IngestCpus>);

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let Some(c) = self.0 else { return };
        c.last_ms.store(c.epoch.elapsed().as_millis() as u64, Relaxed);
        c.inflight.fetch_sub(1, SeqCst);
    }
}

fn set(id: Pid, cpus: &CpuSet) {
    // A thread that has just exited (ESRCH) needs nothing; any other failure leaves that thread
    // where it was, which costs latency, not correctness.
    if let Err(e) = rustix::thread::sched_setaffinity(Some(id), cpus)
        && e != rustix::io::Errno::SRCH
    {
        tracing::debug!(error = %e, "cannot move a background thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus_of_this_thread() -> Vec<usize> {
        let s = rustix::thread::sched_getaffinity(None).expect("this thread's CPUs");
        (0..CpuSet::MAX_CPU).filter(|&c| s.is_set(c)).collect()
    }

    /// A background thread leaves the reserved CPU while a request is in flight, new
    /// background threads start off it, and all get it back once requests stop.
    #[test]
    fn background_threads_leave_the_reserved_cpu_while_requests_run() {
        let allowed = cpus_of_this_thread();
        if allowed.len() < 2 {
            eprintln!("skipped: this process may use only one CPU, so none can be reserved");
            return;
        }
        let cpus = std::sync::Arc::new(IngestCpus::new(1));
        assert_eq!(cpus.reserved(), 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (back, seen) = std::sync::mpsc::channel::<Vec<usize>>();
        let c = cpus.clone();
        let bg = std::thread::spawn(move || {
            c.thread_started();
            // Report this thread's CPUs each time asked.
            while rx.recv().is_ok() {
                back.send(cpus_of_this_thread()).expect("test waits");
            }
            c.thread_stopped();
        });
        tx.send(()).expect("thread runs");
        assert_eq!(
            seen.recv().expect("thread answers"),
            allowed,
            "no request yet: every CPU"
        );

        let guard = cpus.request();
        assert!(cpus.narrowed());
        tx.send(()).expect("thread runs");
        assert_eq!(
            seen.recv().expect("thread answers"),
            allowed[1..].to_vec(),
            "during a request: off the first CPU"
        );
        // A thread started now starts off the reserved CPU too.
        let c = cpus.clone();
        let late = std::thread::spawn(move || {
            c.thread_started();
            let cpus = cpus_of_this_thread();
            c.thread_stopped();
            cpus
        })
        .join()
        .expect("thread ends");
        assert_eq!(late, allowed[1..].to_vec());
        // Not released while the request runs, however long.
        std::thread::sleep(RELEASE_AFTER + Duration::from_millis(50));
        cpus.tick();
        assert!(cpus.narrowed());
        drop(guard);
        // Nor right after it ends.
        cpus.tick();
        assert!(cpus.narrowed());
        std::thread::sleep(RELEASE_AFTER + Duration::from_millis(50));
        cpus.tick();
        assert!(!cpus.narrowed());
        tx.send(()).expect("thread runs");
        assert_eq!(
            seen.recv().expect("thread answers"),
            allowed,
            "after requests stop: every CPU again"
        );
        assert_eq!(cpus.narrowings(), 1);
        drop(tx);
        bg.join().expect("thread ends");
    }

    #[test]
    fn nothing_is_reserved_when_asked_for_none_or_all() {
        let n = cpus_of_this_thread().len();
        assert_eq!(IngestCpus::new(0).reserved(), 0);
        assert_eq!(IngestCpus::new(n).reserved(), 0);
        let c = IngestCpus::new(0);
        let _g = c.request();
        assert!(!c.narrowed());
    }
}
