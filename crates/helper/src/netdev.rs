//! The helper's side of the tun: creating it and configuring it. Only
//! simplevpn-helper runs this (and the tests, as root); everything here needs
//! `CAP_NET_ADMIN`. The daemon never calls it: it asks the helper
//! (`simplevpn::daemon::helper`) and does packet I/O on the fd it receives
//! (`simplevpn::daemon::tun::AsyncTun`).
//!
//! * [`create_tun`] (or [`open_tun_device`] while still root, then
//!   [`attach_tun`]): a tun device, as a [`TunFd`];
//! * [`LinkConfig`]: its address, MTU, link state and routes over rtnetlink.
//!   Every call is idempotent: setting what is already set, adding a route
//!   that exists or deleting one that does not is not an error.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::fcntl::{open, OFlag};
use nix::libc;
use nix::sys::stat::Mode;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

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
/// thread that called [`LinkConfig::connect`].
#[derive(Debug, Clone)]
pub struct LinkConfig {
    handle: rtnetlink::Handle,
}

impl LinkConfig {
    /// Opens an rtnetlink socket and spawns its connection task on the
    /// current tokio runtime.
    pub async fn connect() -> Result<Self, NetdevError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetdevError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Makes `addr/prefix` the only IPv4 address on the link: other IPv4
    /// addresses are removed first, and an already present `addr/prefix` is
    /// kept (so calling this again is not an error).
    pub async fn set_ipv4(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetdevError> {
        self.set_only_address(index, IpAddr::V4(addr), prefix).await
    }

    /// Makes `addr/prefix` the only global IPv6 address on the link (its
    /// link-local address stays), without duplicate address detection: the
    /// tun is point-to-point, and the address is usable at once.
    pub async fn set_ipv6(
        &self,
        index: u32,
        addr: Ipv6Addr,
        prefix: u8,
    ) -> Result<(), NetdevError> {
        self.set_only_address(index, IpAddr::V6(addr), prefix).await
    }

    /// Makes `addr/prefix` the only address of its family on the link
    /// (but IPv6 link-local ones); idempotent.
    async fn set_only_address(
        &self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetdevError> {
        let family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let mut present = false;
        for msg in self.addresses(index, family).await? {
            let local = local_address(&msg);
            if local.is_some_and(is_link_local) {
                continue;
            }
            if msg.header.prefix_len == prefix && local == Some(addr) {
                present = true;
            } else {
                self.del_address(index, msg).await?;
            }
        }
        if present {
            return Ok(());
        }
        let op = || format!("set address {addr}/{prefix}");
        let mut request = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let result = request.execute().await;
        ignore_errno(result, libc::EEXIST).map_err(|e| netlink_err(op(), index, e))
    }

    /// Sets the link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetdevError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        let result = self.handle.link().set(msg).execute().await;
        result.map_err(|e| netlink_err(format!("set mtu {mtu}"), index, e))
    }

    /// Brings the link up.
    pub async fn set_up(&self, index: u32) -> Result<(), NetdevError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        let result = self.handle.link().set(msg).execute().await;
        result.map_err(|e| netlink_err("set link up".to_owned(), index, e))
    }

    /// Adds a route to `dest` (IPv4 or IPv6) through the link (which must
    /// be up). A route that already exists is not an error.
    pub async fn add_route(&self, index: u32, dest: impl Into<IpNet>) -> Result<(), NetdevError> {
        let dest = dest.into().trunc();
        self.change_route(Change::Add, index, any_route_message(index, dest), dest)
            .await
    }

    /// Deletes the route to `dest` through the link. A missing route is not
    /// an error.
    pub async fn del_route(&self, index: u32, dest: impl Into<IpNet>) -> Result<(), NetdevError> {
        let dest = dest.into().trunc();
        self.change_route(Change::Delete, index, any_route_message(index, dest), dest)
            .await
    }

    /// Adds or deletes one route, idempotently: adding one that exists, or
    /// deleting one that is gone, is not an error.
    async fn change_route(
        &self,
        change: Change,
        index: u32,
        message: RouteMessage,
        dest: impl std::fmt::Display,
    ) -> Result<(), NetdevError> {
        let routes = self.handle.route();
        let (result, already, verb) = match change {
            Change::Add => (routes.add(message).execute().await, libc::EEXIST, "add"),
            Change::Delete => (routes.del(message).execute().await, libc::ESRCH, "delete"),
        };
        ignore_errno(result, already)
            .map_err(|e| netlink_err(format!("{verb} route {dest}"), index, e))
    }

    /// The unicast routes of the host's main table, IPv4 and IPv6.
    pub async fn host_routes(&self) -> Result<Vec<HostRoute>, NetdevError> {
        let mut routes = Vec::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let all: Vec<RouteMessage> = match self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
            {
                Ok(all) => all,
                // No IPv6 on this host: no IPv6 routes.
                Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => Vec::new(),
                Err(e) => return Err(netlink_err("list routes".to_owned(), 0, e)),
            };
            routes.extend(all.iter().filter_map(host_route));
        }
        Ok(routes)
    }

    /// Adds `route` (a pinned /32). Returns whether it was added: `false`
    /// if the host already had it, which is then not this helper's to delete.
    pub async fn add_host_route(&self, route: HostRoute) -> Result<bool, NetdevError> {
        let result = self
            .handle
            .route()
            .add(host_route_message(route))
            .execute()
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(netlink_err(
                format!("add route {}", describe_host_route(route)),
                route.index,
                e,
            )),
        }
    }

    /// Deletes `route`; one already gone is not an error.
    pub async fn del_host_route(&self, route: HostRoute) -> Result<(), NetdevError> {
        let result = self
            .handle
            .route()
            .del(host_route_message(route))
            .execute()
            .await;
        ignore_errno(result, libc::ESRCH).map_err(|e| {
            netlink_err(
                format!("delete route {}", describe_host_route(route)),
                route.index,
                e,
            )
        })
    }

    /// Every address of `family` on the link.
    async fn addresses(
        &self,
        index: u32,
        family: AddressFamily,
    ) -> Result<Vec<AddressMessage>, NetdevError> {
        let mut request = self.handle.address().get().set_link_index_filter(index);
        // Ask the kernel for one family; filter again in case it ignores that.
        request.message_mut().header.family = family;
        let all: Vec<AddressMessage> = request
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_err("list addresses".to_owned(), index, e))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.family == family)
            .collect())
    }

    /// Deletes one address. One already gone (e.g. a secondary removed along
    /// with its primary) is not an error.
    async fn del_address(&self, index: u32, msg: AddressMessage) -> Result<(), NetdevError> {
        let op = format!(
            "delete address {}/{}",
            local_address(&msg).map_or_else(|| "?".to_owned(), |a| a.to_string()),
            msg.header.prefix_len
        );
        let result = self.handle.address().del(msg).execute().await;
        ignore_errno(result, libc::EADDRNOTAVAIL).map_err(|e| netlink_err(op, index, e))
    }
}

/// The route message used both to add and to delete `dest` via `index`
/// (deletion only matches a route with the same scope, table and protocol).
/// Whether a route is added or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Add,
    Delete,
}

fn route_message(index: u32, dest: Ipv4Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest.network(), dest.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

/// The route message for `dest`, of either family, via `index`.
fn any_route_message(index: u32, dest: IpNet) -> RouteMessage {
    match dest {
        IpNet::V4(dest) => route_message(index, dest),
        IpNet::V6(dest) => route6_message(index, dest),
    }
}

/// The route message for an IPv6 `dest` via `index`.
fn route6_message(index: u32, dest: Ipv6Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(dest.network(), dest.prefix_len())
        .output_interface(index)
        .build()
}

/// The message that adds or deletes a pinned host route.
fn host_route_message(route: HostRoute) -> RouteMessage {
    match (route.destination, route.gateway) {
        (IpNet::V4(destination), gateway) => {
            let builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(destination.network(), destination.prefix_len())
                .output_interface(route.index);
            match gateway {
                Some(IpAddr::V4(gateway)) => builder.gateway(gateway).build(),
                _ => builder.scope(RouteScope::Link).build(),
            }
        }
        (IpNet::V6(destination), gateway) => {
            let builder = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(destination.network(), destination.prefix_len())
                .output_interface(route.index);
            match gateway {
                Some(IpAddr::V6(gateway)) => builder.gateway(gateway).build(),
                _ => builder.build(),
            }
        }
    }
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

/// The errno carried by a netlink error reply, if any.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// Turns a failure with errno `ok_errno` into success.
fn ignore_errno(
    result: Result<(), rtnetlink::Error>,
    ok_errno: i32,
) -> Result<(), rtnetlink::Error> {
    match result {
        Err(e) if errno(&e) == Some(ok_errno) => Ok(()),
        other => other,
    }
}

/// Wraps an rtnetlink error, turning a kernel error reply into its errno.
fn netlink_err(op: String, index: u32, err: rtnetlink::Error) -> NetdevError {
    let source = match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
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
}
