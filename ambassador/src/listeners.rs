//! The listening sockets clients connect to (the service ports, the shared HTTP port, the admin
//! port), bound by the ambassador and handed to HAProxy by inheritance (`bind fd@N`).
//!
//! The ambassador keeps its copy of each socket open for as long as it runs, so that when
//! HAProxy dies (its worker or its master, killed or out of memory) the ports stay open: the
//! kernel keeps queueing new connections in the backlog instead of refusing them, and the
//! HAProxy started in its place accepts them. Only the requests inside the dead process are
//! lost. A reload through the master CLI keeps working: the master keeps the descriptors it
//! inherited, and re-executes itself with them.
//!
//! An HAProxy taken over from a killed ambassador holds the sockets the killed one bound; the
//! new ambassador cannot get copies of them, so it renders `fd@N` with the master's own numbers
//! (found in `/proc`), and binds its own sockets only when that HAProxy is replaced.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the socket on {addr} inheritable by HAProxy")]
    Inherit {
        addr: SocketAddr,
        #[source]
        source: nix::Error,
    },
}

/// Every address HAProxy listens on for clients: each service's port, the shared HTTP port,
/// the admin port.
pub fn addresses(config: &Config) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = config
        .services
        .iter()
        .filter_map(|s| s.port)
        .chain(config.http_port)
        .map(|p| SocketAddr::new(config.bind, p))
        .collect();
    out.extend(config.admin);
    out.dedup();
    out
}

/// The descriptor HAProxy finds each listening address on, when it inherits one.
pub type Fds = BTreeMap<SocketAddr, RawFd>;

/// What follows `bind` for `addr`: `fd@N` when HAProxy inherits the socket, else the address.
pub fn bind_spec(fds: &Fds, addr: SocketAddr) -> String {
    match fds.get(&addr) {
        Some(fd) => format!("fd@{fd}"),
        None => format!("{}:{}", addr.ip(), addr.port()),
    }
}

/// Whether the rendered configuration `text` binds `fd@{fd}` (and not only a longer number
/// that begins with it).
pub fn uses_fd(text: &str, fd: RawFd) -> bool {
    let token = format!("fd@{fd}");
    text.match_indices(&token).any(|(at, _)| {
        !text[at + token.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The sockets this ambassador holds, and those a taken-over master holds.
#[derive(Default)]
pub struct Listeners {
    held: BTreeMap<SocketAddr, TcpListener>,
    /// Descriptors of a taken-over master, by the address they listen on.
    adopted: Fds,
}

impl Listeners {
    /// The descriptors HAProxy inherits, by address.
    pub fn fds(&self) -> Fds {
        let mut fds = self.adopted.clone();
        fds.extend(self.held.iter().map(|(a, l)| (*a, l.as_raw_fd())));
        fds
    }

    /// The descriptors of this ambassador's own sockets, by address.
    pub fn held_fds(&self) -> Fds {
        self.held.iter().map(|(a, l)| (*a, l.as_raw_fd())).collect()
    }

    /// Binds every address of `addrs` not held yet, inheritable by HAProxy, and forgets the
    /// descriptors of a taken-over master (it is gone when a new HAProxy starts).
    pub fn bind(&mut self, addrs: &[SocketAddr]) -> Result<(), ListenError> {
        self.adopted.clear();
        for &addr in addrs {
            if self.held.contains_key(&addr) {
                continue;
            }
            // SO_REUSEADDR is set by std on Unix: a port left in TIME_WAIT binds again.
            let l = TcpListener::bind(addr).map_err(|e| ListenError::Bind { addr, source: e })?;
            // Inherited by every HAProxy started from now on (and by the short-lived
            // `haproxy -c`, which does not use it).
            fcntl(l.as_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| ListenError::Inherit { addr, source: e })?;
            self.held.insert(addr, l);
        }
        Ok(())
    }

    /// Closes the sockets the rendered configuration `text` does not bind by descriptor (a
    /// template that binds the addresses itself): HAProxy binds those, so they close with it.
    /// Returns their addresses.
    pub fn release_unused(&mut self, text: &str) -> Vec<SocketAddr> {
        let unused: Vec<SocketAddr> = self
            .held
            .iter()
            .filter(|(_, l)| !uses_fd(text, l.as_raw_fd()))
            .map(|(a, _)| *a)
            .collect();
        for a in &unused {
            self.held.remove(a);
        }
        unused
    }

    /// Takes the descriptors master `pid` listens on for `addrs` (found through `/proc`):
    /// the configuration of a taken-over HAProxy names them, and the master keeps them across
    /// reloads.
    pub fn adopt(&mut self, pid: i32, addrs: &[SocketAddr]) {
        let mut inodes = BTreeMap::new();
        for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            inodes.extend(listening(&text, v6));
        }
        let mut sockets = Vec::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for entry in dir.flatten() {
                let (Some(fd), Ok(link)) = (
                    entry.file_name().to_str().and_then(|n| n.parse().ok()),
                    std::fs::read_link(entry.path()),
                ) else {
                    continue;
                };
                sockets.push((fd, link.display().to_string()));
            }
        }
        self.adopted = match_fds(&sockets, &inodes, addrs);
    }
}

/// The listening sockets of a `/proc/net/tcp` (or `tcp6`, when `v6`) table: inode → address.
pub fn listening(text: &str, v6: bool) -> BTreeMap<u64, SocketAddr> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((hex, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse::<u64>()) else {
            continue;
        };
        let ip = if v6 {
            // Four 32-bit words, each in the host's (little-endian) order.
            let mut bytes = [0u8; 16];
            let mut ok = hex.len() == 32;
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                match hex
                    .get(i * 8..i * 8 + 8)
                    .and_then(|w| u32::from_str_radix(w, 16).ok())
                {
                    Some(w) => chunk.copy_from_slice(&w.to_le_bytes()),
                    None => ok = false,
                }
            }
            if !ok {
                continue;
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            match u32::from_str_radix(hex, 16) {
                Ok(w) if hex.len() == 8 => IpAddr::V4(Ipv4Addr::from(w.to_le_bytes())),
                _ => continue,
            }
        };
        out.insert(inode, SocketAddr::new(ip, port));
    }
    out
}

/// Which of a process's descriptors (`(fd, link)`, the link as `/proc/<pid>/fd` shows it:
/// `socket:[inode]`) listen on each of `addrs`, given the listening sockets by inode. The
/// lowest descriptor wins when several listen on one address.
pub fn match_fds(
    sockets: &[(RawFd, String)],
    listening: &BTreeMap<u64, SocketAddr>,
    addrs: &[SocketAddr],
) -> Fds {
    let mut out = Fds::new();
    let mut sorted: Vec<&(RawFd, String)> = sockets.iter().collect();
    sorted.sort();
    for (fd, link) in sorted {
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok())
        else {
            continue;
        };
        if let Some(addr) = listening.get(&inode).filter(|a| addrs.contains(a)) {
            out.entry(*addr).or_insert(*fd);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 38209 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 38213 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F40 0100007F:D2F0 01 00000000:0000 00:00000000 00000000     0        0 40001 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 50000 1 0000000000000000 100 0 0 10 0
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listening_sockets_are_read_from_the_kernels_tables() {
        let v4 = listening(TCP, false);
        assert_eq!(v4.len(), 2, "the established connection is not listening");
        assert_eq!(v4[&38209], addr("127.0.0.1:8000"));
        assert_eq!(v4[&38213], addr("0.0.0.0:8080"));
        let v6 = listening(TCP6, true);
        assert_eq!(v6[&50000], addr("[::1]:8001"));
        assert!(listening("header\n   0: garbage", false).is_empty());
    }

    #[test]
    fn a_masters_descriptors_are_matched_to_the_addresses_wanted() {
        let table = listening(TCP, false);
        let sockets = vec![
            (9, "socket:[38209]".to_owned()),
            (3, "socket:[38209]".to_owned()),
            (4, "socket:[40001]".to_owned()),
            (5, "pipe:[38213]".to_owned()),
            (6, "socket:[38213]".to_owned()),
        ];
        let fds = match_fds(
            &sockets,
            &table,
            &[addr("127.0.0.1:8000"), addr("127.0.0.1:9000")],
        );
        // The lowest of two descriptors; an address the master does not listen on is absent;
        // 0.0.0.0:8080 is not wanted.
        assert_eq!(fds, Fds::from([(addr("127.0.0.1:8000"), 3)]));
    }

    #[test]
    fn a_bind_names_the_inherited_descriptor_or_the_address() {
        let fds = Fds::from([(addr("127.0.0.1:8000"), 7)]);
        assert_eq!(bind_spec(&fds, addr("127.0.0.1:8000")), "fd@7");
        assert_eq!(bind_spec(&fds, addr("127.0.0.1:8001")), "127.0.0.1:8001");
        assert_eq!(bind_spec(&fds, addr("[::]:8001")), ":::8001");
    }

    #[test]
    fn a_descriptor_is_used_only_by_its_own_number() {
        assert!(uses_fd("    bind fd@7\n", 7));
        assert!(uses_fd("bind fd@7", 7));
        assert!(!uses_fd("    bind fd@70\n", 7));
        assert!(uses_fd("bind fd@70\nbind fd@7 ", 7));
        assert!(!uses_fd("bind 127.0.0.1:7", 7));
    }

    #[test]
    fn sockets_are_bound_once_inheritable_and_released_when_unused() {
        let mut l = Listeners::default();
        let a = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let b = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        l.bind(&[a, b]).unwrap();
        let fds = l.fds();
        l.bind(&[a, b]).unwrap();
        assert_eq!(l.fds(), fds, "held sockets are not bound again");
        let flags = fcntl(l.held[&a].as_fd(), FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & FdFlag::FD_CLOEXEC.bits(), 0, "inheritable");
        let text = format!("bind fd@{}\n", fds[&a]);
        assert_eq!(l.release_unused(&text), vec![b]);
        assert_eq!(l.fds().keys().copied().collect::<Vec<_>>(), vec![a]);
        // The released port is free again.
        TcpListener::bind(b).unwrap();
        // A port in use is an error naming it.
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let msg = Listeners::default()
            .bind(&[busy.local_addr().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("cannot listen on 127.0.0.1:"), "{msg}");
    }

    #[test]
    fn addresses_cover_services_the_shared_port_and_the_admin_port() {
        let (mut c, _) = crate::render::tests::sample();
        c.admin = Some(addr("127.0.0.1:8404"));
        let at = |p| SocketAddr::new(c.bind, p);
        assert_eq!(
            addresses(&c),
            vec![at(8000), at(5432), at(8080), addr("127.0.0.1:8404")]
        );
    }
}
