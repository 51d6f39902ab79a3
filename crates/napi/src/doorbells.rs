//! `NativeDoorbellWatcher`: the core's `DoorbellWatch` driven by the JS
//! thread's own event loop. While it spins, an idle handle scans the words on
//! every turn of the loop (which then does not block); while it sleeps, a
//! timerfd polled by the loop ends each sleep with a scan. Scans are native;
//! JS runs only when a batch is ready, so a batch costs one call into JS and
//! no thread at all (docs/architecture.md).

use crate::js::Callbacks;
use crate::mapping::NativeMapping;
use crate::os_error;
use crate::uv::{Idle, Poll, READABLE};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use rustix::fd::OwnedFd;
use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};
use vfio_user_core::doorbells::{DoorbellWatch, Next, Ring, WatchConfig};
use vfio_user_core::timerfd;

const ON_BATCH: usize = 0;

#[napi(object)]
pub struct DoorbellWatchConfig {
    /// Microseconds of scanning after activity.
    pub spin_micros: f64,
    /// The longest sleep between scans once idle, in microseconds.
    pub max_sleep_micros: f64,
}

#[napi(object)]
pub struct DoorbellWatchStats {
    pub wakes: f64,
    pub spins: f64,
    pub scans: f64,
    pub sleeps: f64,
    pub cpu_micros: f64,
}

/// The watch and the loop handles that drive it, shared with their callbacks.
struct Driver {
    watch: RefCell<DoorbellWatch>,
    timer: OwnedFd,
    idle: RefCell<Option<Idle>>,
    timer_poll: RefCell<Option<Poll>>,
    js: RefCell<Option<Rc<Callbacks>>>,
    /// The timer is armed (a sleep is under way).
    sleeping: Cell<bool>,
}

impl Driver {
    /// A turn of the watch: scan, hand a ready batch to JS, then spin, sleep or wait.
    fn turn(&self) {
        let started = Instant::now();
        let ready = self.watch.borrow_mut().scan(started);
        if ready {
            // Cloned out: JS may close the watcher from inside the call.
            let js = self.js.borrow().clone();
            if let Some(js) = js {
                js.call(&mut js.scope(), ON_BATCH, |_| vec![]);
            }
        }
        let now = Instant::now();
        self.watch.borrow_mut().account(now.saturating_duration_since(started).as_nanos() as u64);
        self.schedule(now);
    }

    /// Starts or stops the idle handle and the timer as the watch says.
    fn schedule(&self, now: Instant) {
        let next = self.watch.borrow_mut().next(now);
        if let Some(idle) = self.idle.borrow_mut().as_mut() {
            idle.set_running(next == Next::Spin);
        }
        match next {
            Next::Sleep(after) => {
                // Our own timerfd: arming it cannot fail.
                let _ = timerfd::arm(&self.timer, after);
                self.sleeping.set(true);
            }
            Next::Spin | Next::Wait if self.sleeping.replace(false) => {
                let _ = timerfd::disarm(&self.timer);
            }
            _ => {}
        }
    }

    /// Activity (or a watch change) outside a turn: spin from now.
    fn poke(&self) {
        let now = Instant::now();
        self.watch.borrow_mut().poke(now);
        self.schedule(now);
    }
}

#[napi]
pub struct NativeDoorbellWatcher {
    driver: Option<Rc<Driver>>,
    rings: Vec<Ring>,
}

fn config_of(c: &DoorbellWatchConfig) -> Result<WatchConfig> {
    let micros = |v: f64, what: &str| {
        if (0.0..=60e6).contains(&v) {
            Ok(Duration::from_nanos((v * 1000.0) as u64))
        } else {
            Err(Error::new(Status::InvalidArg, format!("{what} {v} is not between 0 and 60 000 000 microseconds")))
        }
    };
    let max_sleep = micros(c.max_sleep_micros, "maxSleepMicros")?;
    if max_sleep.is_zero() {
        return Err(Error::new(Status::InvalidArg, "maxSleepMicros must be above 0"));
    }
    Ok(WatchConfig { spin: micros(c.spin_micros, "spinMicros")?, max_sleep })
}

fn closed() -> Error {
    Error::new(Status::GenericFailure, "the doorbell watcher is closed")
}

#[napi]
impl NativeDoorbellWatcher {
    /// Watches nothing until `listen` puts it on this thread's loop.
    #[napi(constructor)]
    pub fn new(config: DoorbellWatchConfig) -> Result<Self> {
        let timer = timerfd::create().map_err(|e| os_error("doorbell timer", e))?;
        let driver = Driver {
            watch: RefCell::new(DoorbellWatch::new(config_of(&config)?)),
            timer,
            idle: RefCell::new(None),
            timer_poll: RefCell::new(None),
            js: RefCell::new(None),
            sleeping: Cell::new(false),
        };
        Ok(NativeDoorbellWatcher { driver: Some(Rc::new(driver)), rings: Vec::new() })
    }

    fn driver(&self) -> Result<&Rc<Driver>> {
        self.driver.as_ref().ok_or_else(closed)
    }

    #[napi]
    pub fn configure(&self, config: DoorbellWatchConfig) -> Result<()> {
        let config = config_of(&config)?;
        let driver = self.driver()?;
        driver.watch.borrow_mut().configure(config, Instant::now());
        driver.schedule(Instant::now());
        Ok(())
    }

    /// Calls `onBatch()` on this thread whenever rings wait for `take`
    /// (found by a scan; rings added by `look` are the caller's to take).
    /// The watcher does not keep the process alive.
    #[napi(ts_args_type = "onBatch: () => void")]
    pub fn listen(&mut self, env: Env, on_batch: Function<'_>) -> Result<()> {
        let raw = env.raw();
        let driver = self.driver()?.clone();
        *driver.js.borrow_mut() = Some(Callbacks::new(raw, "VfioUserDoorbells", &[on_batch.raw()])?);
        // The handles' callbacks hold the driver weakly: `close` ends it.
        let weak = Rc::downgrade(&driver);
        let idle = Idle::new(raw, Box::new(move || {
            if let Some(driver) = weak.upgrade() {
                driver.turn();
                if driver.watch.borrow().should_yield(Instant::now()) {
                    std::thread::yield_now();
                }
            }
        }))?;
        let weak = Rc::downgrade(&driver);
        let mut poll = Poll::new(
            raw,
            driver.timer.as_raw_fd(),
            Box::new(move |_status, _events| {
                if let Some(driver) = weak.upgrade() {
                    if timerfd::take(&driver.timer).unwrap_or(false) {
                        driver.sleeping.set(false);
                        driver.turn();
                    }
                }
            }),
        )?;
        poll.set_events(READABLE);
        poll.set_ref(false);
        *driver.idle.borrow_mut() = Some(idle);
        *driver.timer_poll.borrow_mut() = Some(poll);
        driver.schedule(Instant::now());
        Ok(())
    }

    /// Watches doorbell `doorbell`'s value at `offset` of `mapping` (see the
    /// core's `watch`).
    #[napi]
    pub fn watch(&self, doorbell: u32, mapping: &NativeMapping, offset: f64, baseline: Option<u32>) -> Result<()> {
        let memory = mapping.shared().borrow().clone().ok_or_else(|| Error::new(Status::GenericFailure, "the mapping has been unmapped"))?;
        if !(offset >= 0.0 && offset.fract() == 0.0 && offset <= 9007199254740991.0) {
            return Err(Error::new(Status::InvalidArg, format!("offset {offset} is not a non-negative safe integer")));
        }
        let driver = self.driver()?;
        driver
            .watch
            .borrow_mut()
            .watch(doorbell, memory, offset as u64, baseline, Instant::now())
            .map_err(|e| Error::new(Status::InvalidArg, format!("E{}: cannot watch doorbell {doorbell}: {e}", e.errno().raw_os_error())))?;
        driver.schedule(Instant::now());
        Ok(())
    }

    #[napi]
    pub fn unwatch(&self, doorbell: u32) -> Result<()> {
        let driver = self.driver()?;
        driver.watch.borrow_mut().unwatch(doorbell);
        driver.schedule(Instant::now());
        Ok(())
    }

    /// A kick with no value: puts `doorbell`'s current word in the batch;
    /// false when it is not watched (or its memory is gone).
    #[napi]
    pub fn look(&self, doorbell: u32) -> Result<bool> {
        let driver = self.driver()?;
        let found = driver.watch.borrow_mut().look(doorbell, Instant::now());
        driver.schedule(Instant::now());
        Ok(found)
    }

    /// The device stored `value` into watched `doorbell`'s word itself (see
    /// the core's `rebase`); false when it is not watched.
    #[napi]
    pub fn rebase(&self, doorbell: u32, value: u32) -> Result<bool> {
        Ok(self.driver()?.watch.borrow_mut().rebase(doorbell, value))
    }

    /// A doorbell rang as a trapped write or a kick: the driver's answer, timed.
    #[napi]
    pub fn rung(&self) -> Result<()> {
        let driver = self.driver()?;
        let now = Instant::now();
        driver.watch.borrow_mut().rung(now);
        driver.schedule(now);
        Ok(())
    }

    /// The device expects doorbells soon: spin again.
    #[napi]
    pub fn poke(&self) -> Result<()> {
        self.driver()?.poke();
        Ok(())
    }

    /// Moves pending rings into `doorbells` and `values` (as many as the
    /// shorter holds); returns how many.
    #[napi]
    pub fn take(&mut self, mut doorbells: Uint32Array, mut values: Uint32Array) -> Result<u32> {
        let capacity = doorbells.len().min(values.len());
        self.rings.resize(capacity, Ring { doorbell: 0, value: 0 });
        let n = self.driver.as_ref().ok_or_else(closed)?.watch.borrow_mut().take(&mut self.rings);
        // SAFETY: JS cannot run during the copy; the arrays are ours until we return.
        let (d, v) = unsafe { (doorbells.as_mut(), values.as_mut()) };
        for (i, ring) in self.rings[..n].iter().enumerate() {
            d[i] = ring.doorbell;
            v[i] = ring.value;
        }
        Ok(n as u32)
    }

    /// Microseconds since the first ring of the batch last taken was found
    /// in memory; -1 when no ring of it was (trapped writes and kicks only).
    #[napi]
    pub fn taken_age_micros(&self) -> Result<f64> {
        let since = self.driver()?.watch.borrow().taken_since();
        Ok(since.map_or(-1.0, |t| t.elapsed().as_nanos() as f64 / 1000.0))
    }

    #[napi]
    pub fn stats(&self) -> Result<DoorbellWatchStats> {
        let s = self.driver()?.watch.borrow().stats();
        Ok(DoorbellWatchStats {
            wakes: s.batches as f64,
            spins: s.spins as f64,
            scans: s.scans as f64,
            sleeps: s.sleeps as f64,
            cpu_micros: s.busy_nanos as f64 / 1000.0,
        })
    }

    /// Stops the handles and releases every watched mapping; idempotent.
    #[napi]
    pub fn close(&mut self) {
        if let Some(driver) = self.driver.take() {
            if let Some(idle) = driver.idle.borrow_mut().take() {
                idle.close();
            }
            if let Some(poll) = driver.timer_poll.borrow_mut().take() {
                poll.close();
            }
            driver.js.borrow_mut().take();
        }
    }
}
