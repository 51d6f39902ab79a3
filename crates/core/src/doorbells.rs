//! Doorbell watching: 32-bit words of shared memory (a BAR's mapped doorbell
//! page, shadow doorbells in guest memory) read for new values, which are
//! collected in batches for a consumer.
//!
//! A guest's store to shared memory signals nothing, so the words must be
//! read. `DoorbellWatch` holds the words, the batch and the policy of when
//! to read them; whoever drives it (the N-API layer, on the JS thread's own
//! event loop) calls `scan` when `next` says. After activity (a word changed,
//! or the consumer said more is coming with `poke`) the answer is `Spin`:
//! scan on every turn of the loop, which then does not block. Then it is
//! `Sleep`, first briefly, each sleep twice as long as the one before up to
//! `max_sleep`, so an idle device costs a wake-up every `max_sleep`; with no
//! word watched, `Wait`. There is no fixed tick.
//!
//! How long the spin lasts adapts to the driver on the other side: one and
//! a half times its last wait from activity to a ring (at least `MIN_SPIN`),
//! when that wait was within `spin`, the cap; `MIN_SPIN` otherwise, and for
//! an idle device. When its last two waits were alike (neither twice the
//! other), the longer of them counts: a driver whose answers jitter (a TCG
//! guest's, by tens of µs) is then still caught spinning after a slow one,
//! where sizing by a quick last answer found about half of a QD1 NVMe
//! host's commands only after a back-off sleep. Waits that differ more
//! are a change of pace, and the last one alone counts: a burst's quick
//! answers after a slow one do not keep the longer spin, whose CPU a
//! busy guest needs. (Always the longer of two was tried: the same QD1
//! gain, but a tenth off virtio-blk's and NVMe's QD32.) With no word watched, only a wait within `UNWATCHED_SPIN`
//! earns a spin. A host that polls (SPDK's) answers in microseconds and
//! costs a short spin; a guest under TCG answers in hundreds and is still
//! caught spinning, not after a back-off sleep that overshoots its ring by
//! up to the sleep's length. (Sleeping through most of a slow driver's
//! wait before spinning was tried: timer wake-ups are late by tens of
//! microseconds here, and a TCG guest's QD1 fell from 0.97-1.36x QEMU's own
//! controller to 0.79x.)
//!
//! Watching on the consumer's own thread, rather than on a thread of its
//! own, is what makes a doorbell cheap on a small machine: a ring found by
//! the loop is handled in the same turn, with no thread to wake and none
//! competing for the core while the device works (a spinning watcher thread
//! pinned with the device's to one core took the core from it).
//!
//! Changed values collect in one pending batch (one entry per doorbell, its
//! latest value). Kicks that carry no value (an ioeventfd, a trapped write
//! that only says "look") are turned into entries of the same batch by `look`.

use crate::mmap::{Mapping, MappingError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How watching trades latency for CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// The longest spin after activity: a doorbell rung within it is seen at
    /// once when the driver's last answer came that soon. Each activity
    /// costs at most this much CPU.
    pub spin: Duration,
    /// The longest sleep between scans once idle: the worst delay of the
    /// first doorbell after a quiet spell; idling costs one scan per sleep.
    pub max_sleep: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { spin: Duration::from_micros(500), max_sleep: Duration::from_millis(4) }
    }
}

/// The first sleep after spinning; each one after doubles, up to `max_sleep`.
pub const FIRST_SLEEP: Duration = Duration::from_micros(10);

/// The spin after activity when the driver's last answer did not come
/// within the cap (or none came yet), and the shortest spin.
pub const MIN_SPIN: Duration = Duration::from_micros(20);

/// How long a spin runs before each turn of it yields the core: past a
/// polling host's answer (SPDK's comes within tens of microseconds), a spin
/// is waiting on a slower driver, a guest whose VMM threads may need this
/// core; a yield lets them run at once, and costs nothing when none waits.
/// (A TCG guest's NVMe QD1 rose from 0.96x QEMU's own controller to 1.00x,
/// median of seven rounds; yielding from the first turn cost SPDK's QD1 7%.)
pub const YIELD_AFTER: Duration = Duration::from_micros(50);

/// With no word watched a spin saves only a wake-up (a message or an
/// eventfd is read without one): worth it for a driver that answers within
/// this, not for one answering in hundreds of microseconds, such as a guest
/// under TCG, whose VMM needs the core meanwhile (there, not spinning took a
/// virtio-blk's QD1 from 0.44x QEMU's own device to 0.51x).
pub const UNWATCHED_SPIN: Duration = Duration::from_micros(50);


/// A doorbell's new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    pub doorbell: u32,
    pub value: u32,
}

/// What the driver does until the next `scan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Scan again on the loop's next turn, without blocking it.
    Spin,
    /// Scan again after this long (blocking is fine until then).
    Sleep(Duration),
    /// Nothing is watched: scan again only when told (`watch`, `poke`, `look`).
    Wait,
}

/// What watching has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Batches that became ready for the consumer (each one delivery).
    pub batches: u64,
    /// Spin phases begun (each after activity).
    pub spins: u64,
    /// Scans of the watched words.
    pub scans: u64,
    /// Sleeps between scans.
    pub sleeps: u64,
    /// Time the watching took, in nanoseconds: whole spin phases (the loop
    /// does not block during them) and the scans made between sleeps.
    pub busy_nanos: u64,
}

struct Word {
    memory: Arc<Mapping>,
    offset: u64,
    /// The value last reported (or the baseline it started from).
    last: u32,
}

pub struct DoorbellWatch {
    config: WatchConfig,
    words: BTreeMap<u32, Word>,
    /// Rings not taken yet: one per doorbell, in the order they first changed.
    pending: Vec<Ring>,
    /// When the first ring of `pending` was found.
    pending_since: Option<Instant>,
    /// When the batch last taken was found.
    taken_since: Option<Instant>,
    /// After activity: spinning until then; `None` once it is over.
    spin_until: Option<Instant>,
    /// The last activity, from which the wait for the next ring is measured.
    active_at: Option<Instant>,
    /// What the next spin is sized by: the driver's last wait from activity
    /// to ring, or the longer of its last two when they were alike; `None`
    /// when that was beyond the cap.
    expected: Option<Duration>,
    /// The driver's last wait from activity to ring.
    last_wait: Option<Duration>,
    /// When the spin under way began.
    spin_started: Option<Instant>,
    /// The next sleep's length.
    sleep: Duration,
    stats: WatchStats,
}

impl DoorbellWatch {
    pub fn new(config: WatchConfig) -> DoorbellWatch {
        DoorbellWatch {
            config,
            words: BTreeMap::new(),
            pending: Vec::new(),
            pending_since: None,
            taken_since: None,
            spin_until: None,
            active_at: None,
            expected: None,
            last_wait: None,
            spin_started: None,
            sleep: FIRST_SLEEP,
            stats: WatchStats::default(),
        }
    }

    pub fn configure(&mut self, config: WatchConfig, now: Instant) {
        self.config = config;
        self.poke(now);
    }

    /// Watches `doorbell`'s value at `offset` of `memory` (aligned; the
    /// mapping stays alive while watched). The first value reported is the
    /// first one that differs from `baseline` (the current value if none).
    /// Replaces an earlier watch of `doorbell`, dropping its pending ring.
    pub fn watch(&mut self, doorbell: u32, memory: Arc<Mapping>, offset: u64, baseline: Option<u32>, now: Instant) -> Result<(), MappingError> {
        let current = memory.load_u32(offset)?;
        self.forget(doorbell);
        self.words.insert(doorbell, Word { memory, offset, last: baseline.unwrap_or(current) });
        self.poke(now);
        Ok(())
    }

    /// Stops watching `doorbell` and drops its pending ring.
    pub fn unwatch(&mut self, doorbell: u32) {
        self.words.remove(&doorbell);
        self.forget(doorbell);
    }

    pub fn is_watched(&self, doorbell: u32) -> bool {
        self.words.contains_key(&doorbell)
    }

    /// A kick that carries no value: reads `doorbell`'s word now and puts it
    /// in the batch (even unchanged). Returns false for a doorbell not
    /// watched or a word that cannot be read.
    pub fn look(&mut self, doorbell: u32, now: Instant) -> bool {
        let Some(word) = self.words.get_mut(&doorbell) else { return false };
        let Ok(value) = word.memory.load_u32(word.offset) else { return false };
        word.last = value;
        self.push(doorbell, value, now);
        self.rung(now);
        true
    }

    /// A doorbell rang some other way (a trapped write, an ioeventfd): the
    /// driver's answer, timed like one found in memory, and activity.
    pub fn rung(&mut self, now: Instant) {
        if let Some(active) = self.active_at {
            let waited = now.saturating_duration_since(active);
            let sized_by = match self.last_wait {
                Some(last) if last <= waited * 2 && waited <= last * 2 => last.max(waited),
                _ => waited,
            };
            self.last_wait = Some(waited);
            self.expected = (sized_by <= self.config.spin).then_some(sized_by);
        }
        self.poke(now);
    }

    /// Activity: the consumer expects doorbells soon (it just completed
    /// work), so the loop spins again, for as long as the driver took to
    /// answer last time (the slower of its last two answers, when they were
    /// alike) and half again. With no word watched there is
    /// nothing to scan, but a spin still keeps the loop from blocking, so
    /// a doorbell that comes as a message or an eventfd is read without a
    /// wake-up: it spins only for a driver that answered within
    /// `UNWATCHED_SPIN`.
    pub fn poke(&mut self, now: Instant) {
        self.active_at = Some(now);
        self.sleep = FIRST_SLEEP;
        if self.words.is_empty() {
            let quick = self.expected.filter(|&wait| wait <= UNWATCHED_SPIN);
            self.spin_until = quick.map(|wait| now + (wait * 3 / 2).max(MIN_SPIN));
            return;
        }
        let spin = self.expected.map_or(MIN_SPIN, |wait| (wait * 3 / 2).max(MIN_SPIN));
        self.spin_until = Some(now + spin.min(self.config.spin));
    }

    /// The consumer stored `value` into `doorbell`'s word itself (re-arming
    /// it): only a later value other than that one rings. Drops the
    /// doorbell's ring not yet taken; not activity. False when the doorbell
    /// is not watched.
    pub fn rebase(&mut self, doorbell: u32, value: u32) -> bool {
        let Some(word) = self.words.get_mut(&doorbell) else { return false };
        word.last = value;
        self.forget(doorbell);
        true
    }

    /// Reads every watched word; a changed one joins the batch and starts
    /// (or extends) a spin. Returns whether a batch waits to be taken.
    pub fn scan(&mut self, now: Instant) -> bool {
        if self.words.is_empty() {
            return !self.pending.is_empty();
        }
        self.stats.scans += 1;
        let mut changed = Vec::new();
        for (&doorbell, word) in self.words.iter_mut() {
            // A word whose memory was truncated under it reads as unchanged:
            // the device finds the fault when it touches that memory itself.
            let Ok(value) = word.memory.load_u32(word.offset) else { continue };
            if value != word.last {
                word.last = value;
                changed.push((doorbell, value));
            }
        }
        if !changed.is_empty() {
            for (doorbell, value) in changed {
                self.push(doorbell, value, now);
            }
            self.rung(now);
        }
        !self.pending.is_empty()
    }

    /// What to do until the next scan, as of `now` (just after a scan or a
    /// poke). A back-off `Sleep` is counted as taken, and the one after it
    /// is twice as long (up to `max_sleep`).
    pub fn next(&mut self, now: Instant) -> Next {
        if let Some(until) = self.spin_until {
            if now < until {
                if self.spin_started.is_none() {
                    self.stats.spins += 1;
                    self.spin_started = Some(now);
                }
                return Next::Spin;
            }
            self.spin_until = None;
        }
        self.end_spin(now);
        if self.words.is_empty() {
            return Next::Wait;
        }
        let sleep = self.sleep;
        self.sleep = (sleep * 2).min(self.config.max_sleep);
        self.stats.sleeps += 1;
        Next::Sleep(sleep)
    }

    /// Whether the loop, spinning, should yield the core after this turn:
    /// the spin has lasted `YIELD_AFTER`.
    pub fn should_yield(&self, now: Instant) -> bool {
        self.spin_started.is_some_and(|started| now.saturating_duration_since(started) >= YIELD_AFTER)
    }

    /// Counts `nanos` of work done for watching outside spins (a scan after a sleep).
    pub fn account(&mut self, nanos: u64) {
        if self.spin_started.is_none() {
            self.stats.busy_nanos += nanos;
        }
    }

    /// Moves up to `out.len()` pending rings into `out`, returning how many.
    pub fn take(&mut self, out: &mut [Ring]) -> usize {
        let n = self.pending.len().min(out.len());
        for (slot, ring) in out.iter_mut().zip(self.pending.drain(..n)) {
            *slot = ring;
        }
        self.taken_since = self.pending_since;
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        n
    }

    /// When the rings last taken were found (the first of them), if any was found in memory.
    pub fn taken_since(&self) -> Option<Instant> {
        self.taken_since
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn stats(&self) -> WatchStats {
        self.stats
    }

    fn end_spin(&mut self, now: Instant) {
        if let Some(started) = self.spin_started.take() {
            self.stats.busy_nanos += now.saturating_duration_since(started).as_nanos() as u64;
        }
    }

    /// Adds or updates `doorbell`'s ring.
    fn push(&mut self, doorbell: u32, value: u32, now: Instant) {
        if self.pending.is_empty() {
            self.pending_since = Some(now);
            self.stats.batches += 1;
        }
        match self.pending.iter_mut().find(|r| r.doorbell == doorbell) {
            Some(ring) => ring.value = value,
            None => self.pending.push(Ring { doorbell, value }),
        }
    }

    fn forget(&mut self, doorbell: u32) {
        self.pending.retain(|r| r.doorbell != doorbell);
        if self.pending.is_empty() {
            self.pending_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Protection;

    const RW: Protection = Protection { read: true, write: true };
    const SPIN: Duration = Duration::from_micros(500);
    const MAX_SLEEP: Duration = Duration::from_micros(100);

    /// A sealed page the test stores to (as a guest would) and the watch reads.
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

    fn watch() -> DoorbellWatch {
        DoorbellWatch::new(WatchConfig { spin: SPIN, max_sleep: MAX_SLEEP })
    }

    /// A watch of doorbell `doorbell` at `offset` of a fresh page, from `t0`; the page as the guest stores to it.
    fn watching(doorbell: u32, offset: u64) -> (Arc<Mapping>, DoorbellWatch, Instant) {
        let (guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        w.watch(doorbell, device, offset, None, t0).unwrap();
        (guest, w, t0)
    }

    fn take_all(w: &mut DoorbellWatch) -> Vec<Ring> {
        let mut out = [Ring { doorbell: 0, value: 0 }; 16];
        let n = w.take(&mut out);
        out[..n].to_vec()
    }

    #[test]
    fn a_store_to_a_watched_word_joins_the_batch_with_its_value() {
        let (guest, mut w, t0) = watching(3, 12);
        assert!(!w.scan(t0));
        store(&guest, 12, 7);
        assert!(w.scan(t0));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 3, value: 7 }]);
        assert_eq!(w.taken_since(), Some(t0));
        assert!(!w.scan(t0), "an unchanged word is not reported again");
        store(&guest, 12, 9);
        assert!(w.scan(t0));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 3, value: 9 }]);
        let stats = w.stats();
        assert_eq!((stats.batches, stats.scans), (2, 4));
    }

    #[test]
    fn stores_before_the_take_coalesce_into_one_batch_of_latest_values() {
        let (guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        w.watch(0, device.clone(), 0, None, t0).unwrap();
        w.watch(1, device, 4, None, t0).unwrap();
        store(&guest, 0, 1);
        assert!(w.scan(t0));
        store(&guest, 4, 5);
        store(&guest, 0, 2);
        assert!(w.scan(t0 + SPIN / 2));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 0, value: 2 }, Ring { doorbell: 1, value: 5 }]);
        assert_eq!(w.taken_since(), Some(t0), "the batch dates from its first ring");
        assert_eq!(w.stats().batches, 1);
    }

    #[test]
    fn it_spins_after_activity_then_sleeps_longer_each_time_up_to_max_sleep() {
        let (_guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        assert_eq!(w.next(t0), Next::Wait, "nothing watched");
        w.watch(0, device, 0, None, t0).unwrap();
        assert_eq!(w.next(t0 + MIN_SPIN / 2), Next::Spin, "watching is activity");
        let mut t = t0 + MIN_SPIN;
        let sleeps: Vec<Next> = (0..5)
            .map(|_| {
                w.scan(t);
                let next = w.next(t);
                if let Next::Sleep(d) = next {
                    t += d;
                }
                next
            })
            .collect();
        let us = Duration::from_micros;
        assert_eq!(sleeps, [us(10), us(20), us(40), us(80), us(100)].map(Next::Sleep));
        let stats = w.stats();
        assert_eq!((stats.spins, stats.sleeps), (1, 5));
        assert_eq!(stats.busy_nanos, MIN_SPIN.as_nanos() as u64 / 2, "the spin, from its first turn to its end");
    }

    #[test]
    fn spins_last_one_and_a_half_times_the_drivers_last_answer_within_the_cap() {
        let (guest, mut w, t0) = watching(0, 0);
        let us = Duration::from_micros;
        // A quick driver: the device posts completions (poke), the answer comes 8 µs later.
        w.poke(t0);
        assert_eq!(w.next(t0), Next::Spin);
        store(&guest, 0, 1);
        assert!(w.scan(t0 + us(8)));
        w.take(&mut [Ring { doorbell: 0, value: 0 }; 4]);
        // That ring is activity too: spin again, 1.5 x 8 µs but at least MIN_SPIN.
        assert_eq!(w.next(t0 + us(8) + MIN_SPIN - us(1)), Next::Spin);
        assert_eq!(w.next(t0 + us(8) + MIN_SPIN), Next::Sleep(FIRST_SLEEP));
        // A slow driver (a guest under TCG): found 200 µs after the poke, after back-off sleeps.
        let t1 = t0 + us(100);
        w.poke(t1);
        store(&guest, 0, 2);
        assert!(w.scan(t1 + us(200)));
        w.take(&mut [Ring { doorbell: 0, value: 0 }; 4]);
        // Next time the spin is still on when it answers: 300 µs from the poke.
        let t2 = t1 + us(400);
        w.poke(t2);
        assert_eq!(w.next(t2 + us(299)), Next::Spin);
        assert_eq!(w.next(t2 + us(300)), Next::Sleep(FIRST_SLEEP));
        // The cap bounds every spin: an answer of 400 µs spins 500 µs, not 600.
        let t3 = t2 + us(1000);
        w.poke(t3);
        store(&guest, 0, 3);
        assert!(w.scan(t3 + us(400)));
        let t4 = t3 + us(1000);
        w.poke(t4);
        assert_eq!(w.next(t4 + SPIN - us(1)), Next::Spin);
        assert_eq!(w.next(t4 + SPIN), Next::Sleep(FIRST_SLEEP));
        // An answer later than the cap: short spins again.
        let t5 = t4 + us(2000);
        w.poke(t5);
        store(&guest, 0, 4);
        assert!(w.scan(t5 + SPIN + us(1)));
        let t6 = t5 + us(2000);
        w.poke(t6);
        assert_eq!(w.next(t6 + MIN_SPIN), Next::Sleep(FIRST_SLEEP));
        assert!(w.stats().busy_nanos > 0);
    }

    #[test]
    fn alike_answers_spin_for_the_slower_one_and_a_change_of_pace_for_the_last() {
        let (guest, mut w, t0) = watching(0, 0);
        let us = Duration::from_micros;
        let answer = |w: &mut DoorbellWatch, at: Instant, after: Duration, value: u32| {
            w.poke(at);
            store(&guest, 0, value);
            assert!(w.scan(at + after));
        };
        // A jittery driver: 150 µs, then 100 µs. The next spin covers the slower one: 1.5 x 150 µs.
        answer(&mut w, t0, us(150), 1);
        let t1 = t0 + us(1000);
        answer(&mut w, t1, us(100), 2);
        let t2 = t1 + us(1000);
        w.poke(t2);
        assert_eq!(w.next(t2 + us(224)), Next::Spin);
        assert_eq!(w.next(t2 + us(225)), Next::Sleep(FIRST_SLEEP));
        // A change of pace: 10 µs after 100 µs (more than twice apart). The last answer alone: 1.5 x 10 µs, at least MIN_SPIN.
        answer(&mut w, t2, us(10), 3);
        let t3 = t2 + us(1000);
        w.poke(t3);
        assert_eq!(w.next(t3 + MIN_SPIN - us(1)), Next::Spin);
        assert_eq!(w.next(t3 + MIN_SPIN), Next::Sleep(FIRST_SLEEP));
        // And back: 100 µs after 10 µs is sized by 100 µs alone.
        answer(&mut w, t3, us(100), 4);
        let t4 = t3 + us(1000);
        w.poke(t4);
        assert_eq!(w.next(t4 + us(149)), Next::Spin);
        assert_eq!(w.next(t4 + us(150)), Next::Sleep(FIRST_SLEEP));
    }

    #[test]
    fn with_nothing_watched_pokes_spin_only_for_a_quick_driver_and_nothing_sleeps() {
        let (_guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        let us = Duration::from_micros;
        assert_eq!(w.next(t0), Next::Wait);
        w.poke(t0);
        assert_eq!(w.next(t0), Next::Wait, "no answer timed yet: nothing to gain by spinning");
        // A trapped write 40 µs after the poke: the next poke spins 60 µs, then waits (no back-off sleeps).
        w.rung(t0 + us(40));
        let t1 = t0 + us(1000);
        w.poke(t1);
        assert_eq!(w.next(t1 + us(59)), Next::Spin, "a poke spins the loop even with nothing to scan");
        assert_eq!(w.next(t1 + us(60)), Next::Wait);
        // An answer 100 µs after a poke is past UNWATCHED_SPIN: the next poke does not spin.
        w.rung(t1 + us(100));
        let t2 = t1 + us(1000);
        w.poke(t2);
        assert_eq!(w.next(t2), Next::Wait);
        // Watching a word, the same answer spins 150 µs, then backs off.
        w.watch(0, device, 0, None, t2).unwrap();
        w.poke(t2);
        assert_eq!(w.next(t2 + us(149)), Next::Spin);
        assert!(matches!(w.next(t2 + us(150)), Next::Sleep(_)), "watching, it backs off instead");
        w.unwatch(0);
        assert_eq!(w.next(t2 + SPIN), Next::Wait);
    }

    #[test]
    fn a_spin_yields_the_core_once_it_has_lasted_yield_after() {
        let (_guest, mut w, t0) = watching(0, 0);
        assert!(!w.should_yield(t0), "not spinning");
        w.poke(t0);
        assert_eq!(w.next(t0), Next::Spin);
        assert!(!w.should_yield(t0 + YIELD_AFTER / 2), "a quick driver's answer comes within the first turns");
        assert_eq!(w.next(t0 + MIN_SPIN / 2), Next::Spin);
        assert!(!w.should_yield(t0 + MIN_SPIN / 2));
        // A spin lasting past YIELD_AFTER (a slow driver's answer timed earlier) yields each turn.
        w.rung(t0 + Duration::from_micros(200));
        let t1 = t0 + Duration::from_micros(1000);
        w.poke(t1);
        assert_eq!(w.next(t1), Next::Spin);
        assert!(w.should_yield(t1 + YIELD_AFTER));
        assert_eq!(w.next(t1 + Duration::from_micros(300)), Next::Sleep(FIRST_SLEEP));
        assert!(!w.should_yield(t1 + Duration::from_micros(300)), "the spin is over");
    }

    #[test]
    fn a_rebased_word_rings_only_for_a_later_store_and_rebasing_is_not_activity() {
        let (guest, mut w, t0) = watching(0, 8);
        store(&guest, 8, 3);
        assert!(w.scan(t0));
        take_all(&mut w);
        let t1 = t0 + SPIN;
        assert!(matches!(w.next(t1), Next::Sleep(_)), "the spin that ring started is over");
        // The consumer re-arms the word with a value of its own, as virtio's mapped notify slots do.
        store(&guest, 8, 0xffff_ffff);
        assert!(w.rebase(0, 0xffff_ffff));
        assert!(matches!(w.next(t1), Next::Sleep(_)), "rebasing starts no spin");
        assert!(!w.scan(t1), "its own store does not ring");
        store(&guest, 8, 3);
        assert!(w.scan(t1), "the driver's next store rings, even with the value it stored before");
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 0, value: 3 }]);
        assert!(!w.rebase(1, 0), "not watched");
    }

    #[test]
    fn a_baseline_other_than_the_memory_is_reported_at_the_first_scan() {
        let (guest, device) = page();
        store(&guest, 8, 4);
        let mut w = watch();
        w.watch(2, device, 8, Some(0), Instant::now()).unwrap();
        assert!(w.scan(Instant::now()));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 2, value: 4 }]);
    }

    #[test]
    fn look_reads_the_word_now_and_unwatch_drops_its_ring() {
        let (guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        store(&guest, 0, 6);
        w.watch(0, device, 0, Some(6), t0).unwrap();
        assert!(w.look(0, t0));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 0, value: 6 }]);
        assert!(!w.look(1, t0));
        assert!(w.look(0, t0));
        w.unwatch(0);
        assert!(!w.has_pending());
        assert_eq!(take_all(&mut w), vec![]);
        assert!(!w.is_watched(0));
    }

    #[test]
    fn a_short_take_leaves_the_rest_pending() {
        let (_guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        for d in 0..3 {
            w.watch(d, device.clone(), 4 * d as u64, None, t0).unwrap();
            assert!(w.look(d, t0));
        }
        let mut one = [Ring { doorbell: 0, value: 0 }; 1];
        assert_eq!(w.take(&mut one), 1);
        assert!(w.has_pending());
        assert_eq!(take_all(&mut w).len(), 2);
        assert!(!w.has_pending());
    }

    #[test]
    fn words_outside_unaligned_or_unreadable_are_refused() {
        let (_guest, device) = page();
        let mut w = watch();
        let t0 = Instant::now();
        assert!(matches!(w.watch(0, device.clone(), 4094, None, t0), Err(MappingError::OutOfBounds { .. })));
        assert!(matches!(w.watch(0, device, 2, None, t0), Err(MappingError::Unaligned { .. })));
        let fd = crate::memfd::create("wo", 4096).unwrap();
        let write_only = Arc::new(Mapping::new(&fd, 0, 4096, Protection { read: false, write: true }).unwrap());
        assert!(matches!(w.watch(0, write_only, 0, None, t0), Err(MappingError::Forbidden(_))));
        assert!(!w.is_watched(0));
    }

    #[test]
    fn a_truncated_page_stops_reporting_without_killing_the_process() {
        let fd = crate::memfd::create("shrinks", 2 * 4096).unwrap();
        let memory = Arc::new(Mapping::new(&fd, 0, 2 * 4096, RW).unwrap());
        let mut w = watch();
        let t0 = Instant::now();
        w.watch(0, memory.clone(), 4096, None, t0).unwrap();
        w.watch(1, memory.clone(), 0, None, t0).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(!w.look(0, t0));
        store(&memory, 0, 3);
        assert!(w.scan(t0));
        assert_eq!(take_all(&mut w), vec![Ring { doorbell: 1, value: 3 }]);
    }
}
