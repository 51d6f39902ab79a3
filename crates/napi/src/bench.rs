//! The baseline for `npm run bench` (bench/dma.ts): a plain memcpy loop in
//! this process, so the DMA helpers are compared with the machine's own copy
//! speed measured in the same run. Not part of the device API.

use napi::bindgen_prelude::Uint8ArraySlice;
use napi_derive::napi;
use std::hint::black_box;
use std::time::Instant;

/// Copies `source` into `target` `iterations` times; nanoseconds per copy.
#[napi]
pub fn memcpy_baseline(mut target: Uint8ArraySlice<'_>, source: &[u8], iterations: u32) -> f64 {
    // SAFETY: JS cannot run during the loop.
    let target = unsafe { target.as_mut() };
    let len = target.len().min(source.len());
    let start = Instant::now();
    for _ in 0..iterations {
        // SAFETY: both slices hold at least `len` bytes; JS arrays passed in
        // do not overlap unless the caller built them so, which the bench does not.
        unsafe { std::ptr::copy_nonoverlapping(black_box(source.as_ptr()), black_box(target.as_mut_ptr()), len) };
    }
    start.elapsed().as_nanos() as f64 / iterations.max(1) as f64
}

/// The cost of signalling a blocking eventfd (as a client hands one over)
/// `iterations` times on this thread, in nanoseconds per signal:
/// `[check then write, eventfd::signal]`. The first is the unbounded write
/// `eventfd::add` used before its writes had a deadline; the counter is
/// drained every 1000 signals (a read of a blocking eventfd that is not
/// zero), so neither ever meets a full one.
#[napi]
pub fn eventfd_signal_costs(iterations: u32) -> napi::Result<Vec<f64>> {
    use rustix::event::{eventfd, EventfdFlags, PollFlags};
    use vfio_user_core::eventfd::{ready, signal, take};
    let failed = |e: rustix::io::Errno| napi::Error::from_reason(format!("eventfd bench: {e}"));
    let fd = eventfd(0, EventfdFlags::CLOEXEC).map_err(failed)?;
    let check_then_write = || -> rustix::io::Result<()> {
        if ready(&fd, PollFlags::OUT)? {
            rustix::io::write(&fd, &1u64.to_ne_bytes())?;
        }
        Ok(())
    };
    let per_signal = |op: &dyn Fn() -> rustix::io::Result<()>| -> rustix::io::Result<f64> {
        let start = Instant::now();
        for i in 0..iterations {
            op()?;
            if i % 1000 == 999 {
                take(&fd)?;
            }
        }
        Ok(start.elapsed().as_nanos() as f64 / iterations.max(1) as f64)
    };
    let before = per_signal(&check_then_write).map_err(failed)?;
    let now = per_signal(&|| signal(&fd)).map_err(failed)?;
    Ok(vec![before, now])
}
