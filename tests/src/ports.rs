//! Ports for programs that cannot bind port 0 and report what they got (HAProxy, etcd), and
//! for addresses where nothing may listen: each one handed out once per run, whichever test
//! process asks.
//!
//! nextest runs every test in a process of its own, so "bind port 0, close it, hand the port
//! on" lets two processes pick the same port, and lets the kernel give it to anyone's `bind(0)`
//! or outgoing connection before the program that was told to use it binds it. Instead:
//!
//! - a port comes from [`FIRST`] up to the kernel's ephemeral range
//!   (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel never picks itself;
//! - it is claimed by an exclusive, non-blocking `flock` on `/tmp/baker-test-ports/<port>`,
//!   whose file stays open for as long as the test process lives (the kernel lifts the lock
//!   when the process ends, however it ends: a crashed test gives its ports back);
//! - a bind then checks that no program outside Baker's tests holds it right now;
//! - the search starts at a random offset, so that processes rarely contend for one lock.

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// The lowest port handed out: well above the ports services conventionally use.
pub const FIRST: u16 = 20_000;

/// Where the lock files live, shared by every test process of the machine.
pub const LOCK_DIR: &str = "/tmp/baker-test-ports";

/// The ports this process holds, with the locks that claim them (never released before exit).
static HELD: Mutex<Vec<(u16, Flock<File>)>> = Mutex::new(Vec::new());

/// A TCP port on 127.0.0.1 that no other test of this run (in this process or another) is
/// handed, that the kernel gives to no `bind(0)` or outgoing connection, and that nothing
/// listens on now; for programs that must be told a port (HAProxy, etcd), and for an address
/// that must refuse connections.
///
/// Panics when every candidate port is taken.
pub fn free_port() -> u16 {
    let range = candidates(ephemeral_range());
    let span = u32::from(range.end - range.start);
    let start = (RandomState::new().build_hasher().finish() % u64::from(span)) as u32;
    let ports = (0..span).map(|k| range.start + ((start + k) % span) as u16);
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    claim_first(Path::new(LOCK_DIR), ports, &mut held).unwrap_or_else(|| {
        panic!(
            "no free port left in {range:?} (locks in {LOCK_DIR}): too many test processes, \
             or something else holds the ports"
        )
    })
}

/// The kernel's ephemeral port range, `[low, high]`.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => (low, high),
        // Linux's default.
        _ => (32768, 60999),
    }
}

/// The ports to hand out: from [`FIRST`] to the ephemeral range, or above it when it starts too
/// low to leave room below.
fn candidates((low, high): (u16, u16)) -> Range<u16> {
    const ENOUGH: u16 = 1000;
    if low > FIRST && low - FIRST >= ENOUGH {
        FIRST..low
    } else if high < u16::MAX && u16::MAX - high >= ENOUGH {
        high + 1..u16::MAX
    } else {
        panic!(
            "the kernel's ephemeral port range ({low}-{high}) leaves no room for test ports: \
             narrow it (sysctl net.ipv4.ip_local_port_range=\"32768 60999\")"
        )
    }
}

/// Claims the first of `ports` that no process holds (this one's claims are in `held`) and
/// nothing listens on, and adds it to `held`.
fn claim_first(
    dir: &Path,
    ports: impl IntoIterator<Item = u16>,
    held: &mut Vec<(u16, Flock<File>)>,
) -> Option<u16> {
    ensure_dir(dir);
    for port in ports {
        if held.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let Some(lock) = lock(&lock_path(dir, port)) else {
            continue;
        };
        // Something that is not one of Baker's tests (or a test process that ended and left
        // a daemon behind) may listen there.
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err()
            || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_err()
        {
            continue;
        }
        held.push((port, lock));
        return Some(port);
    }
    None
}

fn lock_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(port.to_string())
}

/// Creates the lock directory, writable by every user (sticky, as /tmp), if it is missing.
fn ensure_dir(dir: &Path) {
    if dir.is_dir() {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        panic!("creating {}: {e}", dir.display());
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
}

/// An exclusive lock on `path`, if no other open file holds one.
fn lock(path: &Path) -> Option<Flock<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(path)
        // Another user's file: reading is enough to lock it.
        .or_else(|_| File::open(path))
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_ports_of_one_process_differ_and_stay_unbound() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        let (low, _) = ephemeral_range();
        for p in [a, b] {
            assert!((FIRST..low).contains(&p), "{p} is outside {FIRST}..{low}");
            // Handed out, not bound: the program it is for can bind it.
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("a handed-out port is bindable");
        }
    }

    #[test]
    fn a_port_another_process_holds_is_skipped() {
        // Two ports no other test uses (claimed in the shared directory), claimed again in a
        // directory of this test's own by a "process" with its own claims.
        let (first, second) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let mut held = Vec::new();
        // Another process's lock: flock tells open files apart, not processes, so a second
        // open file locked on its own is what another process's lock looks like.
        let other = lock(&lock_path(dir.path(), first)).expect("an unheld lock");
        assert_eq!(
            claim_first(dir.path(), [first, second], &mut held),
            Some(second)
        );
        // Once that process ends, its port can be claimed again.
        drop(other);
        assert_eq!(claim_first(dir.path(), [first], &mut held), Some(first));
        // And never twice by one process.
        assert_eq!(claim_first(dir.path(), [first, second], &mut held), None);
    }

    #[test]
    fn a_port_something_listens_on_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        assert_eq!(claim_first(dir.path(), [port], &mut Vec::new()), None);
    }

    #[test]
    fn the_range_stays_below_the_kernels_or_goes_above_it() {
        assert_eq!(candidates((32768, 60999)), FIRST..32768);
        assert_eq!(candidates((1024, 60999)), 61000..u16::MAX);
    }
}
