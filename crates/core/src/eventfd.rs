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

/// Adds `value` to the counter. A counter at its maximum already wakes its
/// reader, so that is not an error. A peer's eventfd may be blocking (its
/// file status flags are the peer's, see `adopt`): a write that would block
/// is not attempted. A peer that fills the counter between the poll and the
/// write still blocks it (docs/security.md, "What remains").
pub fn add(fd: impl AsFd, value: u64) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut ready = [PollFd::new(&fd, PollFlags::OUT)];
    if poll(&mut ready, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }))? == 0 {
        return Ok(());
    }
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
/// eventfd. Its O_NONBLOCK flag is left alone: the flag belongs to the open
/// file, shared with the peer's copy, and a peer may read its eventfd
/// blocking (libvfio-user's client sample does, and fails on EAGAIN).
/// Signalling one whose counter a hostile peer left at its maximum does not
/// stall the caller: `add` checks that the write would not block first.
pub fn adopt(fd: impl AsFd) -> io::Result<bool> {
    Ok(is_eventfd(&fd))
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
    fn adopting_leaves_the_peers_blocking_mode_alone() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        assert!(adopt(&fd).unwrap());
        signal(&fd).unwrap();
        let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
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
