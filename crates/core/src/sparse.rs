//! Sparse files: giving a range's blocks back to the filesystem, so that it
//! reads as zeros and takes no space (an NVMe deallocate on a raw image).

use rustix::fs::{fallocate, FallocateFlags};
use rustix::io::{self, Errno};

/// Deallocates `len` bytes at `offset` (FALLOC_FL_PUNCH_HOLE, keeping the
/// size): the range reads as zeros afterwards. Returns false, changing
/// nothing, where the filesystem cannot punch holes; the caller writes
/// zeros instead.
pub fn punch_hole(fd: impl rustix::fd::AsFd, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    match fallocate(fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(true),
        Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{fstat, fsync, open, Mode, OFlags};
    use rustix::io::{pread, pwrite};

    const MIB: usize = 1 << 20;

    /// A 1 MiB file of 0xa5 bytes, written out, in the temporary directory.
    fn full_file(name: &str) -> (std::path::PathBuf, rustix::fd::OwnedFd) {
        let path = std::env::temp_dir().join(format!("vfio-user-sparse-{name}-{}", std::process::id()));
        let fd = open(&path, OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC, Mode::from_raw_mode(0o600)).unwrap();
        assert_eq!(pwrite(&fd, &vec![0xa5u8; MIB], 0).unwrap(), MIB);
        fsync(&fd).unwrap();
        (path, fd)
    }

    #[test]
    fn a_punched_range_reads_as_zeros_and_frees_its_blocks() {
        let (path, fd) = full_file("punch");
        let before = fstat(&fd).unwrap();
        if !punch_hole(&fd, 256 * 1024, 512 * 1024).unwrap() {
            std::fs::remove_file(&path).unwrap();
            eprintln!("the temporary directory's filesystem cannot punch holes");
            return;
        }
        let after = fstat(&fd).unwrap();
        assert_eq!(after.st_size, before.st_size);
        assert!(after.st_blocks * 512 <= before.st_blocks * 512 - 512 * 1024, "{} -> {} blocks", before.st_blocks, after.st_blocks);
        let mut back = vec![0u8; MIB];
        assert_eq!(pread(&fd, &mut back, 0).unwrap(), MIB);
        assert!(back[..256 * 1024].iter().all(|&b| b == 0xa5));
        assert!(back[256 * 1024..768 * 1024].iter().all(|&b| b == 0));
        assert!(back[768 * 1024..].iter().all(|&b| b == 0xa5));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_empty_range_changes_nothing_and_a_read_only_fd_is_an_error() {
        let (path, fd) = full_file("empty");
        assert!(punch_hole(&fd, 0, 0).unwrap());
        assert_eq!(fstat(&fd).unwrap().st_size as usize, MIB);
        let read_only = open(&path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        assert_eq!(punch_hole(&read_only, 0, 4096), Err(Errno::BADF));
        std::fs::remove_file(&path).unwrap();
    }
}
