//! UNIX stream sockets: listen, accept, connect and socket pairs, all
//! non-blocking and close-on-exec, ready for an event loop.

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{chmod, Mode};
use rustix::io::{self, Errno};
use rustix::net::{
    accept_with, bind, connect, listen as listen_on, socket_with, socketpair, AddressFamily,
    SocketAddrUnix, SocketFlags, SocketType,
};
use std::path::Path;

fn unix_socket(flags: SocketFlags) -> io::Result<OwnedFd> {
    socket_with(AddressFamily::UNIX, SocketType::STREAM, flags | SocketFlags::CLOEXEC, None)
}

/// Binds a listening socket at `path` whose file has `mode` from the start:
/// it is bound under a temporary name, chmod-ed, listening, then renamed into
/// place, so no other user can connect in between, and a client that connects
/// the moment the path appears is not refused. A stale socket file nobody
/// listens on is replaced; a live one gives EADDRINUSE.
pub fn listen(path: &Path, mode: u32, backlog: i32) -> io::Result<OwnedFd> {
    if path.exists() {
        // Only a refused connect means nobody listens; a full backlog
        // (EAGAIN) is a live server too.
        if connect_unix(path).err() != Some(Errno::CONNREFUSED) {
            return Err(Errno::ADDRINUSE);
        }
        let meta = std::fs::symlink_metadata(path).map_err(|_| Errno::ADDRINUSE)?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Errno::ADDRINUSE);
        }
        std::fs::remove_file(path).map_err(|_| Errno::ADDRINUSE)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("sock"),
        std::process::id()
    ));
    let fd = unix_socket(SocketFlags::NONBLOCK)?;
    let _ = std::fs::remove_file(&tmp);
    bind(&fd, &SocketAddrUnix::new(&tmp)?)?;
    let placed = chmod(&tmp, Mode::from_raw_mode(mode))
        .and_then(|_| listen_on(&fd, backlog))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(fd)
}

/// Takes over a listening UNIX stream socket created by someone else (a
/// management layer passing `--fd`): checks that it is one, then makes it
/// non-blocking and close-on-exec like our own.
pub fn adopt_listener(fd: OwnedFd) -> io::Result<OwnedFd> {
    use rustix::net::sockopt::{socket_acceptconn, socket_domain, socket_type};
    if socket_domain(&fd)? != AddressFamily::UNIX || socket_type(&fd)? != SocketType::STREAM || !socket_acceptconn(&fd)? {
        return Err(Errno::INVAL);
    }
    rustix::io::ioctl_fionbio(&fd, true)?;
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// Accepts one pending connection; `Ok(None)` when there is none.
pub fn accept(listener: impl AsFd) -> io::Result<Option<OwnedFd>> {
    match accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::AGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Connects to the socket at `path` without blocking; the fd is
/// non-blocking. A UNIX connect either completes at once or, when the
/// server's backlog is full, fails with EAGAIN (the kernel offers nothing to
/// poll for room): the caller retries later instead of stalling its loop.
pub fn connect_unix(path: &Path) -> io::Result<OwnedFd> {
    let fd = unix_socket(SocketFlags::NONBLOCK)?;
    connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// Who is at the other end of a connected UNIX socket, as the kernel
/// recorded it at connect time (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_credentials(fd: impl AsFd) -> io::Result<PeerCredentials> {
    let cred = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(PeerCredentials {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    })
}

/// A connected pair, as the twin-socket handshake needs.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vfu-core-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    #[test]
    fn listens_with_the_requested_mode_and_accepts() {
        let path = temp_path("mode");
        let l = listen(&path, 0o600, 4).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(accept(&l).unwrap().is_none());
        let _c = connect_unix(&path).unwrap();
        assert!(accept(&l).unwrap().is_some());
    }

    #[test]
    fn replaces_a_stale_socket_but_not_a_live_one() {
        let path = temp_path("stale");
        let first = listen(&path, 0o600, 4).unwrap();
        assert_eq!(listen(&path, 0o600, 4).unwrap_err(), Errno::ADDRINUSE);
        drop(first);
        let _second = listen(&path, 0o600, 4).unwrap();
    }

    #[test]
    fn adopts_listening_unix_sockets_only() {
        let path = temp_path("adopt");
        let l = adopt_listener(listen(&path, 0o600, 4).unwrap()).unwrap();
        let _c = connect_unix(&path).unwrap();
        assert!(accept(&l).unwrap().is_some());
        let (a, _b) = pair().unwrap();
        assert_eq!(adopt_listener(a).unwrap_err(), Errno::INVAL);
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(adopt_listener(r).is_err());
    }

    #[test]
    fn connecting_to_a_full_backlog_fails_at_once_and_the_socket_stays_live() {
        let path = temp_path("backlog");
        let l = listen(&path, 0o600, 0).unwrap();
        let mut waiting = Vec::new();
        let error = loop {
            match connect_unix(&path) {
                Ok(fd) => waiting.push(fd),
                Err(e) => break e,
            }
            assert!(waiting.len() < 64, "the backlog never filled");
        };
        assert_eq!(error, Errno::AGAIN);
        assert_eq!(listen(&path, 0o600, 4).unwrap_err(), Errno::ADDRINUSE);
        assert!(accept(&l).unwrap().is_some());
        connect_unix(&path).unwrap();
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = pair().unwrap();
        let peer = peer_credentials(&a).unwrap();
        assert_eq!(peer.pid as u32, std::process::id());
        assert_eq!(peer.uid, rustix::process::getuid().as_raw());
        assert_eq!(peer.gid, rustix::process::getgid().as_raw());
    }

    #[test]
    fn accepts_connections_as_soon_as_its_path_exists() {
        // Clients (libvfio-user's, QEMU's) connect the moment the file appears.
        let path = temp_path("ready");
        for _ in 0..300 {
            let watched = path.clone();
            let client = std::thread::spawn(move || {
                while !watched.exists() {
                    std::hint::spin_loop();
                }
                connect_unix(&watched).map(drop)
            });
            let l = listen(&path, 0o600, 4).unwrap();
            assert_eq!(client.join().unwrap(), Ok(()));
            drop(l);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let path = temp_path("file");
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(listen(&path, 0o600, 4).unwrap_err(), Errno::ADDRINUSE);
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
