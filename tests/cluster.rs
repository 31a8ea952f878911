//! Several servers, one network, their shared state in etcd (issue #17).
//! etcd is Debian's etcd-server, started by each test in a namespace of its
//! own on 198.18.0.0/15 with its data in a temporary directory.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::etcd::Etcd;
use common::*;
use simplevpn::cluster::etcd::Etcd as Client;
use simplevpn::cluster::leases::{Claimant, Leases, Wanted};

/// A tokio runtime on a thread inside `ns`, so that its sockets are there.
fn in_ns<T: Send>(ns: &Netns, f: impl std::future::Future<Output = T> + Send) -> T {
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
}

#[test]
fn two_servers_granting_at_once_never_hand_out_one_address_twice() {
    if !require_root("two_servers_granting_at_once_never_hand_out_one_address_twice") {
        return;
    }
    let ns = Netns::new("etcdgrant");
    ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
    let etcd = Etcd::start(&ns, Ipv4Addr::new(198, 18, 90, 1));
    let url = etcd.url.clone();
    // A /26: 61 addresses for clients, 80 of them asking at once through
    // two servers, each with its own etcd connection and lease.
    let network = "198.19.0.0/26".parse().expect("net");
    let granted = in_ns(&ns, async move {
        let mut tasks = Vec::new();
        for (n, node) in ["s1", "s2"].into_iter().enumerate() {
            let etcd = Client::new(std::slice::from_ref(&url)).expect("client");
            let lease = etcd.grant(Duration::from_secs(30)).await.expect("lease");
            let leases = Arc::new(Leases::new(etcd, "/simplevpn/test/", node, network));
            for i in 0..40u8 {
                let leases = leases.clone();
                let claimant =
                    Claimant::Remote(std::net::IpAddr::from([198, 18, 100 * n as u8 + i, 2]));
                tasks.push(tokio::spawn(async move {
                    leases
                        .claim(&claimant, Wanted::Any, lease, |_| true)
                        .await
                        .ok()
                        .map(|a| (node, a))
                }));
            }
        }
        let mut granted = Vec::new();
        for task in tasks {
            granted.push(task.await.expect("task"));
        }
        granted
    });
    let addresses: Vec<(&str, Ipv4Addr)> = granted.into_iter().flatten().collect();
    let distinct: HashSet<Ipv4Addr> = addresses.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        distinct.len(),
        addresses.len(),
        "an address granted twice: {addresses:?}"
    );
    // Every client address of the /26 is granted, and no more.
    assert_eq!(addresses.len(), 61, "{addresses:?}");
    assert!(addresses.iter().any(|(n, _)| *n == "s1") && addresses.iter().any(|(n, _)| *n == "s2"));
    assert!(
        !distinct.contains(&Ipv4Addr::new(198, 19, 0, 1)),
        "the servers' own address"
    );
}
