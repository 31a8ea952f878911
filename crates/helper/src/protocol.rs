//! The requests simplevpnd may send to simplevpn-helper, and the answers.
//!
//! The set is closed: these requests are everything the unprivileged
//! daemon can ask of the privileged side. One message is one frame: a `u32`
//! big-endian length followed by that many bytes of JSON (serde). The codec is
//! sans-IO; [`super::channel`] moves frames (and the tun fd) over the socket.
//!
//! Decided field rules: every field of every message is required, and a
//! field the types do not name is refused (`deny_unknown_fields`), with
//! the exceptions listed in [`DEFAULTED_FIELDS`]: a message lacking one of
//! those is accepted with the field's default, and re-encodes with the
//! default written out (so the frame grows by it). Values re-encode in
//! their canonical text: an address spelled otherwise decodes to the same
//! value (an IPv6 "::" for a single zero group re-encodes as ":0:", one
//! byte longer). A unit test checks that
//! the list is complete (dropping any other field is refused), and the
//! `helper_request` fuzz target holds the codec to it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest frame either side sends or accepts, length prefix included. Every
/// valid message is far smaller; anything longer is a protocol error.
pub const MAX_FRAME: usize = 16384;
/// Bytes of the length prefix.
const PREFIX_LEN: usize = 4;

/// The fields a message may lack, each with the default it then gets, as
/// JSON: (the variant, the field, its default). Every other field is
/// required.
///
/// - `Tun`'s `offloads`: a helper older than TUN offloads does not send
///   it; its tun has none (`Offloads::NONE`).
pub const DEFAULTED_FIELDS: &[(&str, &str, &str)] = &[(
    "Tun",
    "offloads",
    r#"{"vnet_hdr":false,"tso":false,"uso":false}"#,
)];

/// What the daemon asks of the helper. Every request but `OpenTun` names the
/// interface by ifindex, which must be the one the helper created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HelperRequest {
    /// Create the tun (named in the helper's own configuration) and send its
    /// fd back. Allowed once.
    OpenTun,
    /// Make `address/prefix` the only IPv4 address of the interface.
    SetAddress {
        index: u32,
        address: Ipv4Addr,
        prefix: u8,
    },
    /// Make `address/prefix` the only global IPv6 address of the interface
    /// (IPv6 inside the tunnel; no duplicate address detection: the tun is
    /// point-to-point).
    SetAddress6 {
        index: u32,
        address: Ipv6Addr,
        prefix: u8,
    },
    /// Set the interface's MTU.
    SetMtu { index: u32, mtu: u32 },
    /// Bring the interface up.
    LinkUp { index: u32 },
    /// Add a route to `destination` (IPv4 or IPv6) through the interface.
    AddRoute { index: u32, destination: IpNet },
    /// Delete the route to `destination` through the interface.
    DelRoute { index: u32, destination: IpNet },
    /// Server: NAT (masquerade) the helper's own `--network` when it leaves
    /// by any interface but the tun, in an nftables table of the helper's
    /// own. Allowed once, to a helper started with `--masquerade`.
    Masquerade { index: u32 },
    /// Server: is IPv4 forwarding on? A helper started with `--forwarding`
    /// turns it on if not.
    CheckForwarding,
    /// Server with `--network6`: is IPv6 forwarding on
    /// (`net.ipv6.conf.all.forwarding`)? As [`HelperRequest::CheckForwarding`].
    CheckForwarding6,
    /// Client: full tunnel. The helper pins the host's current route to
    /// `server` as a /32 (same gateway, same interface), then routes
    /// 0.0.0.0/1 and 128.0.0.0/1, and IPv6 ::/1 and 8000::/1, into the tun.
    /// Only for a helper started with `--full-tunnel`.
    FullTunnel { index: u32, server: IpAddr },
    /// Client: undoes [`HelperRequest::FullTunnel`].
    EndFullTunnel { index: u32 },
    /// Client: the server's address this client is connected to now (sent
    /// after each connect). From then on the helper refuses any route that
    /// covers it: the tunnel would carry itself.
    Underlay { index: u32, server: IpAddr },
    /// Client: the tun's DNS servers and search domains, through
    /// systemd-resolved; with `default_route`, the "~." routing domain too
    /// (every name is resolved through the tun). Only for a helper started
    /// with `--dns`.
    SetDns {
        index: u32,
        servers: Vec<IpAddr>,
        domains: Vec<String>,
        default_route: bool,
    },
    /// Client: reverts the tun's DNS settings (systemd-resolved's RevertLink).
    RevertDns { index: u32 },
}

/// Whether IPv4 forwarding is on, as [`HelperRequest::CheckForwarding`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarding {
    /// It was on.
    On,
    /// It was off, and the helper turned it on (`--forwarding`).
    TurnedOn,
    /// It is off.
    Off,
}

/// The helper's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HelperResponse {
    /// Done.
    Ok,
    /// The tun was created; its fds (one per queue, the first queue first)
    /// travel with this message (`SCM_RIGHTS`).
    Tun {
        name: String,
        index: u32,
        /// What the kernel granted (none from an older helper: a `Tun`
        /// answer without it is accepted, see [`DEFAULTED_FIELDS`]).
        #[serde(default)]
        offloads: Offloads,
    },
    /// Not allowed by the helper's policy; nothing was done.
    Refused(String),
    /// Allowed, but the kernel said no.
    Failed(String),
    /// Done; these are the changes made to the host beyond the tun, one
    /// phrase each ("route 198.18.1.1/32 via 198.18.0.1 dev eth0").
    Changed(Vec<String>),
    /// The answer to [`HelperRequest::CheckForwarding`].
    Forwarding(Forwarding),
}

/// A tun device and its fd: what the helper creates
/// ([`super::netdev::create_tun`]), and what the daemon holds once the
/// answer [`HelperResponse::Tun`] and its fd have arrived.
#[derive(Debug)]
pub struct TunFd {
    /// The tun fd (`O_NONBLOCK | O_CLOEXEC`), its first queue. The device
    /// disappears when the last fd referring to it is closed.
    pub fd: OwnedFd,
    /// Its further queues, on a tun opened with `IFF_MULTI_QUEUE` (a
    /// server's, one queue per worker); empty for a one-queue tun. The
    /// kernel spreads packets for the daemon over the queues by flow.
    pub more_queues: Vec<OwnedFd>,
    /// The name the kernel gave the device.
    pub name: String,
    /// The device's ifindex, which every later request names.
    pub index: u32,
    /// Which TUN offloads it was opened with.
    pub offloads: Offloads,
}

/// The TUN offloads of a tun, as the helper got them from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offloads {
    /// Opened with `IFF_VNET_HDR`: a 10-byte virtio-net header before every
    /// packet read or written ([`simplevpn_proto::offload::VirtioNetHdr`]).
    pub vnet_hdr: bool,
    /// Checksum offload and TSO for IPv4 and IPv6: reads and writes may be
    /// TCP super-packets.
    pub tso: bool,
    /// UDP segmentation (USO): reads and writes may be UDP super-packets.
    pub uso: bool,
}

impl Offloads {
    /// A plain tun.
    pub const NONE: Offloads = Offloads {
        vnet_hdr: false,
        tso: false,
        uso: false,
    };
    /// The header, but the kernel refused every offload.
    pub const HEADER_ONLY: Offloads = Offloads {
        vnet_hdr: true,
        tso: false,
        uso: false,
    };
    /// Checksum offload and TSO.
    pub const TSO: Offloads = Offloads {
        vnet_hdr: true,
        tso: true,
        uso: false,
    };
    /// Checksum offload, TSO and USO.
    pub const TSO_USO: Offloads = Offloads {
        vnet_hdr: true,
        tso: true,
        uso: true,
    };
}

impl fmt::Display for HelperRequest {
    /// What the request does, as a phrase: "set address 198.19.0.1/16 on ifindex 7".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelperRequest::OpenTun => f.write_str("open the tun"),
            HelperRequest::SetAddress {
                index,
                address,
                prefix,
            } => write!(f, "set address {address}/{prefix} on ifindex {index}"),
            HelperRequest::SetAddress6 {
                index,
                address,
                prefix,
            } => write!(f, "set IPv6 address {address}/{prefix} on ifindex {index}"),
            HelperRequest::SetMtu { index, mtu } => write!(f, "set MTU {mtu} on ifindex {index}"),
            HelperRequest::LinkUp { index } => write!(f, "bring up ifindex {index}"),
            HelperRequest::AddRoute { index, destination } => {
                write!(f, "add route {destination} via ifindex {index}")
            }
            HelperRequest::DelRoute { index, destination } => {
                write!(f, "delete route {destination} via ifindex {index}")
            }
            HelperRequest::Masquerade { index } => {
                write!(
                    f,
                    "masquerade traffic leaving by any interface but ifindex {index}"
                )
            }
            HelperRequest::CheckForwarding => f.write_str("check IPv4 forwarding"),
            HelperRequest::CheckForwarding6 => f.write_str("check IPv6 forwarding"),
            HelperRequest::FullTunnel { index, server } => {
                write!(f, "route everything but {server} into ifindex {index}")
            }
            HelperRequest::EndFullTunnel { index } => {
                write!(f, "end the full tunnel on ifindex {index}")
            }
            HelperRequest::Underlay { index, server } => {
                write!(f, "keep {server} (the server) out of ifindex {index}")
            }
            HelperRequest::SetDns {
                index,
                servers,
                domains,
                default_route,
            } => {
                let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "set DNS {} (search {}{}) on ifindex {index}",
                    servers.join(", "),
                    domains.join(", "),
                    if *default_route { "; ~." } else { "" }
                )
            }
            HelperRequest::RevertDns { index } => write!(f, "revert DNS on ifindex {index}"),
        }
    }
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLong(usize),
    #[error("frame of {0} bytes is shorter than its length prefix")]
    Short(usize),
    #[error("frame declares {declared} bytes of payload but carries {actual}")]
    Length { declared: usize, actual: usize },
    #[error("bad message: {0}")]
    Json(#[from] serde_json::Error),
}

/// One message as a frame: length prefix, then JSON.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(message)?;
    let total = PREFIX_LEN + json.len();
    if total > MAX_FRAME {
        return Err(FrameError::TooLong(total));
    }
    let mut frame = Vec::with_capacity(total);
    // total <= MAX_FRAME, so the payload length fits in a u32.
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// The message in one whole frame (as one `SOCK_SEQPACKET` message delivers
/// it). The length prefix must match the frame exactly.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLong(frame.len()));
    }
    let (prefix, payload) = frame
        .split_first_chunk::<PREFIX_LEN>()
        .ok_or(FrameError::Short(frame.len()))?;
    let declared = u32::from_be_bytes(*prefix) as usize;
    if declared != payload.len() {
        return Err(FrameError::Length {
            declared,
            actual: payload.len(),
        });
    }
    Ok(serde_json::from_slice(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<HelperRequest> {
        let net: IpNet = "198.19.0.0/16".parse().expect("net");
        vec![
            HelperRequest::OpenTun,
            HelperRequest::SetAddress {
                index: 7,
                address: Ipv4Addr::new(198, 19, 0, 1),
                prefix: 16,
            },
            HelperRequest::SetAddress6 {
                index: 7,
                address: "2001:2:0:100::1".parse().expect("v6"),
                prefix: 64,
            },
            HelperRequest::AddRoute {
                index: 7,
                destination: "2001:2:0:200::/64".parse().expect("net"),
            },
            HelperRequest::SetMtu {
                index: 7,
                mtu: 1500,
            },
            HelperRequest::LinkUp { index: 7 },
            HelperRequest::AddRoute {
                index: 7,
                destination: net,
            },
            HelperRequest::DelRoute {
                index: 7,
                destination: net,
            },
            HelperRequest::Masquerade { index: 7 },
            HelperRequest::CheckForwarding,
            HelperRequest::CheckForwarding6,
            HelperRequest::FullTunnel {
                index: 7,
                server: Ipv4Addr::new(198, 18, 1, 1).into(),
            },
            HelperRequest::EndFullTunnel { index: 7 },
            HelperRequest::SetDns {
                index: 7,
                servers: vec![IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))],
                domains: vec!["vpn.example".into()],
                default_route: true,
            },
            HelperRequest::RevertDns { index: 7 },
        ]
    }

    fn all_responses() -> Vec<HelperResponse> {
        vec![
            HelperResponse::Ok,
            HelperResponse::Tun {
                name: "svpn0".into(),
                index: 7,
                offloads: Offloads::TSO,
            },
            HelperResponse::Refused("no".into()),
            HelperResponse::Failed("EPERM".into()),
            HelperResponse::Changed(vec!["route 198.18.1.1/32 dev eth0".into()]),
            HelperResponse::Forwarding(Forwarding::TurnedOn),
        ]
    }

    /// Every message with one field of its variant taken out of the JSON,
    /// decoded as its own type: (variant, field, what decoding gave, as
    /// JSON).
    fn without_each_field<T: Serialize + DeserializeOwned>(
        message: &T,
    ) -> Vec<(String, String, Result<serde_json::Value, FrameError>)> {
        let value = serde_json::to_value(message).expect("to JSON");
        let Some((variant, fields)) = value
            .as_object()
            .and_then(|o| o.iter().next())
            .and_then(|(v, f)| Some((v.clone(), f.as_object()?.clone())))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for field in fields.keys() {
            let mut less = fields.clone();
            less.remove(field);
            let payload =
                serde_json::to_vec(&serde_json::json!({ variant.clone(): less })).expect("JSON");
            let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&payload);
            let decoded = decode::<T>(&frame).map(|m| serde_json::to_value(m).expect("JSON"));
            out.push((variant.clone(), field.clone(), decoded));
        }
        out
    }

    #[test]
    fn only_the_listed_fields_may_be_missing_and_they_get_their_default() {
        let mut defaulted = 0;
        let requests = all_requests();
        let responses = all_responses();
        let cases = requests
            .iter()
            .flat_map(without_each_field)
            .chain(responses.iter().flat_map(without_each_field));
        for (variant, field, result) in cases {
            match DEFAULTED_FIELDS
                .iter()
                .find(|(v, f, _)| *v == variant && *f == field)
            {
                Some((_, _, default)) => {
                    let value = result.unwrap_or_else(|e| panic!("{variant}.{field}: {e}"));
                    let want: serde_json::Value = serde_json::from_str(default).expect("JSON");
                    assert_eq!(value[&variant][&field], want, "{variant}.{field}");
                    defaulted += 1;
                }
                None => assert!(result.is_err(), "{variant} without {field} decodes"),
            }
        }
        assert_eq!(
            defaulted,
            DEFAULTED_FIELDS.len(),
            "a listed field is never missed"
        );
        // Tun's default is a plain tun.
        let tun: Offloads = serde_json::from_str(DEFAULTED_FIELDS[0].2).expect("offloads");
        assert_eq!(tun, Offloads::NONE);
    }

    #[test]
    fn an_older_helpers_tun_answer_gets_no_offloads_and_grows_by_them() {
        // The helper_request fuzz target's crash on its own seed: this
        // 38-byte frame decodes (the field has a default) and re-encodes
        // to 92 bytes; the target allows for the defaults it fills in.
        let json = br#"{"Tun":{"name":"svpn0","index":7}}"#;
        let frame = [&(json.len() as u32).to_be_bytes()[..], json].concat();
        assert_eq!(frame.len(), 38);
        let response = decode::<HelperResponse>(&frame).expect("an older helper's answer");
        assert_eq!(
            response,
            HelperResponse::Tun {
                name: "svpn0".into(),
                index: 7,
                offloads: Offloads::NONE
            }
        );
        let again = encode(&response).expect("encode");
        let default = DEFAULTED_FIELDS[0].2;
        assert_eq!(again.len(), 38 + r#","offloads":"#.len() + default.len());
        assert_eq!(again.len(), 92);
    }

    #[test]
    fn addresses_re_encode_canonically_one_byte_longer_at_most() {
        // The helper_request fuzz target's find: "::" standing for a single
        // zero group is accepted and re-encodes as ":0:" (RFC 5952), one
        // byte longer; the target allows a byte per "::".
        let json = br#"{"DelRoute":{"index":7,"destination":"6040:0:2001:2:0:20::1/64"}}"#;
        let frame = [&(json.len() as u32).to_be_bytes()[..], json].concat();
        let request = decode::<HelperRequest>(&frame).expect("a valid route");
        let again = encode(&request).expect("encode");
        assert_eq!(again.len(), frame.len() + 1);
        assert!(again.ends_with(br#""6040:0:2001:2:0:20:0:1/64"}}"#));
        assert_eq!(decode::<HelperRequest>(&again).expect("decode"), request);
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for request in all_requests() {
            let frame = encode(&request).expect("encode");
            assert_eq!(decode::<HelperRequest>(&frame).expect("decode"), request);
        }
        for response in all_responses() {
            let frame = encode(&response).expect("encode");
            assert_eq!(decode::<HelperResponse>(&frame).expect("decode"), response);
        }
    }

    #[test]
    fn the_largest_dns_request_fits_in_a_frame() {
        use crate::params::{MAX_DNS, MAX_DNS_SEARCH, MAX_DOMAIN_LEN};
        let request = HelperRequest::SetDns {
            index: u32::MAX,
            servers: vec![
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                    .parse()
                    .expect("ip");
                MAX_DNS
            ],
            domains: vec!["a".repeat(MAX_DOMAIN_LEN); MAX_DNS_SEARCH],
            default_route: true,
        };
        assert!(encode(&request).is_ok());
    }

    #[test]
    fn the_frame_is_a_big_endian_length_then_json() {
        let frame = encode(&HelperRequest::LinkUp { index: 3 }).expect("encode");
        let json = br#"{"LinkUp":{"index":3}}"#;
        assert_eq!(&frame[..4], &(json.len() as u32).to_be_bytes());
        assert_eq!(&frame[4..], json);
    }

    #[test]
    fn bad_frames_are_errors() {
        let good = encode(&HelperRequest::OpenTun).expect("encode");
        assert!(matches!(
            decode::<HelperRequest>(&good[..3]),
            Err(FrameError::Short(3))
        ));
        assert!(matches!(
            decode::<HelperRequest>(&good[..good.len() - 1]),
            Err(FrameError::Length { .. })
        ));
        let mut unknown = br#"{"RunShell":{"command":"sh"}}"#.to_vec();
        unknown.splice(0..0, (unknown.len() as u32).to_be_bytes());
        assert!(matches!(
            decode::<HelperRequest>(&unknown),
            Err(FrameError::Json(_))
        ));
        let mut extra = br#"{"LinkUp":{"index":3,"name":"eth0"}}"#.to_vec();
        extra.splice(0..0, (extra.len() as u32).to_be_bytes());
        assert!(matches!(
            decode::<HelperRequest>(&extra),
            Err(FrameError::Json(_))
        ));
        assert!(matches!(
            decode::<HelperRequest>(&vec![0; MAX_FRAME + 1]),
            Err(FrameError::TooLong(_))
        ));
    }
}
