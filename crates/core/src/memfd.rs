//! memfds: anonymous shared memory that can be passed to a peer by fd
//! (guest RAM on the client side, shareable BARs on the server side).

use rustix::fd::OwnedFd;
use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::io;

/// A close-on-exec memfd of `size` bytes, zero-filled.
pub fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    Ok(fd)
}

/// Fixes the size for good (F_SEAL_SHRINK | F_SEAL_GROW), as QEMU does for
/// guest RAM: a peer that maps the file can then never be hit by SIGBUS.
pub fn seal_size(fd: impl rustix::fd::AsFd) -> io::Result<()> {
    fcntl_add_seals(fd, SealFlags::SHRINK | SealFlags::GROW)
}

/// Whether the file behind `fd` can no longer shrink.
pub fn cannot_shrink(fd: impl rustix::fd::AsFd) -> bool {
    fcntl_get_seals(fd).is_ok_and(|seals| seals.contains(SealFlags::SHRINK))
}

/// Which file an fd refers to and how large it is, from one fstat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Device and inode: two fds of one file agree.
    pub identity: (u64, u64),
    pub size: u64,
}

pub fn file_stat(fd: impl rustix::fd::AsFd) -> io::Result<FileStat> {
    let st = fstat(fd)?;
    Ok(FileStat { identity: (st.st_dev as u64, st.st_ino as u64), size: st.st_size as u64 })
}

/// Which file `fd` refers to (device and inode): two fds of one file agree.
pub fn file_identity(fd: impl rustix::fd::AsFd) -> io::Result<(u64, u64)> {
    Ok(file_stat(fd)?.identity)
}

/// The current size of the file behind `fd`.
pub fn file_size(fd: impl rustix::fd::AsFd) -> io::Result<u64> {
    Ok(file_stat(fd)?.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_file_of_the_requested_size() {
        let fd = create("test", 3 * 4096).unwrap();
        assert_eq!(file_size(&fd).unwrap(), 3 * 4096);
    }

    #[test]
    fn identity_follows_the_file_not_the_fd() {
        let a = create("a", 4096).unwrap();
        let b = create("b", 4096).unwrap();
        let a2 = a.try_clone().unwrap();
        assert_eq!(file_identity(&a).unwrap(), file_identity(&a2).unwrap());
        assert_ne!(file_identity(&a).unwrap(), file_identity(&b).unwrap());
    }

    #[test]
    fn a_sealed_size_cannot_change() {
        let fd = create("test", 4096).unwrap();
        assert!(!cannot_shrink(&fd));
        seal_size(&fd).unwrap();
        assert!(cannot_shrink(&fd));
        assert!(ftruncate(&fd, 0).is_err());
        assert!(ftruncate(&fd, 8192).is_err());
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(!cannot_shrink(&r));
    }
}
