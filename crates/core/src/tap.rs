//! TAP interfaces: a host network interface whose Ethernet frames this
//! process reads and writes through `/dev/net/tun`, so a virtual NIC's wire
//! can be the host's own network stack.
//!
//! Each frame carries virtio-net's 12-byte header in front (IFF_VNET_HDR with
//! TUNSETVNETHDRSZ 12: `virtio_net_hdr` plus `num_buffers`, the layout a
//! VERSION_1 virtio-net device uses), and every offload is off
//! (TUNSETOFFLOAD 0): the kernel sends whole frames with their checksums
//! filled in and expects the same from us. The fd is non-blocking and
//! close-on-exec; a read that finds no frame is `Ok(None)`, never a wait.

use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::fs::{open as open_file, Mode, OFlags};
use rustix::io::{self, Errno};
use rustix::net::{socket, AddressFamily, SocketType};
use std::os::raw::{c_char, c_int};

/// Bytes of virtio-net header before each frame (`virtio_net_hdr` and its
/// `num_buffers`, virtio 1.2 §5.1.6).
pub const VNET_HEADER: usize = 12;

/// The largest packet a read can return: the vnet header, a frame at the
/// largest MTU a TAP accepts (65535), its Ethernet header and a VLAN tag.
pub const MAX_PACKET: usize = VNET_HEADER + 65535 + 14 + 4;

const TUN_PATH: &str = "/dev/net/tun";
/// The same number everywhere; its type is `c_ulong` in libc while ioctl's is `c_int` on musl.
const SIOCGIFMTU: libc::Ioctl = 0x8921;

/// An open TAP interface. Dropping it detaches this process; an interface it
/// created (rather than a persistent one it attached to) then disappears.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Whether the kernel would accept `name` for an interface (its
/// `dev_valid_name`): 1-15 bytes, not `.` or `..`, no `/`, `:` or white
/// space. A `%d` in it asks the kernel for the first free number.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

/// An `ifreq` naming `name`, which `valid_name` accepted.
fn request(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and
    // addresses), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as c_char;
    }
    req
}

/// The name the kernel wrote back into `req` (the `%d` filled in).
fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, request, arg)` as an `io::Result`.
///
/// # Safety
/// `arg` must be what `request` expects: a pointer to memory of the right
/// type and size that stays valid for the call, or a plain value.
unsafe fn ioctl(fd: impl AsFd, request: libc::Ioctl, arg: usize) -> io::Result<()> {
    if libc::ioctl(fd.as_fd().as_raw_fd(), request, arg) < 0 {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    } else {
        Ok(())
    }
}

/// Opens TAP interface `name`: attaches to it if it exists (a persistent TAP
/// made by `ip tuntap add`, which needs CAP_NET_ADMIN or to be owned by this
/// user), or creates it (CAP_NET_ADMIN; it lasts until the fd closes). Errors:
/// EINVAL for a name the kernel would refuse, ENOENT without `/dev/net/tun`,
/// EPERM without the right to it, EBUSY when another process has it open,
/// EINVAL when it is a TUN (layer 3) interface.
pub fn open(name: &str) -> io::Result<Tap> {
    if !valid_name(name) {
        return Err(Errno::INVAL);
    }
    let fd = open_file(TUN_PATH, OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())?;
    let mut req = request(name);
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes back the ifreq, which lives on this
    // stack frame for the call.
    unsafe { ioctl(&fd, libc::TUNSETIFF, &mut req as *mut libc::ifreq as usize)? };
    let header: c_int = VNET_HEADER as c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, valid for the call.
    unsafe { ioctl(&fd, libc::TUNSETVNETHDRSZ, &header as *const c_int as usize)? };
    // SAFETY: TUNSETOFFLOAD takes its flags by value; none means no offload.
    unsafe { ioctl(&fd, libc::TUNSETOFFLOAD, 0)? };
    Ok(Tap { fd, name: name_of(&req) })
}

/// The MTU of interface `name` (any interface, asked through a socket).
pub fn mtu(name: &str) -> io::Result<u32> {
    if !valid_name(name) {
        return Err(Errno::INVAL);
    }
    // Any socket answers SIOCGIFMTU; a UNIX one needs no network protocol.
    let probe = socket(AddressFamily::UNIX, SocketType::DGRAM, None)?;
    let mut req = request(name);
    // SAFETY: SIOCGIFMTU fills the ifreq, which lives on this stack frame for the call.
    unsafe { ioctl(&probe, SIOCGIFMTU, &mut req as *mut libc::ifreq as usize)? };
    // SAFETY: SIOCGIFMTU set the union's `ifru_mtu` member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

impl Tap {
    /// The interface's name (with a `%d` of the request filled in).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the next packet (vnet header and frame) into `buf`, which
    /// should hold `MAX_PACKET` bytes (a longer packet is cut short);
    /// `Ok(None)` when none is waiting. EBADFD once the interface is gone.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match rustix::io::read(&self.fd, buf) {
            Ok(n) => Ok(Some(n)),
            Err(Errno::AGAIN) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Hands one packet (vnet header and frame) to the host's stack. A TAP
    /// never makes a writer wait; EIO while the interface is down, EINVAL for
    /// a packet shorter than the header or a header the kernel refuses.
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        rustix::io::write(&self.fd, packet).map(|_| ())
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn names_the_kernel_refuses_are_refused_before_any_syscall() {
        for bad in ["", ".", "..", "a/b", "a:0", "a b", "tab\t", "sixteen-bytes-xx"] {
            assert!(!valid_name(bad), "{bad:?}");
            assert_eq!(open(bad).unwrap_err(), Errno::INVAL, "{bad:?}");
            assert_eq!(mtu(bad).unwrap_err(), Errno::INVAL, "{bad:?}");
        }
        for good in ["tap0", "vfu%d", "fifteen-bytes-x", "a.b"] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn the_request_carries_the_name_and_the_reply_gives_it_back() {
        let req = request("fifteen-bytes-x");
        assert_eq!(req.ifr_name[14], b'x' as c_char);
        assert_eq!(req.ifr_name[15], 0, "NUL-terminated");
        assert_eq!(name_of(&req), "fifteen-bytes-x");
    }

    #[test]
    fn loopback_has_an_mtu_and_a_missing_interface_has_none() {
        assert!(mtu("lo").unwrap() >= 1500);
        assert_eq!(mtu("no-such-if0").unwrap_err(), Errno::NODEV);
    }

    /// A TAP this test may create, or why not (printed, and the test ends).
    fn created(name: &str) -> Option<Tap> {
        match open(name) {
            Ok(tap) => Some(tap),
            Err(e @ (Errno::NOENT | Errno::PERM | Errno::ACCESS | Errno::NODEV)) => {
                eprintln!("skipped: cannot create a TAP here ({e}: needs {TUN_PATH} and CAP_NET_ADMIN)");
                None
            }
            Err(e) => panic!("open {name}: {e}"),
        }
    }

    #[test]
    fn a_created_tap_has_vnet_headers_no_waiting_reads_and_goes_away_when_closed() {
        let Some(tap) = created("vfutest%d") else { return };
        let name = tap.name().to_string();
        assert!(name.starts_with("vfutest") && !name.contains('%'), "{name}");
        let sys = Path::new("/sys/class/net").join(&name);
        let flags = std::fs::read_to_string(sys.join("tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        let wanted = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        assert_eq!(flags & wanted, wanted, "tun_flags {flags:#x}");
        assert_eq!(mtu(&name).unwrap(), 1500);
        // Nothing waits on an interface that is down: the read returns at once.
        let mut buf = vec![0u8; MAX_PACKET];
        assert_eq!(tap.read(&mut buf).unwrap(), None);
        // Another process (or fd) cannot take the same interface while it is attached.
        assert_eq!(open(&name).unwrap_err(), Errno::BUSY);
        drop(tap);
        assert!(!sys.exists(), "a TAP this process created goes with its fd");
    }

    #[test]
    fn a_packet_shorter_than_its_header_is_refused_and_a_down_interface_takes_none() {
        let Some(tap) = created("vfutest%d") else { return };
        assert_eq!(tap.write(&[0u8; VNET_HEADER - 1]).unwrap_err(), Errno::INVAL);
        let mut packet = vec![0u8; VNET_HEADER + 60];
        packet[VNET_HEADER..VNET_HEADER + 6].fill(0xff);
        assert_eq!(tap.write(&packet).unwrap_err(), Errno::IO, "the interface is down");
    }
}
