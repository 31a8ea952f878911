//! The daemon's side of simplevpn-helper: an async handle whose methods
//! mirror [`crate::privsep::netdev::LinkConfig`], each one a request to the helper.
//!
//! One task owns the socket. It sends one request at a time and waits for
//! its answer; between requests it watches the socket, so the helper's death
//! (EOF) is noticed even while the daemon asks nothing. [`Helper::lost`]
//! resolves then, and every later request fails with [`HelperError::Died`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch};

use super::tun::set_nonblocking;
use crate::privsep::channel::{self, Message};
use crate::privsep::protocol::{
    decode, encode, Forwarding, FrameError, HelperRequest, HelperResponse, TunFd,
};

/// How long the helper may take to answer one request before it counts as
/// dead (netlink answers in microseconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request the helper did not carry out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HelperError {
    /// Its policy does not allow the request; nothing was done.
    #[error("simplevpn-helper refused to {request}: {reason}")]
    Refused {
        /// The request, as a phrase ("set MTU 1500 on ifindex 7").
        request: String,
        /// The helper's reason.
        reason: String,
    },
    /// Allowed, but the kernel said no.
    #[error("simplevpn-helper failed to {request}: {reason}")]
    Failed {
        /// The request, as a phrase.
        request: String,
        /// The helper's report of the kernel's error.
        reason: String,
    },
    /// An answer that does not fit the request (or does not decode).
    #[error("simplevpn-helper gave an unexpected answer to \"{request}\": {answer}")]
    Unexpected {
        /// The request, as a phrase.
        request: String,
        /// What came back.
        answer: String,
    },
    /// The connection to the helper is gone; no request will succeed again.
    #[error("simplevpn-helper died: {0}")]
    Died(#[from] Lost),
}

/// Why the connection to the helper is unusable (the helper is taken to be
/// dead). Cheap to clone: every waiting caller gets the same reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Lost {
    /// A request could not be framed (a bug: every request is tiny).
    #[error("encoding {request}: {source}")]
    Encode {
        /// The request, as a phrase.
        request: String,
        /// Why.
        #[source]
        source: Arc<FrameError>,
    },
    /// Sending on the socket failed.
    #[error("writing its socket: {0}")]
    Write(#[source] Arc<io::Error>),
    /// Receiving from the socket failed.
    #[error("reading its socket: {0}")]
    Read(#[source] Arc<io::Error>),
    /// Waiting for the socket to become readable failed.
    #[error("watching its socket: {0}")]
    Watch(#[source] Arc<io::Error>),
    /// The helper closed its end (it exited or was killed).
    #[error("its socket closed")]
    Closed,
    /// A message arrived while no request was waiting for one.
    #[error("it sent a message nobody asked for")]
    Unsolicited,
    /// A request went unanswered for this long.
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
    /// The task that owns the socket is gone without saying why (the
    /// runtime is shutting down).
    #[error("the daemon stopped talking to it")]
    Abandoned,
}

/// One request and where its answer goes.
struct Call {
    request: HelperRequest,
    answer: oneshot::Sender<Result<Message, Lost>>,
}

/// A cheap-to-clone handle to the helper.
#[derive(Debug, Clone)]
pub struct Helper {
    calls: mpsc::Sender<Call>,
    /// Why the helper is gone, once it is.
    lost: watch::Receiver<Option<Lost>>,
}

impl Helper {
    /// Takes over the daemon's end of the helper's socketpair and starts the
    /// task that owns it. Must be called inside a tokio runtime.
    pub fn new(socket: OwnedFd) -> std::io::Result<Helper> {
        set_nonblocking(&socket)?;
        // SAFETY: the OwnedFd is a valid open fd, and it stays open and
        // unchanged for as long as the AsyncFd that owns it.
        let socket = unsafe {
            AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE)
        }?;
        let (calls, calls_rx) = mpsc::channel(8);
        let (lost_tx, lost) = watch::channel(None);
        tokio::spawn(async move {
            let why = serve(&socket, calls_rx).await;
            let _ = lost_tx.send(why);
        });
        Ok(Helper { calls, lost })
    }

    /// Resolves once the helper is gone, with the reason.
    pub async fn lost(&self) -> Lost {
        let mut lost = self.lost.clone();
        let why = match lost.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or(Lost::Abandoned),
            Err(_) => Lost::Abandoned,
        };
        why
    }

    /// Has the helper create the tun, and receives its fd.
    pub async fn open_tun(&self) -> Result<TunFd, HelperError> {
        let request = HelperRequest::OpenTun;
        let message = self.call(request.clone()).await?;
        let response = answer(&request, &message)?;
        let mut fds = message.fds.into_iter();
        match (response, fds.next()) {
            (
                HelperResponse::Tun {
                    name,
                    index,
                    offloads,
                },
                Some(fd),
            ) => Ok(TunFd {
                fd,
                more_queues: fds.collect(),
                name,
                index,
                offloads,
            }),
            (other, _) => Err(unexpected(&request, &other)),
        }
    }

    /// Makes `address/prefix` the tun's only IPv4 address.
    pub async fn set_ipv4(
        &self,
        index: u32,
        address: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), HelperError> {
        self.done(HelperRequest::SetAddress {
            index,
            address,
            prefix,
        })
        .await
    }

    /// Sets the tun's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), HelperError> {
        self.done(HelperRequest::SetMtu { index, mtu }).await
    }

    /// Brings the tun up.
    pub async fn set_up(&self, index: u32) -> Result<(), HelperError> {
        self.done(HelperRequest::LinkUp { index }).await
    }

    /// Makes `address/prefix` the tun's only global IPv6 address.
    pub async fn set_ipv6(
        &self,
        index: u32,
        address: Ipv6Addr,
        prefix: u8,
    ) -> Result<(), HelperError> {
        self.done(HelperRequest::SetAddress6 {
            index,
            address,
            prefix,
        })
        .await
    }

    /// Adds a route to `destination` (IPv4 or IPv6) through the tun.
    pub async fn add_route(
        &self,
        index: u32,
        destination: impl Into<IpNet>,
    ) -> Result<(), HelperError> {
        let destination = destination.into();
        self.done(HelperRequest::AddRoute { index, destination })
            .await
    }

    /// Deletes the route to `destination` through the tun.
    pub async fn del_route(
        &self,
        index: u32,
        destination: impl Into<IpNet>,
    ) -> Result<(), HelperError> {
        let destination = destination.into();
        self.done(HelperRequest::DelRoute { index, destination })
            .await
    }

    /// Server: NAT for the tunnel network; returns what was changed.
    pub async fn masquerade(&self, index: u32) -> Result<Vec<String>, HelperError> {
        self.changed(HelperRequest::Masquerade { index }).await
    }

    /// Server: whether IPv4 forwarding is on (or was turned on).
    pub async fn check_forwarding(&self) -> Result<Forwarding, HelperError> {
        self.forwarding(HelperRequest::CheckForwarding).await
    }

    /// Server with `network6`: whether IPv6 forwarding is on (or was turned on).
    pub async fn check_forwarding6(&self) -> Result<Forwarding, HelperError> {
        self.forwarding(HelperRequest::CheckForwarding6).await
    }

    /// A forwarding check, answered with its state.
    async fn forwarding(&self, request: HelperRequest) -> Result<Forwarding, HelperError> {
        let message = self.call(request.clone()).await?;
        match answer(&request, &message)? {
            HelperResponse::Forwarding(state) => Ok(state),
            other => Err(unexpected(&request, &other)),
        }
    }

    /// Client: routes everything but `server` into the tun; returns what
    /// was changed.
    pub async fn full_tunnel(
        &self,
        index: u32,
        server: IpAddr,
    ) -> Result<Vec<String>, HelperError> {
        self.changed(HelperRequest::FullTunnel { index, server })
            .await
    }

    /// Client: the server it is connected to now, whose address no route
    /// may take into the tun.
    pub async fn underlay(&self, index: u32, server: IpAddr) -> Result<(), HelperError> {
        self.done(HelperRequest::Underlay { index, server }).await
    }

    /// Client: undoes [`Helper::full_tunnel`].
    pub async fn end_full_tunnel(&self, index: u32) -> Result<(), HelperError> {
        self.done(HelperRequest::EndFullTunnel { index }).await
    }

    /// Client: the tun's DNS settings; returns what was changed.
    pub async fn set_dns(
        &self,
        index: u32,
        servers: Vec<IpAddr>,
        domains: Vec<String>,
        default_route: bool,
    ) -> Result<Vec<String>, HelperError> {
        self.changed(HelperRequest::SetDns {
            index,
            servers,
            domains,
            default_route,
        })
        .await
    }

    /// Client: reverts the tun's DNS settings.
    pub async fn revert_dns(&self, index: u32) -> Result<(), HelperError> {
        self.done(HelperRequest::RevertDns { index }).await
    }

    /// A request answered with the changes it made.
    async fn changed(&self, request: HelperRequest) -> Result<Vec<String>, HelperError> {
        let message = self.call(request.clone()).await?;
        match answer(&request, &message)? {
            HelperResponse::Changed(changes) => Ok(changes),
            other => Err(unexpected(&request, &other)),
        }
    }

    /// A request whose only good answer is `Ok`.
    async fn done(&self, request: HelperRequest) -> Result<(), HelperError> {
        let message = self.call(request.clone()).await?;
        match answer(&request, &message)? {
            HelperResponse::Ok => Ok(()),
            other => Err(unexpected(&request, &other)),
        }
    }

    /// Sends `request` and waits for the answer.
    async fn call(&self, request: HelperRequest) -> Result<Message, HelperError> {
        let (answer, answered) = oneshot::channel();
        if self.calls.send(Call { request, answer }).await.is_err() {
            return Err(self.died());
        }
        match answered.await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(why)) => Err(HelperError::Died(why)),
            Err(_) => Err(self.died()),
        }
    }

    /// The error for a call that found the socket's task gone.
    fn died(&self) -> HelperError {
        let why = self.lost.borrow().clone();
        HelperError::Died(why.unwrap_or(Lost::Closed))
    }
}

/// The decoded answer; a refusal or failure as an error.
fn answer(request: &HelperRequest, message: &Message) -> Result<HelperResponse, HelperError> {
    let response = decode(&message.frame).map_err(|e| HelperError::Unexpected {
        request: request.to_string(),
        answer: e.to_string(),
    })?;
    match response {
        HelperResponse::Refused(reason) => Err(HelperError::Refused {
            request: request.to_string(),
            reason,
        }),
        HelperResponse::Failed(reason) => Err(HelperError::Failed {
            request: request.to_string(),
            reason,
        }),
        other => Ok(other),
    }
}

fn unexpected(request: &HelperRequest, response: &HelperResponse) -> HelperError {
    HelperError::Unexpected {
        request: request.to_string(),
        answer: format!("{response:?}"),
    }
}

/// Owns the socket: carries out calls one at a time and watches for EOF in
/// between. Returns why the helper is gone, or `None` when every handle was
/// dropped (the socket then closes, and the helper exits).
async fn serve(socket: &AsyncFd<OwnedFd>, mut calls: mpsc::Receiver<Call>) -> Option<Lost> {
    loop {
        tokio::select! {
            call = calls.recv() => {
                let call = call?;
                let result = tokio::time::timeout(ANSWER_TIMEOUT, exchange(socket, &call.request))
                    .await
                    .unwrap_or(Err(Lost::Timeout(ANSWER_TIMEOUT)));
                let failed = result.as_ref().err().cloned();
                let _ = call.answer.send(result);
                if let Some(why) = failed {
                    return Some(why);
                }
            }
            ready = socket.readable() => {
                // Nothing was asked, so only EOF or a protocol violation can be here.
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => return Some(Lost::Watch(Arc::new(e))),
                };
                match guard.try_io(|fd| channel::recv(fd.as_fd())) {
                    Err(_would_block) => continue,
                    Ok(Ok(message)) if message.is_eof() => return Some(Lost::Closed),
                    Ok(Ok(_)) => return Some(Lost::Unsolicited),
                    Ok(Err(e)) => return Some(Lost::Read(Arc::new(e))),
                }
            }
        }
    }
}

/// Sends one request and receives its answer. An error means the
/// connection is unusable.
async fn exchange(socket: &AsyncFd<OwnedFd>, request: &HelperRequest) -> Result<Message, Lost> {
    let frame = encode(request).map_err(|e| Lost::Encode {
        request: request.to_string(),
        source: Arc::new(e),
    })?;
    socket
        .async_io(Interest::WRITABLE, |fd| {
            channel::send(fd.as_fd(), &frame, &[])
        })
        .await
        .map_err(|e| Lost::Write(Arc::new(e)))?;
    let message = socket
        .async_io(Interest::READABLE, |fd| channel::recv(fd.as_fd()))
        .await
        .map_err(|e| Lost::Read(Arc::new(e)))?;
    match message.is_eof() {
        true => Err(Lost::Closed),
        false => Ok(message),
    }
}
