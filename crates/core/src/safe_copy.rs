//! Copies to and from guest memory that fail with `Fault` instead of killing
//! the process when the client has shrunk the file behind a mapping.
//!
//! The copy itself is `csrc/safe_copy.c`: a SIGBUS handler (installed once,
//! put back in front by `reassert` when something replaced it, chaining to
//! the others for every SIGBUS that is not a fault inside one of our copies)
//! jumps back into the copy's own C frame with `siglongjmp`. That is the only design that is
//! safe against the race: checking the file size first still leaves a window
//! between the check and the copy, and sealing the client's file against
//! shrinking would change the client's memory for good.

use std::sync::OnceLock;

extern "C" {
    fn vfu_safe_copy_init() -> i32;
    fn vfu_safe_copy_reassert() -> i32;
    fn vfu_safe_copy(dst: *mut u8, src: *const u8, len: usize) -> i32;
}

/// A copy touched memory that no longer has a backing page (SIGBUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the memory's backing file no longer covers the range")]
pub struct Fault;

fn ensure_handler() {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let status = *INSTALLED.get_or_init(|| {
        // SAFETY: installs a process-wide handler once; no preconditions.
        unsafe { vfu_safe_copy_init() }
    });
    // sigaction(SIGBUS) only fails for an invalid signal number.
    assert_eq!(status, 0, "cannot install the SIGBUS handler");
}

/// Installs the handler, or puts it back in front of one installed since
/// (which it then chains to): called for each new mapping, so a library that
/// takes SIGBUS over later does not turn the next truncation into a crash.
/// Past eight such replacements the newest is left in front.
pub fn reassert() {
    ensure_handler();
    // SAFETY: sigaction calls under a lock; no preconditions.
    unsafe { vfu_safe_copy_reassert() };
}

/// Copies `len` bytes from `src` to `dst` (which may overlap).
///
/// # Safety
/// Both ranges must be mapped for the whole call (a page may lose its backing
/// file; it must not be unmapped), and `dst` must be writable.
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), Fault> {
    if len == 0 {
        return Ok(());
    }
    ensure_handler();
    match vfu_safe_copy(dst, src, len) {
        0 => Ok(()),
        _ => Err(Fault),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mapping, Protection};

    const RW: Protection = Protection { read: true, write: true };

    #[test]
    fn copies_like_memmove() {
        let mut bytes: Vec<u8> = (0..16).collect();
        let p = bytes.as_mut_ptr();
        // SAFETY: both ranges lie within the 16 bytes.
        unsafe { copy(p.add(2), p, 8) }.unwrap();
        assert_eq!(&bytes[..10], &[0, 1, 0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_truncated_file_faults_instead_of_killing_the_process() {
        let fd = crate::memfd::create("t", 3 * 4096).unwrap();
        let m = Mapping::new(&fd, 0, 3 * 4096, RW).unwrap();
        m.write_at(4096 * 2, b"still here").unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let mut out = [0u8; 8];
        // Twice each: recovery must leave SIGBUS deliverable for the next fault.
        for _ in 0..2 {
            assert!(matches!(m.read_at(4096 * 2, &mut out), Err(crate::MappingError::Fault { .. })));
            assert!(matches!(m.write_at(4096 + 100, b"x"), Err(crate::MappingError::Fault { .. })));
        }
        m.read_at(0, &mut out).unwrap();
        m.write_at(4000, b"fine").unwrap();
    }

    #[test]
    fn faults_are_recovered_on_every_thread() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let fd = crate::memfd::create("t", 2 * 4096).unwrap();
                    let m = Mapping::new(&fd, 0, 2 * 4096, RW).unwrap();
                    rustix::fs::ftruncate(&fd, 0).unwrap();
                    let mut out = [0u8; 4];
                    for _ in 0..100 {
                        assert!(m.read_at(4096, &mut out).is_err());
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
