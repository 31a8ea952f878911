//! The helper's side of the tun: creating it and configuring it. Only
//! simplevpn-helper runs this (and the tests, as root); everything here needs
//! `CAP_NET_ADMIN`. The daemon never calls it: it asks the helper
//! (`simplevpn::daemon::helper`) and does packet I/O on the fd it receives
//! (`simplevpn::daemon::tun::AsyncTun`).
//!
//! * [`create_tun`] (or [`open_tun_device`] while still root, then
//!   [`attach_tun`]): a tun device, as a [`TunFd`];
//! * [`LinkConfig`]: its address, MTU, link state and routes over rtnetlink
//!   (a blocking netlink socket: one request, then its answer).
//!   Every call is idempotent: setting what is already set, adding a route
//!   that exists or deleting one that does not is not an error.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use nix::fcntl::{open, OFlag};
use nix::libc;
use nix::sys::stat::Mode;

use super::policy::HostRoute;
use super::protocol::{Offloads, TunFd};
use crate::limits::MAX_IFNAME_LEN;

/// What went wrong, and on which interface.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// The requested interface name is empty, too long or contains a NUL.
    #[error("invalid interface name {0:?}: must be 1..={MAX_IFNAME_LEN} bytes without NUL")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// The `TUNSETIFF` ioctl failed.
    #[error("create tun {name}: {source}")]
    CreateTun {
        /// Requested name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The kernel's ifindex for a freshly created tun could not be found.
    #[error("look up ifindex of {name}: {source}")]
    IfIndex {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The rtnetlink socket could not be opened.
    #[error("open rtnetlink connection: {0}")]
    Connect(#[source] io::Error),
    /// An rtnetlink request failed. `op` names the request, e.g.
    /// `set address 198.19.0.1/16`.
    #[error("{op} on ifindex {index}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// Interface it was done on.
        index: u32,
        /// Cause (the kernel's errno where there is one).
        #[source]
        source: io::Error,
    },
}
// ---------------------------------------------------------------------------
// Tun creation
// ---------------------------------------------------------------------------

// TUNSETIFF is declared _IOW('T', 202, int) but really takes a `struct ifreq *`,
// which the kernel also writes: the name it chose comes back in it. So the
// pointer is `*mut` (read-write), never a `&` the kernel writes through.
nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// Privileged: creates a tun device (`IFF_TUN | IFF_NO_PI`, not persistent)
/// named `name` in the current network namespace. One read or write on the
/// returned fd is one IP packet, without any header.
pub fn create_tun(name: &str) -> Result<TunFd, NetdevError> {
    ifreq_for(name)?;
    attach_tun(open_tun_device()?, name)
}

/// Opens `/dev/net/tun` (`O_NONBLOCK | O_CLOEXEC`) without creating a device
/// yet: a process that will give up root opens it first, in case the device
/// node is root-only, and creates the tun later with [`attach_tun`].
pub fn open_tun_device() -> Result<OwnedFd, NetdevError> {
    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| NetdevError::OpenTun(e.into()))?;
    // SAFETY: nix's `open` returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// TUNSETOFFLOAD is _IOW('T', 208, unsigned int) but takes the flags by value.
nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);

/// Privileged (`CAP_NET_ADMIN`): creates the tun `name` on `fd`, a fresh fd
/// from [`open_tun_device`], as [`create_tun`] does.
pub fn attach_tun(fd: OwnedFd, name: &str) -> Result<TunFd, NetdevError> {
    attach(fd, name, Flags::PLAIN)
}

/// Like [`attach_tun`], with TUN offloads: the tun is created with
/// `IFF_VNET_HDR` (every read and write starts with a 10-byte virtio-net
/// header, [`simplevpn_proto::offload::VirtioNetHdr`]) and `TUNSETOFFLOAD` enables
/// checksum offload, TSO for IPv4 and IPv6, and USO where the kernel has it
/// (6.2 and later). The kernel may refuse offloads: the tun still works,
/// and [`TunFd::offloads`] says what was granted.
pub fn attach_tun_offloaded(fd: OwnedFd, name: &str) -> Result<TunFd, NetdevError> {
    attach_tun_queues(fd, Vec::new(), name)
}

/// Like [`attach_tun_offloaded`], with one queue more per fd in `more`
/// (fresh fds from [`open_tun_device`]): with any, the tun is created with
/// `IFF_MULTI_QUEUE`, and the kernel spreads the packets it routes into
/// the tun over the queues by flow, so that one reader per queue can work
/// at once. The kernel steers a flow's packets to the queue its last packet
/// was written on.
pub fn attach_tun_queues(
    fd: OwnedFd,
    more: Vec<OwnedFd>,
    name: &str,
) -> Result<TunFd, NetdevError> {
    let flags = Flags {
        vnet_hdr: true,
        multi_queue: !more.is_empty(),
    };
    let mut tun = attach(fd, name, flags)?;
    // The rest join the device the first one made, under the name the
    // kernel gave it (a name pattern such as "svpn%d" is resolved by now).
    for queue in more {
        let joined = attach(queue, &tun.name, flags)?;
        tun.more_queues.push(joined.fd);
    }
    // Offloads are the device's, set through any of its queues.
    if set_offloads(&tun.fd, Offloads::TSO_USO).is_ok() {
        tun.offloads = Offloads::TSO_USO;
    } else if set_offloads(&tun.fd, Offloads::TSO).is_ok() {
        tun.offloads = Offloads::TSO;
    }
    Ok(tun)
}

/// `TUNSETOFFLOAD` on a tun opened with `IFF_VNET_HDR`: what the kernel
/// may hand over from now on (checksum offload and TSO, USO; or nothing,
/// and the kernel segments and checksums itself). Needs no privilege: the
/// daemon changes it on the fd it holds, per connection.
pub fn set_offloads(fd: &OwnedFd, offloads: Offloads) -> io::Result<()> {
    let mut flags = 0;
    if offloads.tso {
        flags |= libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    }
    if offloads.uso {
        flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    // SAFETY: TUNSETOFFLOAD takes its flags by value; `fd` is an open tun fd.
    unsafe { tun_set_offload(fd.as_raw_fd(), flags as libc::c_int) }?;
    Ok(())
}

/// How a tun is opened beyond `IFF_TUN | IFF_NO_PI`.
#[derive(Debug, Clone, Copy)]
struct Flags {
    /// `IFF_VNET_HDR`: a virtio-net header before every packet.
    vnet_hdr: bool,
    /// `IFF_MULTI_QUEUE`: more than one fd, each a queue of its own.
    multi_queue: bool,
}

impl Flags {
    const PLAIN: Flags = Flags {
        vnet_hdr: false,
        multi_queue: false,
    };
}

fn attach(fd: OwnedFd, name: &str, flags: Flags) -> Result<TunFd, NetdevError> {
    let vnet_hdr = flags.vnet_hdr;
    let mut req = ifreq_for(name)?;
    let vnet = if vnet_hdr { libc::IFF_VNET_HDR } else { 0 };
    let multi = if flags.multi_queue {
        libc::IFF_MULTI_QUEUE
    } else {
        0
    };
    // IFF_TUN, IFF_NO_PI, IFF_VNET_HDR and IFF_MULTI_QUEUE fit in the
    // c_short flags field.
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet | multi) as libc::c_short;
    // SAFETY: `req` is a valid, initialised ifreq, borrowed mutably for
    // the call (the kernel writes the device's name back into it).
    unsafe { tun_set_iff(fd.as_raw_fd(), &mut req) }.map_err(|e| NetdevError::CreateTun {
        name: name.to_owned(),
        source: e.into(),
    })?;

    let name = ifname_of(&req);
    let index = if_index(&name)?;
    let offloads = match vnet_hdr {
        true => Offloads::HEADER_ONLY,
        false => Offloads::NONE,
    };
    Ok(TunFd {
        fd,
        more_queues: Vec::new(),
        name,
        index,
        offloads,
    })
}

/// Builds a zeroed `ifreq` carrying `name`, after checking the name's length.
fn ifreq_for(name: &str) -> Result<libc::ifreq, NetdevError> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.contains('\0') {
        return Err(NetdevError::InvalidName(name.to_owned()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// The (NUL-terminated) interface name the kernel wrote back into `req`.
fn ifname_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The ifindex of interface `name` in the current network namespace.
fn if_index(name: &str) -> Result<u32, NetdevError> {
    let err = |source| NetdevError::IfIndex {
        name: name.to_owned(),
        source,
    };
    let mut buf = name.as_bytes().to_vec();
    buf.push(0);
    let cname = CStr::from_bytes_with_nul(&buf)
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(cname.as_ptr()) } {
        0 => Err(err(io::Error::last_os_error())),
        index => Ok(index),
    }
}
// ---------------------------------------------------------------------------
// Interface configuration over rtnetlink
// ---------------------------------------------------------------------------

/// Interface configuration over rtnetlink, in the network namespace of the
/// thread that called [`LinkConfig::connect`]. Each call is one request on
/// a blocking netlink socket, answered before the call returns; clones
/// share the socket, one request at a time.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    rtnl: Arc<Mutex<Rtnl>>,
}

/// The netlink socket and the sequence number of its last request.
#[derive(Debug)]
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl LinkConfig {
    /// Opens an rtnetlink socket in the current network namespace.
    pub fn connect() -> Result<Self, NetdevError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetdevError::Connect)?;
        socket.bind_auto().map_err(NetdevError::Connect)?;
        // Only the kernel (port 0) may answer.
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetdevError::Connect)?;
        Ok(Self {
            rtnl: Arc::new(Mutex::new(Rtnl {
                socket,
                sequence: 0,
            })),
        })
    }

    /// Makes `addr/prefix` the only IPv4 address on the link: other IPv4
    /// addresses are removed first, and an already present `addr/prefix` is
    /// kept (so calling this again is not an error).
    pub fn set_ipv4(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), NetdevError> {
        self.set_only_address(index, IpAddr::V4(addr), prefix)
    }

    /// Makes `addr/prefix` the only global IPv6 address on the link (its
    /// link-local address stays), without duplicate address detection: the
    /// tun is point-to-point, and the address is usable at once.
    pub fn set_ipv6(&self, index: u32, addr: Ipv6Addr, prefix: u8) -> Result<(), NetdevError> {
        self.set_only_address(index, IpAddr::V6(addr), prefix)
    }

    /// Makes `addr/prefix` the only address of its family on the link
    /// (but IPv6 link-local ones); idempotent.
    fn set_only_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetdevError> {
        let family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let mut present = false;
        for msg in self.addresses(index, family)? {
            let local = local_address(&msg);
            if local.is_some_and(is_link_local) {
                continue;
            }
            if msg.header.prefix_len == prefix && local == Some(addr) {
                present = true;
            } else {
                self.del_address(index, msg)?;
            }
        }
        if present {
            return Ok(());
        }
        let op = || format!("set address {addr}/{prefix}");
        let result = self.request(
            RouteNetlinkMessage::NewAddress(address_message(index, addr, prefix)),
            CREATE,
        );
        ignore_errno(result, libc::EEXIST).map_err(|e| netlink_err(op(), index, e))
    }

    /// Sets the link's MTU.
    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetdevError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        let result = self.request(RouteNetlinkMessage::SetLink(msg), CREATE);
        result.map_err(|e| netlink_err(format!("set mtu {mtu}"), index, e))
    }

    /// Brings the link up.
    pub fn set_up(&self, index: u32) -> Result<(), NetdevError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags |= LinkFlags::Up;
        msg.header.change_mask |= LinkFlags::Up;
        let result = self.request(RouteNetlinkMessage::SetLink(msg), CREATE);
        result.map_err(|e| netlink_err("set link up".to_owned(), index, e))
    }

    /// Adds a route to `dest` (IPv4 or IPv6) through the link (which must
    /// be up). A route that already exists is not an error.
    pub fn add_route(&self, index: u32, dest: impl Into<IpNet>) -> Result<(), NetdevError> {
        let dest = dest.into().trunc();
        self.change_route(Change::Add, index, any_route_message(index, dest), dest)
    }

    /// Deletes the route to `dest` through the link. A missing route is not
    /// an error.
    pub fn del_route(&self, index: u32, dest: impl Into<IpNet>) -> Result<(), NetdevError> {
        let dest = dest.into().trunc();
        self.change_route(Change::Delete, index, any_route_message(index, dest), dest)
    }

    /// Adds or deletes one route, idempotently: adding one that exists, or
    /// deleting one that is gone, is not an error.
    fn change_route(
        &self,
        change: Change,
        index: u32,
        message: RouteMessage,
        dest: impl std::fmt::Display,
    ) -> Result<(), NetdevError> {
        let (result, already, verb) = match change {
            Change::Add => (
                self.request(RouteNetlinkMessage::NewRoute(message), CREATE),
                libc::EEXIST,
                "add",
            ),
            Change::Delete => (
                self.request(RouteNetlinkMessage::DelRoute(message), CHANGE),
                libc::ESRCH,
                "delete",
            ),
        };
        ignore_errno(result, already)
            .map_err(|e| netlink_err(format!("{verb} route {dest}"), index, e))
    }

    /// The unicast routes of the host's main table, IPv4 and IPv6.
    pub fn host_routes(&self) -> Result<Vec<HostRoute>, NetdevError> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let request = RouteNetlinkMessage::GetRoute(route_base(family));
            let all = match self.dump(request) {
                Ok(all) => all,
                // No IPv6 on this host: no IPv6 routes.
                Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => Vec::new(),
                Err(e) => return Err(netlink_err("list routes".to_owned(), 0, e)),
            };
            routes.extend(all.iter().filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(msg) => host_route(msg),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// Adds `route` (a pinned /32). Returns whether it was added: `false`
    /// if the host already had it, which is then not this helper's to delete.
    pub fn add_host_route(&self, route: HostRoute) -> Result<bool, NetdevError> {
        let message = RouteNetlinkMessage::NewRoute(host_route_message(route));
        match self.request(message, CREATE) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(netlink_err(
                format!("add route {}", describe_host_route(route)),
                route.index,
                e,
            )),
        }
    }

    /// Deletes `route`; one already gone is not an error.
    pub fn del_host_route(&self, route: HostRoute) -> Result<(), NetdevError> {
        let message = RouteNetlinkMessage::DelRoute(host_route_message(route));
        let result = self.request(message, CHANGE);
        ignore_errno(result, libc::ESRCH).map_err(|e| {
            netlink_err(
                format!("delete route {}", describe_host_route(route)),
                route.index,
                e,
            )
        })
    }

    /// Every address of `family` on the link.
    fn addresses(
        &self,
        index: u32,
        family: AddressFamily,
    ) -> Result<Vec<AddressMessage>, NetdevError> {
        // Ask the kernel for one family; filter again in case it ignores that.
        let mut request = AddressMessage::default();
        request.header.family = family;
        let all = self
            .dump(RouteNetlinkMessage::GetAddress(request))
            .map_err(|e| netlink_err("list addresses".to_owned(), index, e))?;
        Ok(all
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(msg) => Some(msg),
                _ => None,
            })
            .filter(|m| m.header.index == index && m.header.family == family)
            .collect())
    }

    /// Deletes one address. One already gone (e.g. a secondary removed along
    /// with its primary) is not an error.
    fn del_address(&self, index: u32, msg: AddressMessage) -> Result<(), NetdevError> {
        let op = format!(
            "delete address {}/{}",
            local_address(&msg).map_or_else(|| "?".to_owned(), |a| a.to_string()),
            msg.header.prefix_len
        );
        let result = self.request(RouteNetlinkMessage::DelAddress(msg), CHANGE);
        ignore_errno(result, libc::EADDRNOTAVAIL).map_err(|e| netlink_err(op, index, e))
    }

    /// Sends a request that the kernel acknowledges (`NLM_F_ACK` is among
    /// `flags`) and waits for that acknowledgement.
    fn request(&self, message: RouteNetlinkMessage, flags: u16) -> Result<(), RtnlError> {
        self.exchange(message, flags).map(drop)
    }

    /// Sends a dump request and collects the answers up to `NLMSG_DONE`.
    fn dump(&self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// Sends one request and reads the kernel's answers to it until the
    /// acknowledgement, the end of the dump or an error.
    fn exchange(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        // Nothing the lock guards can be left half-changed by a panic.
        let mut rtnl = self.rtnl.lock().unwrap_or_else(PoisonError::into_inner);
        rtnl.sequence = rtnl.sequence.wrapping_add(1);
        let sequence = rtnl.sequence;
        let mut request = NetlinkMessage::from(message);
        request.header.flags = flags;
        request.header.sequence_number = sequence;
        request.finalize();
        let mut frame = vec![0; request.buffer_len()];
        request.serialize(&mut frame);
        let sent = retry_interrupted(|| rtnl.socket.send(&frame, 0))?;
        if sent != frame.len() {
            return Err(RtnlError::Io(io::Error::other(format!(
                "netlink sent {sent} of {} bytes",
                frame.len()
            ))));
        }
        let mut answers = Vec::new();
        let mut datagram = Vec::with_capacity(RECV_BUFFER);
        loop {
            recv_datagram(&rtnl.socket, &mut datagram)?;
            if let Answer::Complete = read_answers(&datagram, sequence, &mut answers)? {
                return Ok(answers);
            }
        }
    }
}

/// Room for one datagram of a dump (the kernel fills up to 32 KiB where
/// the reader takes that much); a larger one is read in full anyway.
const RECV_BUFFER: usize = 32 * 1024;

/// The flags of a request that creates something: acknowledged, and an
/// error if it exists already (`EEXIST`, which the idempotent calls take
/// as success).
const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
/// The flags of any other acknowledged request.
const CHANGE: u16 = NLM_F_REQUEST | NLM_F_ACK;

/// Why a netlink request failed.
#[derive(Debug)]
enum RtnlError {
    /// The kernel refused it, with this errno.
    Kernel(i32),
    /// The socket failed, or the answer did not decode.
    Io(io::Error),
}

impl RtnlError {
    /// The kernel's errno, if the kernel refused the request.
    fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel(errno) => Some(*errno),
            RtnlError::Io(_) => None,
        }
    }
}

impl From<io::Error> for RtnlError {
    fn from(e: io::Error) -> Self {
        RtnlError::Io(e)
    }
}

/// Whether the answers to a request are all in.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Complete,
    MoreToCome,
}

/// Reads the next datagram from `socket` into `buf` (replacing what was
/// there), however long it is.
fn recv_datagram(socket: &Socket, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let len = retry_interrupted(|| socket.recv(buf, libc::MSG_PEEK | libc::MSG_TRUNC))?;
    buf.clear();
    buf.reserve(len);
    let read = retry_interrupted(|| socket.recv(buf, 0))?;
    if read != len {
        return Err(io::Error::other(format!(
            "netlink datagram of {len} bytes read as {read}"
        )));
    }
    Ok(())
}

/// Runs `call` again while a signal interrupts it (the parent-death signal
/// is caught without `SA_RESTART`; the helper checks for it between
/// requests).
fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Takes the messages of one datagram that answer request `sequence`
/// (others are stale answers to an earlier request, given up on) into
/// `answers`, and says whether the answer is complete: an `NLMSG_ERROR`
/// with code 0 acknowledges the request, `NLMSG_DONE` ends a dump, and a
/// negative code in either is the kernel's errno.
fn read_answers(
    datagram: &[u8],
    sequence: u32,
    answers: &mut Vec<RouteNetlinkMessage>,
) -> Result<Answer, RtnlError> {
    let mut rest = datagram;
    while !rest.is_empty() {
        let header = NetlinkBuffer::new_checked(rest).map_err(decode_error)?;
        let len = header.length() as usize;
        let (message_type, seq) = (header.message_type(), header.sequence_number());
        let bytes = &rest[..len];
        // Messages are 4-byte aligned; the last one may lack the padding.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if seq != sequence {
            continue;
        }
        let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
            Ok(message) => message,
            // One route or address this version cannot decode is not a
            // reason to fail the whole dump; an undecodable end is.
            Err(e) if message_type != NLMSG_ERROR && message_type != NLMSG_DONE => {
                tracing::warn!(
                    "skipped an undecodable rtnetlink message (type {message_type}): {e}"
                );
                continue;
            }
            Err(e) => return Err(decode_error(e)),
        };
        match message.payload {
            NetlinkPayload::Error(error) => {
                return match error.code {
                    None => Ok(Answer::Complete),
                    Some(code) => Err(RtnlError::Kernel(code.get().abs())),
                }
            }
            NetlinkPayload::Done(done) => {
                return match done.code {
                    0 => Ok(Answer::Complete),
                    code => Err(RtnlError::Kernel(code.abs())),
                }
            }
            NetlinkPayload::InnerMessage(inner) => answers.push(inner),
            NetlinkPayload::Overrun(_) => {
                return Err(RtnlError::Io(io::Error::other("netlink overrun")))
            }
            NetlinkPayload::Noop => {}
            // A payload kind added to the crate after this code.
            _ => {}
        }
    }
    Ok(Answer::MoreToCome)
}

fn decode_error(e: netlink_packet_core::DecodeError) -> RtnlError {
    RtnlError::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("undecodable rtnetlink answer: {e}"),
    ))
}

/// The message that adds `addr/prefix` to link `index`, as `ip address add`
/// sends it: `IFA_ADDRESS` and `IFA_LOCAL` (and the broadcast address of
/// an IPv4 subnet); IPv6 addresses without duplicate address detection.
fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = prefix;
    match addr {
        IpAddr::V4(v4) => {
            msg.header.family = AddressFamily::Inet;
            if !v4.is_multicast() {
                msg.attributes.push(AddressAttribute::Address(addr));
                msg.attributes.push(AddressAttribute::Local(addr));
                if prefix < 31 {
                    let broadcast = u32::MAX >> u32::from(prefix) | u32::from(v4);
                    msg.attributes
                        .push(AddressAttribute::Broadcast(Ipv4Addr::from(broadcast)));
                }
            }
        }
        IpAddr::V6(v6) => {
            msg.header.family = AddressFamily::Inet6;
            if v6.is_multicast() {
                msg.attributes.push(AddressAttribute::Multicast(v6));
            } else {
                msg.attributes.push(AddressAttribute::Address(addr));
                msg.attributes.push(AddressAttribute::Local(addr));
            }
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    msg
}

/// Whether a route is added or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Add,
    Delete,
}

/// A route message of `family` in the main table, static, of universe
/// scope, unicast, with no attributes yet (as `ip route` starts one; for a
/// dump, it asks for the family).
fn route_base(family: AddressFamily) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = family;
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Static;
    message.header.scope = RouteScope::Universe;
    message.header.kind = RouteType::Unicast;
    message
}

/// The route message for `dest` via link `index`, from [`route_base`].
fn route_to(dest: IpNet, index: u32) -> RouteMessage {
    let (family, address) = match dest.network() {
        IpAddr::V4(a) => (AddressFamily::Inet, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, RouteAddress::Inet6(a)),
    };
    let mut message = route_base(family);
    message.header.destination_prefix_length = dest.prefix_len();
    message
        .attributes
        .push(RouteAttribute::Destination(address));
    message.attributes.push(RouteAttribute::Oif(index));
    message
}

/// The route message used both to add and to delete `dest` via `index`
/// (deletion only matches a route with the same scope, table and
/// protocol): an IPv4 route of link scope, an IPv6 route of universe scope.
fn any_route_message(index: u32, dest: IpNet) -> RouteMessage {
    let mut message = route_to(dest, index);
    if dest.addr().is_ipv4() {
        message.header.scope = RouteScope::Link;
    }
    message
}

/// The message that adds or deletes a pinned host route: through its
/// gateway, or of link scope (IPv4) without one.
fn host_route_message(route: HostRoute) -> RouteMessage {
    let mut message = route_to(route.destination, route.index);
    match (route.destination, route.gateway) {
        (IpNet::V4(_), Some(IpAddr::V4(gateway))) => message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway))),
        (IpNet::V4(_), _) => message.header.scope = RouteScope::Link,
        (IpNet::V6(_), Some(IpAddr::V6(gateway))) => message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(gateway))),
        (IpNet::V6(_), _) => {}
    }
    message
}

/// "198.18.1.1/32 via 198.18.0.1 dev ifindex 2".
pub fn describe_host_route(route: HostRoute) -> String {
    match route.gateway {
        Some(gateway) => format!(
            "{} via {gateway} dev ifindex {}",
            route.destination, route.index
        ),
        None => format!("{} dev ifindex {}", route.destination, route.index),
    }
}

/// A main-table unicast IPv4 route with one output interface, as a [`HostRoute`].
fn host_route(msg: &RouteMessage) -> Option<HostRoute> {
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut destination = match msg.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let (mut gateway, mut index, mut metric) = (None, None, 0);
    for attribute in &msg.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = IpAddr::V4(*a),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => destination = IpAddr::V6(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => index = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    Some(HostRoute {
        destination: IpNet::new(destination, msg.header.destination_prefix_length).ok()?,
        gateway,
        index: index?,
        metric,
    })
}

/// A forwarding sysctl of the current network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardingSysctl {
    /// Its name, as `sysctl` writes it.
    pub name: &'static str,
    path: &'static str,
}

/// IPv4 forwarding: `net.ipv4.ip_forward`.
pub const IPV4_FORWARDING: ForwardingSysctl = ForwardingSysctl {
    name: "net.ipv4.ip_forward",
    path: "/proc/sys/net/ipv4/ip_forward",
};

/// IPv6 forwarding on every interface: `net.ipv6.conf.all.forwarding`.
pub const IPV6_FORWARDING: ForwardingSysctl = ForwardingSysctl {
    name: "net.ipv6.conf.all.forwarding",
    path: "/proc/sys/net/ipv6/conf/all/forwarding",
};

impl ForwardingSysctl {
    /// Whether it is on.
    pub fn is_on(self) -> io::Result<bool> {
        Ok(std::fs::read_to_string(self.path)?.trim() == "1")
    }

    /// Turns it on (CAP_NET_ADMIN may write the network's sysctls).
    pub fn turn_on(self) -> io::Result<()> {
        std::fs::write(self.path, b"1\n")
    }
}

/// The local address (`IFA_LOCAL`, else `IFA_ADDRESS`) of an address message.
fn local_address(msg: &AddressMessage) -> Option<IpAddr> {
    let find = |want_local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if want_local => Some(*ip),
            AddressAttribute::Address(ip) if !want_local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// Whether `ip` is an IPv6 link-local address (fe80::/10), which the kernel
/// gives every IPv6 link and which stays.
fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// Turns a refusal with errno `ok_errno` into success.
fn ignore_errno(result: Result<(), RtnlError>, ok_errno: i32) -> Result<(), RtnlError> {
    match result {
        Err(e) if e.errno() == Some(ok_errno) => Ok(()),
        other => other,
    }
}

/// Wraps a failed request, a kernel refusal as its errno.
fn netlink_err(op: String, index: u32, err: RtnlError) -> NetdevError {
    let source = match err {
        RtnlError::Kernel(errno) => io::Error::from_raw_os_error(errno),
        RtnlError::Io(e) => e,
    };
    NetdevError::Netlink { op, index, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// simplevpn-proto writes IFNAMSIZ out (it has no libc); the kernel's
    /// is libc's.
    #[test]
    fn ifnamsiz_is_the_kernels() {
        assert_eq!(crate::limits::IFNAMSIZ, libc::IFNAMSIZ);
        assert_eq!(MAX_IFNAME_LEN, libc::IFNAMSIZ - 1);
    }

    /// One netlink message with sequence number `seq`, as the kernel
    /// writes it.
    fn frame(seq: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut message = NetlinkMessage::new(Default::default(), payload);
        message.header.sequence_number = seq;
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    fn route(dest: &str) -> NetlinkPayload<RouteNetlinkMessage> {
        let net: IpNet = dest.parse().expect("net");
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(any_route_message(3, net)))
    }

    fn done(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut done = netlink_packet_core::DoneMessage::default();
        done.code = code;
        NetlinkPayload::Done(done)
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut error = netlink_packet_core::ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(code);
        NetlinkPayload::Error(error)
    }

    #[test]
    fn a_dump_collects_its_own_answers_across_datagrams_until_done() {
        let mut answers = Vec::new();
        // A stale answer to an earlier request (sequence 6) is skipped.
        let first = [
            frame(7, route("198.18.1.0/24")),
            frame(6, route("198.18.9.0/24")),
        ]
        .concat();
        let more = read_answers(&first, 7, &mut answers).expect("first datagram");
        assert_eq!(more, Answer::MoreToCome);
        let last = [frame(7, route("2001:2::/64")), frame(7, done(0))].concat();
        let end = read_answers(&last, 7, &mut answers).expect("last datagram");
        assert_eq!(end, Answer::Complete);
        let routes: Vec<HostRoute> = answers
            .iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewRoute(m) => host_route(m),
                _ => None,
            })
            .collect();
        let dests: Vec<String> = routes.iter().map(|r| r.destination.to_string()).collect();
        assert_eq!(dests, ["198.18.1.0/24", "2001:2::/64"]);
        assert!(routes.iter().all(|r| r.index == 3 && r.gateway.is_none()));
    }

    #[test]
    fn an_ack_completes_and_a_refusal_carries_the_errno() {
        let mut answers = Vec::new();
        let ack = read_answers(&frame(2, error(0)), 2, &mut answers).expect("ack");
        assert_eq!(ack, Answer::Complete);
        assert!(answers.is_empty());
        let refused = read_answers(&frame(3, error(-libc::EEXIST)), 3, &mut answers);
        assert_eq!(refused.expect_err("EEXIST").errno(), Some(libc::EEXIST));
        // A refusal of an earlier request says nothing about this one.
        let stale = read_answers(&frame(3, error(-libc::EPERM)), 4, &mut answers);
        assert_eq!(stale.expect("stale"), Answer::MoreToCome);
        // A dump the kernel could not finish ends with its errno.
        let cut = read_answers(&frame(5, done(-libc::EINTR)), 5, &mut answers);
        assert_eq!(cut.expect_err("EINTR").errno(), Some(libc::EINTR));
        assert!(ignore_errno(Err(RtnlError::Kernel(libc::ESRCH)), libc::ESRCH).is_ok());
        assert!(ignore_errno(Err(RtnlError::Kernel(libc::EPERM)), libc::ESRCH).is_err());
    }

    #[test]
    fn a_truncated_answer_is_an_error_not_a_panic() {
        let whole = frame(1, route("198.18.1.0/24"));
        for len in [3, 16, whole.len() - 1] {
            let result = read_answers(&whole[..len], 1, &mut Vec::new());
            assert!(
                matches!(result, Err(RtnlError::Io(_))),
                "{len} bytes: {result:?}"
            );
        }
    }

    #[test]
    fn route_messages_are_what_ip_route_sends() {
        let v4 = any_route_message(4, "198.18.0.0/15".parse().expect("net"));
        assert_eq!(v4.header.address_family, AddressFamily::Inet);
        assert_eq!(v4.header.scope, RouteScope::Link);
        assert_eq!(v4.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(v4.header.protocol, RouteProtocol::Static);
        assert_eq!(v4.header.destination_prefix_length, 15);
        assert_eq!(
            v4.attributes,
            [
                RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(198, 18, 0, 0))),
                RouteAttribute::Oif(4),
            ]
        );
        let v6 = any_route_message(4, "2001:2::/48".parse().expect("net"));
        assert_eq!(v6.header.address_family, AddressFamily::Inet6);
        assert_eq!(v6.header.scope, RouteScope::Universe);
        let pinned = host_route_message(HostRoute {
            destination: "198.18.5.5/32".parse().expect("net"),
            gateway: Some("198.18.0.1".parse().expect("ip")),
            index: 2,
            metric: 0,
        });
        assert_eq!(pinned.header.scope, RouteScope::Universe);
        assert!(pinned
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                198, 18, 0, 1
            )))));
        let on_link = host_route_message(HostRoute {
            destination: "198.18.5.5/32".parse().expect("net"),
            gateway: None,
            index: 2,
            metric: 0,
        });
        assert_eq!(on_link.header.scope, RouteScope::Link);
    }

    #[test]
    fn address_messages_carry_local_broadcast_and_nodad() {
        let v4 = address_message(5, "198.18.0.1".parse().expect("ip"), 24);
        assert_eq!((v4.header.index, v4.header.prefix_len), (5, 24));
        assert!(v4
            .attributes
            .contains(&AddressAttribute::Broadcast(Ipv4Addr::new(198, 18, 0, 255))));
        assert_eq!(local_address(&v4), Some("198.18.0.1".parse().expect("ip")));
        let v6 = address_message(5, "2001:2::1".parse().expect("ip"), 64);
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert!(v6
            .attributes
            .contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
    }
}
