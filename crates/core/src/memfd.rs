//! memfds: anonymous shared memory that can be passed to a peer by fd
//! (guest RAM on the client side, shareable BARs on the server side).

use rustix::fd::OwnedFd;
use rustix::fs::{fstat, ftruncate, memfd_create, MemfdFlags};
use rustix::io;

/// A close-on-exec memfd of `size` bytes, zero-filled.
pub fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    Ok(fd)
}

/// The current size of the file behind `fd`.
pub fn file_size(fd: impl rustix::fd::AsFd) -> io::Result<u64> {
    Ok(fstat(fd)?.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_file_of_the_requested_size() {
        let fd = create("test", 3 * 4096).unwrap();
        assert_eq!(file_size(&fd).unwrap(), 3 * 4096);
    }
}
