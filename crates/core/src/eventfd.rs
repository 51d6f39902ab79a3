//! eventfds: the protocol's interrupt lines (SET_IRQS) and ioeventfds.

use rustix::event::{eventfd, EventfdFlags};
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::{self, Errno};

/// A new non-blocking, close-on-exec eventfd with a zero counter.
pub fn create() -> io::Result<OwnedFd> {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
}

/// Adds one to the counter: what "signal vector i" means on the wire.
pub fn signal(fd: impl AsFd) -> io::Result<()> {
    add(fd, 1)
}

/// Adds `value` to the counter. A counter at its maximum (EAGAIN on a
/// non-blocking fd) already wakes its reader, so that is not an error.
pub fn add(fd: impl AsFd, value: u64) -> io::Result<()> {
    match rustix::io::write(fd, &value.to_ne_bytes()) {
        Ok(_) | Err(Errno::AGAIN) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads and clears the counter; `None` if it was zero (non-blocking fd).
pub fn take(fd: impl AsFd) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(8) => Ok(Some(u64::from_ne_bytes(buf))),
        Ok(_) => Err(Errno::INVAL),
        Err(Errno::AGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `fd` really is an eventfd. SET_IRQS must not accept a pipe or a
/// socket where the spec requires an eventfd (libvfio-user does).
pub fn is_eventfd(fd: impl AsFd) -> bool {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    matches!(std::fs::read_link(path), Ok(target) if target.as_os_str() == "anon_inode:[eventfd]")
}

/// Takes a peer's fd for use as an interrupt line: `false` unless it is an
/// eventfd; otherwise it is made non-blocking, so that signalling one whose
/// counter a hostile peer left at its maximum cannot stall the caller
/// (`add` then treats the full counter as already signalled). The flag is
/// shared with the peer's copy: eventfds are non-blocking there too, as a
/// VMM's are.
pub fn adopt(fd: impl AsFd) -> io::Result<bool> {
    if !is_eventfd(&fd) {
        return Ok(false);
    }
    rustix::io::ioctl_fionbio(fd, true)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_then_take_returns_the_sum_and_clears() {
        let fd = create().unwrap();
        assert_eq!(take(&fd).unwrap(), None);
        signal(&fd).unwrap();
        add(&fd, 4).unwrap();
        assert_eq!(take(&fd).unwrap(), Some(5));
        assert_eq!(take(&fd).unwrap(), None);
    }

    #[test]
    fn recognises_eventfds_and_refuses_pipes() {
        let fd = create().unwrap();
        assert!(is_eventfd(&fd));
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(!is_eventfd(&r));
        assert!(!adopt(&r).unwrap());
    }

    #[test]
    fn an_adopted_eventfd_at_its_maximum_is_signalled_without_blocking() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        assert!(adopt(&fd).unwrap());
        signal(&fd).unwrap();
        assert_eq!(take(&fd).unwrap(), Some(0xffff_ffff_ffff_fffe));
    }
}
