//! eventfds: the protocol's interrupt lines (SET_IRQS) and ioeventfds.

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
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
/// file status flags are the peer's, see `is_eventfd`), and a write to a full one
/// blocks: one that would is not attempted, and a peer that fills the counter
/// between that check and the write gets the write interrupted within
/// `deadline::LIMIT` (the counter it left at its maximum is the signal).
/// Without a deadline (no free real-time signal, no POSIX timer), that race
/// still blocks the caller until the peer reads (docs/security.md).
pub fn add(fd: impl AsFd, value: u64) -> io::Result<()> {
    if !ready(&fd, PollFlags::OUT)? {
        return Ok(());
    }
    write_bounded(fd, value)
}

/// The write itself, bounded by this thread's deadline where it has one.
fn write_bounded(fd: impl AsFd, value: u64) -> io::Result<()> {
    let write = || rustix::io::write(&fd, &value.to_ne_bytes());
    match crate::deadline::bounded(write).unwrap_or_else(write) {
        Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `fd` is ready for `events` now: OUT, a write of 1 would not block
/// (the counter is below its maximum); IN, a read would not (it is not zero).
pub fn ready(fd: impl AsFd, events: PollFlags) -> io::Result<bool> {
    let mut ready = [PollFd::new(&fd, events)];
    Ok(poll(&mut ready, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }))? > 0)
}

/// Reads and clears the counter of one of our own (non-blocking) eventfds;
/// `None` if it was zero.
pub fn take(fd: impl AsFd) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 8];
    counted(rustix::io::read(fd, &mut buf), buf)
}

/// `take` for an eventfd a peer sent (INTx's resample line): it may be
/// blocking, and the peer may read it too. A read that would block is not
/// attempted, and one that loses the race to the peer is interrupted within
/// `deadline::LIMIT`, as `add`'s write is.
pub fn take_from_peer(fd: impl AsFd) -> io::Result<Option<u64>> {
    if !ready(&fd, PollFlags::IN)? {
        return Ok(None);
    }
    let mut buf = [0u8; 8];
    let read = match crate::deadline::bounded(|| rustix::io::read(&fd, &mut buf)) {
        Some(read) => read,
        None => rustix::io::read(&fd, &mut buf),
    };
    counted(read, buf)
}

fn counted(read: io::Result<usize>, buf: [u8; 8]) -> io::Result<Option<u64>> {
    match read {
        Ok(8) => Ok(Some(u64::from_ne_bytes(buf))),
        Ok(_) => Err(Errno::INVAL),
        Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `fd` really is an eventfd. SET_IRQS must not accept a pipe or a
/// socket where the spec requires an eventfd (libvfio-user does). A peer's
/// eventfd keeps its O_NONBLOCK flag as the peer set it: the flag belongs to
/// the open file, shared with the peer's copy, and a peer may read its
/// eventfd blocking (libvfio-user's client sample does, and fails on EAGAIN).
pub fn is_eventfd(fd: impl AsFd) -> bool {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    matches!(std::fs::read_link(path), Ok(target) if target.as_os_str() == "anon_inode:[eventfd]")
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
    }

    #[test]
    fn signalling_leaves_the_peers_blocking_mode_alone() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        assert!(is_eventfd(&fd));
        signal(&fd).unwrap();
        let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
    }

    #[test]
    fn a_peers_blocking_eventfd_at_its_maximum_is_signalled_without_blocking() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        assert!(is_eventfd(&fd));
        signal(&fd).unwrap();
        assert_eq!(take(&fd).unwrap(), Some(0xffff_ffff_ffff_fffe));
    }

    const MAXIMUM: u64 = 0xffff_ffff_ffff_fffe;

    /// Runs `f` on a thread of its own; panics if it has not returned after a
    /// generous minute (a blocked write would never return).
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the write blocked")
    }

    #[test]
    fn a_write_racing_a_peer_that_filled_the_counter_returns() {
        // What `add` does after its check said writable, had the peer filled
        // the counter in between: the write itself meets a full counter.
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &MAXIMUM.to_ne_bytes()).unwrap();
        let peer = fd.try_clone().unwrap();
        returns(move || write_bounded(&peer, 1)).unwrap();
        assert_eq!(rustix::io::read(&fd, &mut [0u8; 8]), Ok(8));
    }

    #[test]
    fn taking_from_a_peers_blocking_eventfd_that_is_empty_returns_none() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let ours = fd.try_clone().unwrap();
        assert_eq!(returns(move || take_from_peer(&ours)).unwrap(), None);
        signal(&fd).unwrap();
        assert_eq!(take_from_peer(&fd).unwrap(), Some(1));
    }

    #[test]
    fn once_the_peer_reads_a_full_counter_signals_arrive_again() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &MAXIMUM.to_ne_bytes()).unwrap();
        let peer = fd.try_clone().unwrap();
        let ours = fd.try_clone().unwrap();
        returns(move || write_bounded(&ours, 1)).unwrap();
        let mut buf = [0u8; 8];
        rustix::io::read(&peer, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), MAXIMUM);
        signal(&fd).unwrap();
        rustix::io::read(&peer, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }
}
