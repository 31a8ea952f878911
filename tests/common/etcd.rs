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
    /// The client URL, `http://ADDR:2379` (`https://` with TLS).
    pub url: String,
    address: Ipv4Addr,
    dir: PathBuf,
    daemon: Option<Daemon>,
    /// With TLS: the files a client needs.
    pub tls: Option<EtcdTls>,
    /// More flags for etcd.
    extra: Vec<String>,
}

/// An etcd that requires client certificates: its CA and a client
/// certificate it accepts (PEM files, made by the test with rcgen).
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    /// A CA, a server certificate for `address`, and a client certificate,
    /// written under `dir` (readable by the daemons' user: a test's files).
    fn make(dir: &std::path::Path, address: Ipv4Addr) -> EtcdTls {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).expect("pki directory");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("pki file");
            path
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "simplevpn test etcd CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: Vec<ExtendedKeyUsagePurpose>, cn: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = usage;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        // etcd's gateway dials etcd itself with the server certificate:
        // it needs client authentication too.
        let (server_cert, server_key) = leaf(
            vec![address.to_string()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            "etcd",
        );
        let (cert, key) = leaf(
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            "simplevpn",
        );
        EtcdTls {
            ca: write("ca.pem", ca_cert.pem()),
            cert: write("client.pem", cert),
            key: write("client-key.pem", key),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
        }
    }

    /// The `[cluster]` lines of a server that uses it.
    pub fn config_lines(&self) -> String {
        format!(
            "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\n",
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )
    }
}

impl Etcd {
    /// Starts etcd in `ns`, listening on `address` (one of `ns`'s own), and
    /// waits until it answers /health.
    pub fn start(ns: &Netns, address: Ipv4Addr) -> Etcd {
        Etcd::start_with(ns, address, false, &[])
    }

    /// Starts etcd in `ns` (plain http://) with more flags.
    pub fn start_flags(ns: &Netns, address: Ipv4Addr, flags: &[&str]) -> Etcd {
        Etcd::start_with(ns, address, false, flags)
    }

    /// Starts etcd in `ns` over TLS, requiring client certificates signed
    /// by its CA (see [`EtcdTls`]).
    pub fn start_tls(ns: &Netns, address: Ipv4Addr) -> Etcd {
        Etcd::start_with(ns, address, true, &[])
    }

    fn start_with(ns: &Netns, address: Ipv4Addr, tls: bool, flags: &[&str]) -> Etcd {
        let dir = std::env::temp_dir().join(format!("{}-etcd", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        let tls = tls.then(|| EtcdTls::make(&dir.join("pki"), address));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            url: format!("{scheme}://{address}:2379"),
            address,
            dir,
            daemon: None,
            tls,
            extra: flags.iter().map(|f| f.to_string()).collect(),
        };
        etcd.resume(ns);
        etcd
    }

    /// Starts it again (after [`Etcd::stop`]) on the same data.
    pub fn resume(&mut self, ns: &Netns) {
        let client = self.url.clone();
        let peer = format!("http://{}:2380", self.address);
        // /health over plain HTTP on its own port, whether the client port
        // speaks TLS or not.
        let metrics = format!("http://{}:2381", self.address);
        let data = self.dir.join("data");
        let mut args: Vec<String> = [
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
            "--listen-metrics-urls",
            &metrics,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.push(flag.into());
                args.push(path.to_str().expect("utf-8 path").into());
            }
            args.push("--client-cert-auth".into());
        }
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = ns.spawn(ETCD, &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        let address = SocketAddr::from((self.address, 2381));
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
