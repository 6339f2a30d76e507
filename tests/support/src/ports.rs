//! Loopback ports for child processes that must bind a port they are given: etcd (it cannot
//! bind port 0 and report what it got), and anything that must come back on the same port
//! after a restart (a demo backend the control plane lists, a control plane Envoy's bootstrap
//! names).
//!
//! Binding port 0, reading the port and closing the socket (the usual `free_port`) races:
//! the kernel hands the same ephemeral range to every `bind(0)` and `connect()` on the
//! machine, so the port can be taken — as another test's listener or a connection's source
//! port — before the child binds it. [`reserve_port`] closes each way in:
//!
//! - its ports lie below the kernel's ephemeral range
//!   (`/proc/sys/net/ipv4/ip_local_port_range`), which `bind(0)` and `connect()` never pick;
//! - a process-wide counter hands each port out once per process;
//! - an exclusive lock on `<temp dir>/fulcrum-test-ports/<port>.lock`, held until the process
//!   exits (the kernel drops it then, even on a crash), keeps every other test process —
//!   parallel `cargo test` binaries, the demo — off it;
//! - the port is bound once when handed out, so a port some unrelated program holds is skipped.
//!
//! What remains is a program outside fulcrum's tests binding that very port between the check
//! and the child's bind; nothing on a test machine does. Wherever the child can report the
//! port it bound (Envoy's `--admin-address-path` and `/listeners`, the control plane's
//! `--address-file`) or runs in-process (bind a listener and keep it), use port 0 instead.

use std::{
    collections::HashMap,
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use crate::{Error, error::io};

/// Where the lowest reserved port lies; ports below are left to fixed-port services.
const FIRST_PORT: u32 = 10_000;
/// The highest port reserved, whatever the ephemeral range says.
const LAST_PORT: u32 = 32_000;

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A loopback port no other fulcrum test process and no kernel-chosen port can take, bindable
/// when handed out and reserved for this process until it exits (see the module docs).
pub fn reserve_port() -> Result<u16, Error> {
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static LOCKS: OnceLock<Mutex<HashMap<u16, File>>> = OnceLock::new();
    let (first, end) = *RANGE.get_or_init(|| {
        let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768);
        (FIRST_PORT, ephemeral_low.clamp(FIRST_PORT + 1, LAST_PORT))
    });
    let dir = lock_dir()?;
    let span = end - first;
    // Parallel processes start at different places, so they seldom contend for a lock.
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = first + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("the range ends below 32000");
        let path = dir.join(format!("{port}.lock"));
        let lock = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        if lock.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(loopback(port)).is_ok() {
            LOCKS
                .get_or_init(Mutex::default)
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(port, lock);
            return Ok(port);
        }
    }
    Err(Error::Io {
        what: format!("reserving a loopback port in {first}..{end}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// The directory of the port locks, shared by every process of this user's machine.
fn lock_dir() -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join("fulcrum-test-ports");
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn reserved_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| reserve_port().expect("a port")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!((10_000..32_768).contains(&u32::from(port)), "{port}");
            TcpListener::bind(loopback(port)).expect("a reserved port is bindable");
        }
    }

    #[test]
    fn a_reserved_port_is_locked_against_other_processes() {
        let port = reserve_port().expect("a port");
        let path = lock_dir().expect("lock dir").join(format!("{port}.lock"));
        // Another open file description stands for another process: flock excludes it.
        let other = File::open(path).expect("the lock file exists");
        assert!(other.try_lock().is_err(), "port {port} is not locked");
    }
}
