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
