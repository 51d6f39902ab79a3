//! `NativeDoorbellWatcher`: the core's doorbell watcher, its batches
//! announced on the JS thread's own loop. The watching thread writes an
//! eventfd that a libuv poll on this loop watches, so a batch costs one JS
//! wake-up and no threadsafe-function hop (docs/architecture.md).

use crate::js::Callbacks;
use crate::mapping::NativeMapping;
use crate::uv::{Poll, READABLE};
use crate::os_error;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;
use vfio_user_core::doorbells::{DoorbellWatcher, Ring, WatchConfig};

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

struct Listening {
    poll: Poll,
    _js: Rc<Callbacks>,
}

#[napi]
pub struct NativeDoorbellWatcher {
    watcher: Option<DoorbellWatcher>,
    listening: Option<Listening>,
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
    #[napi(constructor)]
    pub fn new(config: DoorbellWatchConfig) -> Result<Self> {
        let watcher = DoorbellWatcher::new(config_of(&config)?).map_err(|e| os_error("doorbell watcher", e))?;
        Ok(NativeDoorbellWatcher { watcher: Some(watcher), listening: None, rings: Vec::new() })
    }

    fn watcher(&self) -> Result<&DoorbellWatcher> {
        self.watcher.as_ref().ok_or_else(closed)
    }

    #[napi]
    pub fn configure(&self, config: DoorbellWatchConfig) -> Result<()> {
        self.watcher()?.configure(config_of(&config)?);
        Ok(())
    }

    /// Calls `onBatch()` on this thread whenever rings wait for `take`. The
    /// watcher does not keep the process alive.
    #[napi(ts_args_type = "onBatch: () => void")]
    pub fn listen(&mut self, env: Env, on_batch: Function<'_>) -> Result<()> {
        let raw = env.raw();
        let fd = self.watcher()?.notify_fd().as_raw_fd();
        let js = Callbacks::new(raw, "VfioUserDoorbells", &[on_batch.raw()])?;
        let target = js.clone();
        let mut poll = Poll::new(
            raw,
            fd,
            Box::new(move |_status, _events| {
                target.call(&mut target.scope(), ON_BATCH, |_| vec![]);
            }),
        )?;
        poll.set_events(READABLE);
        poll.set_ref(false);
        self.listening = Some(Listening { poll, _js: js });
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
        self.watcher()?
            .watch(doorbell, memory, offset as u64, baseline)
            .map_err(|e| Error::new(Status::InvalidArg, format!("E{}: cannot watch doorbell {doorbell}: {e}", e.errno().raw_os_error())))
    }

    #[napi]
    pub fn unwatch(&self, doorbell: u32) -> Result<()> {
        self.watcher()?.unwatch(doorbell);
        Ok(())
    }

    /// A kick with no value: puts `doorbell`'s current word in the batch;
    /// false when it is not watched (or its memory is gone).
    #[napi]
    pub fn look(&self, doorbell: u32) -> Result<bool> {
        Ok(self.watcher()?.look(doorbell))
    }

    /// The device expects doorbells soon: scan and spin again.
    #[napi]
    pub fn poke(&self) -> Result<()> {
        self.watcher()?.poke();
        Ok(())
    }

    /// Moves pending rings into `doorbells` and `values` (as many as the
    /// shorter holds); returns how many.
    #[napi]
    pub fn take(&mut self, mut doorbells: Uint32Array, mut values: Uint32Array) -> Result<u32> {
        let capacity = doorbells.len().min(values.len());
        self.rings.resize(capacity, Ring { doorbell: 0, value: 0 });
        let n = self.watcher.as_ref().ok_or_else(closed)?.take(&mut self.rings);
        // SAFETY: JS cannot run during the copy; the arrays are ours until we return.
        let (d, v) = unsafe { (doorbells.as_mut(), values.as_mut()) };
        for (i, ring) in self.rings[..n].iter().enumerate() {
            d[i] = ring.doorbell;
            v[i] = ring.value;
        }
        Ok(n as u32)
    }

    #[napi]
    pub fn stats(&self) -> Result<DoorbellWatchStats> {
        let s = self.watcher()?.stats();
        Ok(DoorbellWatchStats {
            wakes: s.wakes as f64,
            spins: s.spins as f64,
            scans: s.scans as f64,
            sleeps: s.sleeps as f64,
            cpu_micros: s.cpu_nanos as f64 / 1000.0,
        })
    }

    /// Stops the thread (releasing every watched mapping) and the poll; idempotent.
    #[napi]
    pub fn close(&mut self) {
        if let Some(listening) = self.listening.take() {
            listening.poll.close();
        }
        self.watcher.take();
    }
}
