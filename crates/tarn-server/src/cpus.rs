//! A CPU kept free of delivery and curate while ingest requests arrive, unless ingest needs
//! every CPU.
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
//! So, while requests arrive, the background threads may run only on the CPUs not reserved
//! for ingest (by default one in four, at least one); once none has arrived for
//! [`RELEASE_AFTER`], they get every CPU back, so catching up after a burst uses the whole
//! machine. The request threads themselves may run anywhere.
//!
//! Under ingest that keeps every CPU busy the reservation costs more than it gives: the
//! background, on fewer CPUs, falls behind until the requests stop. So the load is measured:
//! the mean number of requests in flight (their time in flight per unit of time, which
//! Little's law makes the request rate times the mean latency), smoothed over about
//! [`LOAD_SMOOTHING`]. When it reaches [`SATURATED_ENTER`] of the CPUs, the background gets
//! every CPU back at once, requests or not; when it falls below [`SATURATED_LEAVE`] of them,
//! requests reserve the CPUs again. Time in flight counts a request's wait for the group
//! commit as well as its CPU time, so the measure errs toward "busy", which only gives the
//! background more room.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, Pid};

/// How long after the last ingest request the background threads keep off the reserved CPUs.
pub const RELEASE_AFTER: Duration = Duration::from_millis(250);

/// How often [`IngestCpus::tick`] should be called.
pub const TICK: Duration = Duration::from_millis(50);

/// The time constant of the smoothed load.
pub const LOAD_SMOOTHING: Duration = Duration::from_millis(200);

/// Ingest counts as saturating once the smoothed requests in flight reach this share of the
/// process's CPUs ...
pub const SATURATED_ENTER: f64 = 0.75;

/// ... and no longer once they fall below this share.
pub const SATURATED_LEAVE: f64 = 0.5;

/// The CPUs reserved for ingest by default: one for every four the process may use, at least
/// one, and none on a single CPU.
pub fn default_reserved(cpus: usize) -> usize {
    if cpus < 2 { 0 } else { (cpus / 4).max(1) }
}

/// The background threads' CPUs, narrowed while ingest is busy but not saturating.
pub struct IngestCpus {
    /// Every CPU the process may use.
    all: CpuSet,
    /// `all` without the reserved CPUs; `None` when nothing is reserved.
    rest: Option<CpuSet>,
    /// The background threads: their ids, and whether they are narrowed now.
    threads: Mutex<Threads>,
    narrowed: AtomicBool,
    /// Whether ingest keeps every CPU busy now, so nothing is reserved.
    saturated: AtomicBool,
    /// The requests in flight and their time in flight.
    busy: Mutex<Busy>,
    /// The smoothed load, updated by `tick`.
    load: Mutex<Load>,
    /// The last smoothed load, in thousandths of a request in flight, for `/metrics`.
    load_milli: AtomicU64,
    epoch: Instant,
    /// Times the background was moved off the reserved CPUs.
    narrowings: AtomicU64,
    /// Times the background got every CPU back because ingest saturated them.
    saturations: AtomicU64,
}

#[derive(Default)]
struct Threads {
    ids: HashSet<Pid>,
    narrowed: bool,
}

/// The ingest requests in flight and their time in flight, in µs since `epoch`: at time `t`
/// it is `done + inflight * t - starts`. Kept under one lock so that they agree.
#[derive(Default)]
struct Busy {
    /// Ingest requests being answered now.
    inflight: u64,
    /// The sum of the start times of the requests in flight.
    starts: u64,
    /// The time in flight of the requests that ended.
    done: u64,
    /// When the last request ended.
    last_end: u64,
}

impl Busy {
    fn at(&self, t: u64) -> u64 {
        (self.done + self.inflight * t).saturating_sub(self.starts)
    }
}

/// The smoothed mean of requests in flight, and whether it counts as saturating.
#[derive(Default)]
struct Load {
    last_t: u64,
    last_busy: u64,
    mean: f64,
    saturated: bool,
}

impl Load {
    /// Takes the time in flight `busy` at time `t` (both in µs) and answers whether ingest
    /// saturates `cpus` CPUs now.
    fn update(&mut self, t: u64, busy: u64, cpus: f64) -> bool {
        let dt = t.saturating_sub(self.last_t);
        if dt == 0 {
            return self.saturated;
        }
        let sample = busy.saturating_sub(self.last_busy) as f64 / dt as f64;
        let weight = (dt as f64 / LOAD_SMOOTHING.as_micros() as f64).min(1.0);
        self.mean += weight * (sample - self.mean);
        self.last_t = t;
        self.last_busy = busy;
        if self.mean >= SATURATED_ENTER * cpus {
            self.saturated = true;
        } else if self.mean < SATURATED_LEAVE * cpus {
            self.saturated = false;
        }
        self.saturated
    }
}

impl IngestCpus {
    /// Reserves `reserved` of the CPUs this process may use (the lowest-numbered); `None`
    /// reserves [`default_reserved`] of them. Reserving none or all of them reserves none.
    pub fn new(reserved: Option<usize>) -> Self {
        let all = rustix::thread::sched_getaffinity(None).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the process's CPUs; none is reserved for ingest");
            CpuSet::new()
        });
        let allowed: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| all.is_set(c)).collect();
        let n = reserved.unwrap_or_else(|| default_reserved(allowed.len()));
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
            narrowed: AtomicBool::new(false),
            saturated: AtomicBool::new(false),
            busy: Mutex::new(Busy::default()),
            load: Mutex::new(Load::default()),
            load_milli: AtomicU64::new(0),
            epoch: Instant::now(),
            narrowings: AtomicU64::new(0),
            saturations: AtomicU64::new(0),
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

    /// Whether ingest keeps every CPU busy now, so that the background may use them all.
    pub fn saturated(&self) -> bool {
        self.saturated.load(Relaxed)
    }

    /// The smoothed mean of ingest requests in flight, as of the last tick.
    pub fn load(&self) -> f64 {
        self.load_milli.load(Relaxed) as f64 / 1000.0
    }

    /// Times the background threads were moved off the reserved CPUs.
    pub fn narrowings(&self) -> u64 {
        self.narrowings.load(Relaxed)
    }

    /// Times the background threads got every CPU back because ingest saturated them.
    pub fn saturations(&self) -> u64 {
        self.saturations.load(Relaxed)
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

    /// Marks an ingest request as begun; unless ingest saturates the CPUs, the background
    /// leaves the reserved CPUs at once if it was on them. The request ends when the guard is
    /// dropped.
    pub fn request(&self) -> RequestGuard<'_> {
        if self.rest.is_none() {
            // Nothing reserved: nothing to count on the request's path.
            return RequestGuard { cpus: None, start: 0 };
        }
        let start = self.now_us();
        // The count goes up and the flag is read under the lock, and a release clears the flag
        // before it takes the lock to read the count: so either this request sees the flag
        // cleared and narrows again, or the release sees this request and gives up.
        let narrow = {
            let mut b = lock(&self.busy);
            b.inflight += 1;
            b.starts += start;
            !self.narrowed.load(SeqCst) && !self.saturated.load(SeqCst)
        };
        if narrow {
            self.narrow();
        }
        RequestGuard {
            cpus: Some(self),
            start,
        }
    }

    /// Updates the load; gives the background every CPU back when ingest saturates them, or
    /// once no request is in flight and none has ended for [`RELEASE_AFTER`]. Called every
    /// [`TICK`].
    pub fn tick(&self) {
        if self.rest.is_none() {
            return;
        }
        let now = self.now_us();
        let (busy, inflight, last_end) = {
            let b = lock(&self.busy);
            (b.at(now), b.inflight, b.last_end)
        };
        let (saturated, mean) = {
            let mut l = lock(&self.load);
            (l.update(now, busy, f64::from(self.all.count())), l.mean)
        };
        self.load_milli.store((mean * 1000.0) as u64, Relaxed);
        // Stored before the lock is taken to widen: a request that narrows after this sees it.
        if saturated != self.saturated.swap(saturated, SeqCst) && saturated {
            self.saturations.fetch_add(1, Relaxed);
        }
        if saturated {
            self.widen(true);
            return;
        }
        if !self.narrowed.load(SeqCst) || inflight > 0 {
            return;
        }
        if now.saturating_sub(last_end) >= RELEASE_AFTER.as_micros() as u64 {
            self.widen(false);
        }
    }

    fn narrow(&self) {
        let Some(rest) = &self.rest else { return };
        let mut t = self.lock();
        if t.narrowed || self.saturated.load(SeqCst) {
            return;
        }
        for &id in &t.ids {
            set(id, rest);
        }
        t.narrowed = true;
        self.narrowed.store(true, SeqCst);
        self.narrowings.fetch_add(1, Relaxed);
    }

    /// Gives the background every CPU back; unless `force`, not while a request is in flight.
    fn widen(&self, force: bool) {
        let mut t = self.lock();
        if !t.narrowed {
            return;
        }
        self.narrowed.store(false, SeqCst);
        if !force && lock(&self.busy).inflight > 0 {
            // A request began meanwhile: it keeps the CPUs reserved.
            self.narrowed.store(true, SeqCst);
            return;
        }
        for &id in &t.ids {
            set(id, &self.all);
        }
        t.narrowed = false;
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Threads> {
        lock(&self.threads)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An ingest request in flight; see [`IngestCpus::request`].
pub struct RequestGuard<'a> {
    cpus: Option<&'a IngestCpus>,
    /// When it began, in µs since the epoch.
    start: u64,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let Some(c) = self.cpus else { return };
        let end = c.now_us();
        {
            let mut b = lock(&c.busy);
            b.inflight -= 1;
            b.starts -= self.start;
            b.done += end.saturating_sub(self.start);
            b.last_end = end;
        }
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

    /// Ticks every [`TICK`] until `done`, at most 40 times.
    fn tick_until(cpus: &IngestCpus, done: impl Fn(&IngestCpus) -> bool, what: &str) {
        for _ in 0..40 {
            if done(cpus) {
                return;
            }
            std::thread::sleep(TICK);
            cpus.tick();
        }
        assert!(done(cpus), "never {what}; load {}", cpus.load());
    }

    /// A background thread that reports its CPUs each time it is asked.
    struct Reporter {
        ask: std::sync::mpsc::Sender<()>,
        answer: std::sync::mpsc::Receiver<Vec<usize>>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Reporter {
        fn start(cpus: &std::sync::Arc<IngestCpus>) -> Self {
            let (ask, rx) = std::sync::mpsc::channel::<()>();
            let (back, answer) = std::sync::mpsc::channel::<Vec<usize>>();
            let c = cpus.clone();
            let thread = std::thread::spawn(move || {
                c.thread_started();
                while rx.recv().is_ok() {
                    back.send(cpus_of_this_thread()).expect("test waits");
                }
                c.thread_stopped();
            });
            Self { ask, answer, thread }
        }

        fn cpus(&self) -> Vec<usize> {
            self.ask.send(()).expect("thread runs");
            self.answer.recv().expect("thread answers")
        }

        fn stop(self) {
            drop(self.ask);
            self.thread.join().expect("thread ends");
        }
    }

    /// The CPUs this thread may use, when there are several; none (with a note) when one
    /// alone, as no CPU can then be reserved.
    fn several_cpus() -> Option<Vec<usize>> {
        let allowed = cpus_of_this_thread();
        if allowed.len() < 2 {
            eprintln!("skipped: this process may use only one CPU, so none can be reserved");
            return None;
        }
        Some(allowed)
    }

    /// A background thread leaves the reserved CPU while a request is in flight, new
    /// background threads start off it, and all get it back once requests stop.
    #[test]
    fn background_threads_leave_the_reserved_cpu_while_requests_run() {
        let Some(allowed) = several_cpus() else { return };
        let cpus = std::sync::Arc::new(IngestCpus::new(Some(1)));
        assert_eq!(cpus.reserved(), 1);
        let bg = Reporter::start(&cpus);
        assert_eq!(bg.cpus(), allowed, "no request yet: every CPU");

        let guard = cpus.request();
        assert!(cpus.narrowed());
        assert_eq!(bg.cpus(), allowed[1..].to_vec(), "during a request: off the first CPU");
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
        // Not released while the request runs, however long: one request in flight is not
        // saturating.
        std::thread::sleep(RELEASE_AFTER + Duration::from_millis(50));
        cpus.tick();
        assert!(cpus.narrowed());
        assert!(!cpus.saturated(), "load {}", cpus.load());
        drop(guard);
        // Nor right after it ends.
        cpus.tick();
        assert!(cpus.narrowed());
        std::thread::sleep(RELEASE_AFTER + Duration::from_millis(50));
        cpus.tick();
        assert!(!cpus.narrowed());
        assert_eq!(bg.cpus(), allowed, "after requests stop: every CPU again");
        assert_eq!(cpus.narrowings(), 1);
        bg.stop();
    }

    /// When requests keep every CPU busy, the background gets the reserved CPU back while
    /// they are still in flight, and new requests do not take it away until the load falls.
    #[test]
    fn saturating_ingest_gives_the_background_every_cpu() {
        let Some(allowed) = several_cpus() else { return };
        let cpus = std::sync::Arc::new(IngestCpus::new(Some(1)));
        let bg = Reporter::start(&cpus);
        // Twice as many requests in flight as there are CPUs.
        let held: Vec<_> = (0..2 * allowed.len()).map(|_| cpus.request()).collect();
        assert!(cpus.narrowed());
        assert_eq!(bg.cpus(), allowed[1..].to_vec());
        tick_until(&cpus, |c| c.saturated(), "saturated");
        assert!(cpus.load() >= SATURATED_ENTER * allowed.len() as f64);
        assert!(!cpus.narrowed(), "saturated: every CPU although requests are in flight");
        assert_eq!(bg.cpus(), allowed);
        assert_eq!(cpus.saturations(), 1);
        // A new request while saturated leaves the background where it is.
        let one_more = cpus.request();
        assert!(!cpus.narrowed());
        assert_eq!(bg.cpus(), allowed);
        drop(one_more);
        drop(held);
        // Once the load falls below the lower mark, a request reserves the CPU again.
        tick_until(&cpus, |c| !c.saturated(), "out of saturation");
        assert!(cpus.load() < SATURATED_LEAVE * allowed.len() as f64);
        let again = cpus.request();
        assert!(cpus.narrowed());
        assert_eq!(bg.cpus(), allowed[1..].to_vec());
        assert_eq!(cpus.narrowings(), 2);
        drop(again);
        bg.stop();
    }

    /// The smoothed load follows the time in flight, with room between entering and leaving.
    #[test]
    fn load_rises_and_falls_with_time_in_flight() {
        let tick = TICK.as_micros() as u64;
        let mut l = Load::default();
        let (mut t, mut busy) = (0, 0);
        let mut run = |l: &mut Load, in_flight: f64, ticks: usize| {
            let mut saturated = Vec::new();
            for _ in 0..ticks {
                t += tick;
                busy += (in_flight * tick as f64) as u64;
                saturated.push(l.update(t, busy, 2.0));
            }
            saturated
        };
        // 1.2 in flight on two CPUs: between the marks, never saturating from below.
        assert!(run(&mut l, 1.2, 40).iter().all(|s| !s));
        assert!((l.mean - 1.2).abs() < 0.01, "{}", l.mean);
        // 1.8: saturating within a few ticks, and it stays so.
        let s = run(&mut l, 1.8, 40);
        let first = s.iter().position(|s| *s).expect("saturates");
        assert!(first <= 8, "after {first} ticks");
        assert!(s[first..].iter().all(|s| *s));
        // Back to 1.2: still saturating (between the marks).
        assert!(run(&mut l, 1.2, 40).iter().all(|s| *s));
        // 0.5: below the lower mark within a few ticks.
        let s = run(&mut l, 0.5, 40);
        let first = s.iter().position(|s| !*s).expect("leaves");
        assert!(first <= 8, "after {first} ticks");
        // A tick with no time passed changes nothing.
        assert!(!l.update(t, busy, 2.0));
    }

    #[test]
    fn nothing_is_reserved_when_asked_for_none_or_all() {
        let n = cpus_of_this_thread().len();
        assert_eq!(IngestCpus::new(Some(0)).reserved(), 0);
        assert_eq!(IngestCpus::new(Some(n)).reserved(), 0);
        let c = IngestCpus::new(Some(0));
        let _g = c.request();
        assert!(!c.narrowed());
        assert_eq!(default_reserved(1), 0);
        assert_eq!(default_reserved(2), 1);
        assert_eq!(default_reserved(4), 1);
        assert_eq!(default_reserved(8), 2);
        assert_eq!(IngestCpus::new(None).reserved(), default_reserved(n));
    }
}
