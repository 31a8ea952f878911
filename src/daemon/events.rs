//! Peer events (connect, grant, disconnect, kick, refusal) fanned out to
//! whoever watches, such as `svpnctl watch`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::SystemTime;

use tokio::sync::broadcast;

/// Events kept for a watcher that falls behind before it misses some.
const BACKLOG: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connected,
    Granted,
    Disconnected,
    Kicked,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    pub kind: EventKind,
    pub time: SystemTime,
    pub remote: SocketAddr,
    pub address: Option<Ipv4Addr>,
    pub reason: String,
}

/// The sending side; cheap to publish to when nobody watches.
#[derive(Debug, Clone)]
pub struct Events(broadcast::Sender<PeerEvent>);

impl Default for Events {
    fn default() -> Self {
        Events(broadcast::channel(BACKLOG).0)
    }
}

impl Events {
    pub fn publish(
        &self,
        kind: EventKind,
        remote: SocketAddr,
        address: Option<Ipv4Addr>,
        reason: impl Into<String>,
    ) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(PeerEvent {
                kind,
                time: SystemTime::now(),
                remote,
                address,
                reason: reason.into(),
            });
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.0.subscribe()
    }
}
