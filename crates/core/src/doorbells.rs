//! Doorbell watching: a thread that watches 32-bit words of shared memory
//! (a BAR's mapped doorbell page, shadow doorbells in guest memory) and hands
//! their new values to a consumer in batches.
//!
//! A guest's store to shared memory signals nothing, so the words must be
//! read. After activity (a word changed, or the consumer said more is coming
//! with `poke`) the thread scans continuously for `spin`; then it sleeps,
//! first briefly, each sleep twice as long as the one before up to
//! `max_sleep`, so an idle device costs a wake-up every `max_sleep`. With no
//! word watched it sleeps until told otherwise. There is no fixed tick.
//!
//! Changed values collect in one pending batch (one entry per doorbell, its
//! latest value); the thread writes the `notify` eventfd when the batch goes
//! from empty to non-empty, so a consumer polling that fd on its own event
//! loop is woken once per batch, with no other thread in between. While a
//! batch waits to be taken the thread does not scan (the consumer is busy
//! with the one before, and on a small machine a spinning thread would take
//! its CPU); after the take it sleeps briefly between scans, and it spins
//! again when the consumer pokes it (it posted completions: doorbells follow). Kicks that
//! carry no value (an ioeventfd, a trapped write that only says "look") are
//! turned into entries of the same batch by `look`, on the consumer's thread.

use crate::eventfd;
use crate::mmap::{Mapping, MappingError};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the watcher trades latency for CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// How long scanning goes on after the last activity: a doorbell rung
    /// within it is seen at once. Each activity costs at most this much CPU.
    pub spin: Duration,
    /// The longest sleep between scans once idle: the worst delay of the
    /// first doorbell after a quiet spell; idling costs one scan per sleep.
    pub max_sleep: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { spin: Duration::from_micros(50), max_sleep: Duration::from_millis(4) }
    }
}

/// The first sleep after spinning; each one after doubles, up to `max_sleep`.
const FIRST_SLEEP: Duration = Duration::from_micros(10);

/// A doorbell's new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    pub doorbell: u32,
    pub value: u32,
}

/// What watching has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Batches the thread announced on `notify` (each one consumer wake-up).
    pub wakes: u64,
    /// Spin phases begun (each after activity).
    pub spins: u64,
    /// Scans of the watched words.
    pub scans: u64,
    /// Sleeping waits.
    pub sleeps: u64,
    /// CPU time of the watching thread, in nanoseconds (as of its last sleep).
    pub cpu_nanos: u64,
}

struct Word {
    memory: Arc<Mapping>,
    offset: u64,
    /// The value last reported (or the baseline it started from).
    last: u32,
}

#[derive(Default)]
struct State {
    words: BTreeMap<u32, Word>,
    /// Rings not taken yet: one per doorbell, in the order they first changed.
    pending: Vec<Ring>,
}

/// Adds or updates `doorbell`'s ring; returns whether the batch was empty.
fn push(pending: &mut Vec<Ring>, doorbell: u32, value: u32) -> bool {
    let was_empty = pending.is_empty();
    match pending.iter_mut().find(|r| r.doorbell == doorbell) {
        Some(ring) => ring.value = value,
        None => pending.push(Ring { doorbell, value }),
    }
    was_empty
}

impl State {
    fn forget(&mut self, doorbell: u32) {
        self.pending.retain(|r| r.doorbell != doorbell);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Written when the batch becomes non-empty; the consumer polls it.
    notify: OwnedFd,
    /// Wakes the thread from a sleep.
    wake: OwnedFd,
    spin_nanos: AtomicU64,
    max_sleep_nanos: AtomicU64,
    /// Set by `poke` (and watch changes): scan again and spin.
    activity: AtomicBool,
    /// The thread is (about to be) in its sleeping wait: a poke must write `wake`.
    sleeping: AtomicBool,
    /// How long that wait is, in nanoseconds (u64::MAX: until woken).
    sleep_nanos: AtomicU64,
    stop: AtomicBool,
    wakes: AtomicU64,
    spins: AtomicU64,
    scans: AtomicU64,
    sleeps: AtomicU64,
    cpu_nanos: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poke(&self) {
        self.activity.store(true, Ordering::SeqCst);
        // A short sleep ends soon enough by itself (and then spins): waking
        // the thread now would only make the kernel run it in place of the
        // poking thread, which is about to do the work the guest waits for.
        if self.sleep_nanos.load(Ordering::SeqCst) > self.spin_nanos.load(Ordering::Relaxed) {
            self.wake_thread();
        }
    }

    fn wake_thread(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            // An eventfd of our own: the write cannot block or fail.
            let _ = eventfd::signal(&self.wake);
        }
    }

    /// Reads every watched word; announces the batch if it became non-empty.
    /// Returns whether any word changed, and whether a batch waits.
    fn scan(&self) -> (bool, bool) {
        let mut state = self.state();
        let State { words, pending } = &mut *state;
        let mut changed = false;
        let mut announce = false;
        for (&doorbell, word) in words.iter_mut() {
            // A word whose memory was truncated under it reads as unchanged:
            // the device finds the fault when it touches that memory itself.
            let Ok(value) = word.memory.load_u32(word.offset) else { continue };
            if value != word.last {
                word.last = value;
                changed = true;
                announce |= push(pending, doorbell, value);
            }
        }
        let watching = !words.is_empty();
        let held = !pending.is_empty();
        drop(state);
        if watching {
            self.scans.fetch_add(1, Ordering::Relaxed);
        }
        if announce {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            let _ = eventfd::signal(&self.notify);
        }
        (changed, held)
    }

    fn configure(&self, config: WatchConfig) {
        self.spin_nanos.store(config.spin.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.max_sleep_nanos.store(config.max_sleep.as_nanos().clamp(1, u64::MAX as u128) as u64, Ordering::Relaxed);
        self.poke();
    }

    fn watching(&self) -> bool {
        !self.state().words.is_empty()
    }
}

/// Watches doorbell words on a thread of its own until dropped.
pub struct DoorbellWatcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DoorbellWatcher {
    pub fn new(config: WatchConfig) -> rustix::io::Result<DoorbellWatcher> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            notify: eventfd::create()?,
            wake: eventfd::create()?,
            spin_nanos: AtomicU64::new(0),
            max_sleep_nanos: AtomicU64::new(0),
            activity: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            sleep_nanos: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            spins: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            cpu_nanos: AtomicU64::new(0),
        });
        shared.configure(config);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("vfio-user-doorbells".into())
                .spawn(move || run(&shared))
                .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::AGAIN))?
        };
        Ok(DoorbellWatcher { shared, thread: Some(thread) })
    }

    /// Readable while a batch waits; `take` clears it.
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.shared.notify.as_fd()
    }

    pub fn configure(&self, config: WatchConfig) {
        self.shared.configure(config);
    }

    /// Watches `doorbell`'s value at `offset` of `memory` (aligned; the
    /// mapping stays alive while watched). The first value reported is the
    /// first one that differs from `baseline` (the current value if none).
    /// Replaces an earlier watch of `doorbell`, dropping its pending ring.
    pub fn watch(&self, doorbell: u32, memory: Arc<Mapping>, offset: u64, baseline: Option<u32>) -> Result<(), MappingError> {
        let current = memory.load_u32(offset)?;
        let mut state = self.shared.state();
        state.forget(doorbell);
        state.words.insert(doorbell, Word { memory, offset, last: baseline.unwrap_or(current) });
        drop(state);
        self.shared.poke();
        Ok(())
    }

    /// Stops watching `doorbell` and drops its pending ring.
    pub fn unwatch(&self, doorbell: u32) {
        let mut state = self.shared.state();
        state.words.remove(&doorbell);
        state.forget(doorbell);
    }

    pub fn is_watched(&self, doorbell: u32) -> bool {
        self.shared.state().words.contains_key(&doorbell)
    }

    /// A kick that carries no value: reads `doorbell`'s word now and puts it
    /// in the batch (even unchanged). Does not announce it: the caller takes
    /// the batch next. Returns false for a doorbell not watched or a word
    /// that cannot be read.
    pub fn look(&self, doorbell: u32) -> bool {
        let mut state = self.shared.state();
        let Some(word) = state.words.get_mut(&doorbell) else { return false };
        let Ok(value) = word.memory.load_u32(word.offset) else { return false };
        word.last = value;
        push(&mut state.pending, doorbell, value);
        drop(state);
        self.shared.poke();
        true
    }

    /// Activity: the consumer expects doorbells soon (it just completed work),
    /// so the thread scans and spins again.
    pub fn poke(&self) {
        if self.shared.watching() {
            self.shared.poke();
        }
    }

    /// Moves up to `out.len()` pending rings into `out`, returning how many.
    /// Rings left over (only when `out` is short) are announced again.
    pub fn take(&self, out: &mut [Ring]) -> usize {
        // Cleared before the batch is taken: a ring added after the take
        // finds the batch empty and announces itself.
        let _ = eventfd::take(&self.shared.notify);
        let mut state = self.shared.state();
        let n = state.pending.len().min(out.len());
        for (slot, ring) in out.iter_mut().zip(state.pending.drain(..n)) {
            *slot = ring;
        }
        if !state.pending.is_empty() {
            let _ = eventfd::signal(&self.shared.notify);
        }
        drop(state);
        // The thread rests while a batch waits: watch again (sleeping briefly
        // at first; a poke makes it spin).
        self.shared.wake_thread();
        n
    }

    pub fn stats(&self) -> WatchStats {
        let s = &self.shared;
        WatchStats {
            wakes: s.wakes.load(Ordering::Relaxed),
            spins: s.spins.load(Ordering::Relaxed),
            scans: s.scans.load(Ordering::Relaxed),
            sleeps: s.sleeps.load(Ordering::Relaxed),
            cpu_nanos: s.cpu_nanos.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DoorbellWatcher {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stop.store(true, Ordering::SeqCst);
            let _ = eventfd::signal(&self.shared.wake);
            let _ = thread.join();
        }
    }
}

/// This thread's CPU time in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn run(shared: &Shared) {
    // Sleeps of tens of microseconds mean nothing with the default 50 µs of
    // timer slack.
    // SAFETY: PR_SET_TIMERSLACK takes a value in nanoseconds and affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let mut spin_until: Option<Instant> = None;
    let mut sleep = FIRST_SLEEP;
    while !shared.stop.load(Ordering::Acquire) {
        let (changed, held) = shared.scan();
        let now = Instant::now();
        if changed || shared.activity.swap(false, Ordering::AcqRel) {
            if spin_until.is_none() {
                shared.spins.fetch_add(1, Ordering::Relaxed);
            }
            spin_until = Some(now + Duration::from_nanos(shared.spin_nanos.load(Ordering::Relaxed)));
            sleep = FIRST_SLEEP;
        }
        if !held && spin_until.is_some_and(|until| now < until) {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
            continue;
        }
        spin_until = None;
        // Until the sleep's length is known, a poke wakes it.
        shared.sleep_nanos.store(u64::MAX, Ordering::SeqCst);
        shared.sleeping.store(true, Ordering::SeqCst);
        // A poke or a take that came before `sleeping` was visible wrote no wake-up.
        if shared.activity.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            shared.sleeping.store(false, Ordering::SeqCst);
            continue;
        }
        shared.cpu_nanos.store(thread_cpu_nanos(), Ordering::Relaxed);
        // While a batch waits for the consumer, it is busy with the last one:
        // scanning now would only take CPU from it. The take (or a poke) wakes us.
        // Looked at again now that `sleeping` is set: a take since the scan
        // found no sleeper to wake.
        let held = !shared.state().pending.is_empty();
        let timeout = (shared.watching() && !held).then(|| Timespec {
            tv_sec: (sleep.as_secs()) as _,
            tv_nsec: sleep.subsec_nanos() as _,
        });
        shared.sleep_nanos.store(if timeout.is_some() { sleep.as_nanos() as u64 } else { u64::MAX }, Ordering::SeqCst);
        let mut fds = [PollFd::new(&shared.wake, PollFlags::IN)];
        let _ = poll(&mut fds, timeout.as_ref());
        let _ = eventfd::take(&shared.wake);
        shared.sleeping.store(false, Ordering::SeqCst);
        shared.sleeps.fetch_add(1, Ordering::Relaxed);
        let max_sleep = Duration::from_nanos(shared.max_sleep_nanos.load(Ordering::Relaxed));
        sleep = if held { FIRST_SLEEP } else { (sleep * 2).min(max_sleep) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Protection;

    const RW: Protection = Protection { read: true, write: true };

    /// A sealed page the test stores to (as a guest would) and the watcher reads.
    fn page() -> (Arc<Mapping>, Arc<Mapping>) {
        let fd = crate::memfd::create("doorbells", 4096).unwrap();
        crate::memfd::seal_size(&fd).unwrap();
        let guest = Arc::new(Mapping::new(&fd, 0, 4096, RW).unwrap());
        let device = Arc::new(Mapping::new(&fd, 0, 4096, RW).unwrap());
        (guest, device)
    }

    fn store(m: &Mapping, offset: u64, value: u32) {
        m.write_at(offset, &value.to_ne_bytes()).unwrap();
    }

    /// Waits (without a deadline that could fail a slow machine) for a batch.
    fn next_batch(w: &DoorbellWatcher) -> Vec<Ring> {
        loop {
            let mut fds = [PollFd::from_borrowed_fd(w.notify_fd(), PollFlags::IN)];
            poll(&mut fds, None).unwrap();
            let mut out = [Ring { doorbell: 0, value: 0 }; 16];
            let n = w.take(&mut out);
            if n > 0 {
                return out[..n].to_vec();
            }
        }
    }

    #[test]
    fn a_store_to_a_watched_word_is_announced_with_its_value() {
        let (guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig::default()).unwrap();
        w.watch(3, device.clone(), 12, None).unwrap();
        store(&guest, 12, 7);
        assert_eq!(next_batch(&w), vec![Ring { doorbell: 3, value: 7 }]);
        store(&guest, 12, 9);
        assert_eq!(next_batch(&w), vec![Ring { doorbell: 3, value: 9 }]);
        let stats = w.stats();
        assert!(stats.wakes >= 2 && stats.spins >= 1 && stats.scans >= 2, "{stats:?}");
    }

    #[test]
    fn stores_before_the_take_coalesce_into_one_batch_of_latest_values() {
        let (guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig::default()).unwrap();
        w.watch(0, device.clone(), 0, None).unwrap();
        w.watch(1, device.clone(), 4, None).unwrap();
        store(&guest, 0, 1);
        // Wait until the watcher has seen the first store, then add more
        // before taking: they join the same batch.
        let mut fds = [PollFd::from_borrowed_fd(w.notify_fd(), PollFlags::IN)];
        poll(&mut fds, None).unwrap();
        store(&guest, 4, 5);
        store(&guest, 0, 2);
        let mut batch = Vec::new();
        while batch.len() < 2 || batch.iter().any(|r: &Ring| r.doorbell == 0 && r.value != 2) {
            for ring in next_batch(&w) {
                batch.retain(|r: &Ring| r.doorbell != ring.doorbell);
                batch.push(ring);
            }
        }
        batch.sort_by_key(|r| r.doorbell);
        assert_eq!(batch, vec![Ring { doorbell: 0, value: 2 }, Ring { doorbell: 1, value: 5 }]);
    }

    #[test]
    fn a_baseline_other_than_the_memory_is_reported_at_once() {
        let (guest, device) = page();
        store(&guest, 8, 4);
        let w = DoorbellWatcher::new(WatchConfig::default()).unwrap();
        w.watch(2, device, 8, Some(0)).unwrap();
        assert_eq!(next_batch(&w), vec![Ring { doorbell: 2, value: 4 }]);
    }

    #[test]
    fn look_reads_the_word_now_and_unwatch_drops_its_ring() {
        let (guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig { spin: Duration::ZERO, max_sleep: Duration::from_secs(3600) }).unwrap();
        store(&guest, 0, 6);
        w.watch(0, device.clone(), 0, Some(6)).unwrap();
        assert!(w.look(0));
        let mut out = [Ring { doorbell: 0, value: 0 }; 4];
        assert_eq!(w.take(&mut out), 1);
        assert_eq!(out[0], Ring { doorbell: 0, value: 6 });
        assert!(!w.look(1));
        assert!(w.look(0));
        w.unwatch(0);
        assert_eq!(w.take(&mut out), 0);
        assert!(!w.is_watched(0));
    }

    #[test]
    fn a_short_take_leaves_the_rest_announced() {
        let (_guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig { spin: Duration::ZERO, max_sleep: Duration::from_secs(3600) }).unwrap();
        for d in 0..3 {
            w.watch(d, device.clone(), 4 * d as u64, None).unwrap();
            assert!(w.look(d));
        }
        let mut one = [Ring { doorbell: 0, value: 0 }; 1];
        assert_eq!(w.take(&mut one), 1);
        assert!(eventfd::ready(w.notify_fd(), PollFlags::IN).unwrap());
        let mut rest = [Ring { doorbell: 0, value: 0 }; 4];
        assert_eq!(w.take(&mut rest), 2);
        assert!(!eventfd::ready(w.notify_fd(), PollFlags::IN).unwrap());
    }

    #[test]
    fn words_outside_unaligned_or_unreadable_are_refused() {
        let (_guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig::default()).unwrap();
        assert!(matches!(w.watch(0, device.clone(), 4094, None), Err(MappingError::OutOfBounds { .. })));
        assert!(matches!(w.watch(0, device.clone(), 2, None), Err(MappingError::Unaligned { .. })));
        let fd = crate::memfd::create("wo", 4096).unwrap();
        let write_only = Arc::new(Mapping::new(&fd, 0, 4096, Protection { read: false, write: true }).unwrap());
        assert!(matches!(w.watch(0, write_only, 0, None), Err(MappingError::Forbidden(_))));
        assert!(!w.is_watched(0));
    }

    #[test]
    fn a_truncated_page_stops_reporting_without_killing_the_process() {
        let fd = crate::memfd::create("shrinks", 2 * 4096).unwrap();
        let memory = Arc::new(Mapping::new(&fd, 0, 2 * 4096, RW).unwrap());
        let w = DoorbellWatcher::new(WatchConfig::default()).unwrap();
        w.watch(0, memory.clone(), 4096, None).unwrap();
        w.watch(1, memory.clone(), 0, None).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(!w.look(0));
        store(&memory, 0, 3);
        assert_eq!(next_batch(&w), vec![Ring { doorbell: 1, value: 3 }]);
    }

    #[test]
    fn idle_it_sleeps_and_with_nothing_watched_it_does_not_scan() {
        let (guest, device) = page();
        let w = DoorbellWatcher::new(WatchConfig { spin: Duration::from_micros(10), max_sleep: Duration::from_micros(100) }).unwrap();
        w.poke();
        assert_eq!(w.stats().scans, 0);
        w.watch(0, device, 0, None).unwrap();
        // Each sleep ends in a scan: more than a few sleeps mean it backed off and kept watching.
        while w.stats().sleeps < 5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        store(&guest, 0, 1);
        assert_eq!(next_batch(&w), vec![Ring { doorbell: 0, value: 1 }]);
        w.unwatch(0);
        let stats = w.stats();
        assert!(stats.cpu_nanos > 0, "{stats:?}");
    }
}
