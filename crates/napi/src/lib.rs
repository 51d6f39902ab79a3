//! The N-API binding of `vfio-user`: thin wrappers over `vfio-user-core`
//! plus the event-loop hook. No protocol decisions are made here.

pub mod bench;
mod block;
mod connection;
mod dma;
mod doorbells;
mod eventfd_watch;
mod js;
mod listener;
mod mapping;
mod regions;
mod slab;
mod tap;
mod uv;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use vfio_user_core::{eventfd, memfd, socket, sparse};

fn os_error(what: &str, e: rustix::io::Errno) -> Error {
    let code = std::io::Error::from_raw_os_error(e.raw_os_error());
    Error::new(Status::GenericFailure, format!("E{}: {what}: {code}", e.raw_os_error()))
}

fn borrow_fd<'a>(fd: i32) -> Result<BorrowedFd<'a>> {
    if fd < 0 {
        return Err(Error::new(Status::InvalidArg, format!("{fd} is not a file descriptor")));
    }
    // SAFETY: the caller keeps fd open for the duration of the call.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Connects to a UNIX stream socket without blocking; returns the
/// non-blocking fd. A full backlog throws EAGAIN at once (retry later).
#[napi]
pub fn connect_unix(path: String) -> Result<i32, String> {
    socket::connect_unix(Path::new(&path)).map(|fd| fd.into_raw_fd()).map_err(|e| {
        // `code` "EAGAIN": the backlog is full, worth retrying.
        let code = if e == rustix::io::Errno::AGAIN { "EAGAIN" } else { "GenericFailure" }.to_string();
        let Error { reason, .. } = os_error(&format!("cannot connect to {path}"), e);
        Error::new(code, reason)
    })
}

/// A connected non-blocking socket pair (the twin-socket handshake).
#[napi]
pub fn socket_pair() -> Result<Vec<i32>> {
    let (a, b) = socket::pair().map_err(|e| os_error("socketpair", e))?;
    Ok(vec![a.into_raw_fd(), b.into_raw_fd()])
}

#[napi]
pub fn close_fd(fd: i32) -> Result<()> {
    borrow_fd(fd)?;
    // SAFETY: the caller gives up its ownership of fd.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Duplicates an fd (close-on-exec), for keeping one the caller must close.
#[napi]
pub fn dup_fd(fd: i32) -> Result<i32> {
    let owned = borrow_fd(fd)?.try_clone_to_owned().map_err(|e| Error::new(Status::GenericFailure, e.to_string()))?;
    Ok(owned.into_raw_fd())
}

#[napi]
pub fn eventfd_create() -> Result<i32> {
    eventfd::create().map(|fd| fd.into_raw_fd()).map_err(|e| os_error("eventfd", e))
}

#[napi]
pub fn eventfd_signal(fd: i32) -> Result<()> {
    eventfd::signal(borrow_fd(fd)?).map_err(|e| os_error("eventfd write", e))
}

/// Reads and clears the counter: 0 if nothing was signalled.
#[napi]
pub fn eventfd_take(fd: i32) -> Result<f64> {
    let value = eventfd::take(borrow_fd(fd)?).map_err(|e| os_error("eventfd read", e))?;
    Ok(value.unwrap_or(0) as f64)
}

#[napi]
pub fn is_eventfd(fd: i32) -> Result<bool> {
    Ok(eventfd::is_eventfd(borrow_fd(fd)?))
}


#[napi(object)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Who connected on socket `fd`, as the kernel recorded it (SO_PEERCRED).
#[napi]
pub fn peer_credentials(fd: i32) -> Result<PeerCredentials> {
    let c = socket::peer_credentials(borrow_fd(fd)?).map_err(|e| os_error("SO_PEERCRED", e))?;
    Ok(PeerCredentials { pid: c.pid, uid: c.uid, gid: c.gid })
}

/// A memfd of `size` bytes; `sealSize` fixes its size for good (as QEMU
/// seals guest RAM), which lets a server that maps it use plain loads and
/// stores instead of fault-safe copies.
#[napi]
pub fn memfd_create(name: String, size: BigInt, seal_size: Option<bool>) -> Result<i32> {
    let (_, size, lossless) = size.get_u64();
    if !lossless {
        return Err(Error::new(Status::InvalidArg, "size must fit in 64 bits"));
    }
    let fd = memfd::create(&name, size).map_err(|e| os_error("memfd_create", e))?;
    if seal_size.unwrap_or(false) {
        memfd::seal_size(&fd).map_err(|e| os_error("F_ADD_SEALS", e))?;
    }
    Ok(fd.into_raw_fd())
}

/// Which file `fd` refers to, as "device:inode" (equal for fds of one file).
#[napi]
pub fn file_identity(fd: i32) -> Result<String> {
    memfd::file_identity(borrow_fd(fd)?).map(identity_string).map_err(|e| os_error("fstat", e))
}

/// A file's device and inode as JS compares them.
pub(crate) fn identity_string((dev, ino): (u64, u64)) -> String {
    format!("{dev}:{ino}")
}

#[napi]
pub fn file_size(fd: i32) -> Result<BigInt> {
    memfd::file_size(borrow_fd(fd)?).map(BigInt::from).map_err(|e| os_error("fstat", e))
}

#[napi]
pub fn truncate_fd(fd: i32, size: BigInt) -> Result<()> {
    let (_, size, _) = size.get_u64();
    rustix::fs::ftruncate(borrow_fd(fd)?, size).map_err(|e| os_error("ftruncate", e))
}

/// Deallocates `length` bytes of the file at `offset` (it reads as zeros,
/// its size unchanged); false where the filesystem cannot, changing nothing.
#[napi]
pub fn punch_hole(fd: i32, offset: BigInt, length: BigInt) -> Result<bool> {
    sparse::punch_hole(borrow_fd(fd)?, offset.get_u64().1, length.get_u64().1).map_err(|e| os_error("fallocate", e))
}

/// The fd numbers this process has open (for leak checks in tests and tools).
#[napi]
pub fn open_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    fds.sort_unstable();
    // Drop the directory fd that read_dir itself had open.
    fds.retain(|fd| Path::new(&format!("/proc/self/fd/{fd}")).exists());
    fds
}
