//! An etcd (Debian's etcd-server, /usr/bin/etcd) for a test: started inside
//! a namespace of the test's own, on an address from 198.18.0.0/15, with its
//! data in a temporary directory; stopped by its PID when dropped (the
//! directory removed with it). It can be stopped and started again on the
//! same data, for the tests of what servers do while it is gone.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Daemon, Netns};

pub const ETCD: &str = "/usr/bin/etcd";

pub struct Etcd {
    /// The client URL, `http://ADDR:2379`.
    pub url: String,
    address: Ipv4Addr,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl Etcd {
    /// Starts etcd in `ns`, listening on `address` (one of `ns`'s own), and
    /// waits until it answers /health.
    pub fn start(ns: &Netns, address: Ipv4Addr) -> Etcd {
        let dir = std::env::temp_dir().join(format!("{}-etcd", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        let mut etcd = Etcd {
            url: format!("http://{address}:2379"),
            address,
            dir,
            daemon: None,
        };
        etcd.resume(ns);
        etcd
    }

    /// Starts it again (after [`Etcd::stop`]) on the same data.
    pub fn resume(&mut self, ns: &Netns) {
        let client = format!("http://{}:2379", self.address);
        let peer = format!("http://{}:2380", self.address);
        let data = self.dir.join("data");
        let args = [
            "--name",
            "test",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ];
        let daemon = ns.spawn(ETCD, &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        let address = SocketAddr::from((self.address, 2379));
        loop {
            if healthy(ns, address) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.daemon = Some(daemon);
    }

    /// Stops it (SIGTERM by PID, SIGKILL after 2 s); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            if daemon.terminate(Duration::from_secs(5)).is_none() {
                daemon.kill();
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether etcd at `address` (inside `ns`) answers `GET /health` with
/// `"health":"true"`.
fn healthy(ns: &Netns, address: SocketAddr) -> bool {
    let Ok(mut stream) = ns.tcp_connect(address, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}
