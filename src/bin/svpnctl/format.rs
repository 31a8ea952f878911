//! How svpnctl shows things: human units for tables, raw numbers and RFC 3339
//! times for JSON.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use simplevpn::proto;

/// "3m12s", "2h05m", "4d03h", "12s".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// "512 B", "1.2 KiB", "3.4 MiB", "1.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub fn time(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    (*ts).and_then(|t| SystemTime::try_from(t).ok())
}

/// How long ago `ts` was, as "3m12s", or "-" if unknown.
pub fn age(ts: &Option<prost_types::Timestamp>, now: SystemTime) -> String {
    time(ts)
        .and_then(|t| now.duration_since(t).ok())
        .map_or_else(|| "-".into(), human_duration)
}

pub fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    time(ts).map_or(Value::Null, |t| {
        Value::String(humantime::format_rfc3339_seconds(t).to_string())
    })
}

/// `s`, or "-" if it is empty.
pub fn or_dash(s: &str) -> String {
    match s.is_empty() {
        true => "-".to_string(),
        false => s.to_string(),
    }
}

/// `s` as a JSON string, or null if it is empty.
pub fn or_null(s: &str) -> Value {
    match s.is_empty() {
        true => Value::Null,
        false => Value::String(s.to_string()),
    }
}

pub fn dropped(p: &proto::Peer) -> u64 {
    p.dropped_spoofed + p.dropped_queue_full + p.dropped_unassigned + p.dropped_client_to_client
}

pub fn peer_json(p: &proto::Peer) -> Value {
    json!({
        "address": p.address,
        "address6": or_null(&p.address6),
        "remote": p.remote,
        "connected_since": rfc3339(&p.connected_since),
        "last_seen": rfc3339(&p.last_seen),
        "rx_bytes": p.rx_bytes,
        "tx_bytes": p.tx_bytes,
        "rx_packets": p.rx_packets,
        "tx_packets": p.tx_packets,
        "dropped_spoofed": p.dropped_spoofed,
        "dropped_queue_full": p.dropped_queue_full,
        "dropped_unassigned": p.dropped_unassigned,
        "dropped_client_to_client": p.dropped_client_to_client,
        "protocol": p.protocol().text(),
        "name": p.name,
        "key": or_null(&p.key),
        "routes": p.routes,
    })
}

/// An allowed key as JSON: where it comes from and whether it is connected.
pub fn allowed_json(p: &proto::AllowedPeer) -> Value {
    json!({
        "key": p.key,
        "name": or_null(&p.name),
        "address": or_null(&p.address),
        "address6": or_null(&p.address6),
        "routes": p.routes,
        "source": source_text(p.source()),
        "connected": !p.connected_address.is_empty(),
        "connected_address": or_null(&p.connected_address),
    })
}

pub fn source_text(source: proto::PeerSource) -> &'static str {
    match source {
        proto::PeerSource::Config => "config",
        proto::PeerSource::Live => "live",
        proto::PeerSource::Unspecified => "-",
    }
}

/// The allowed keys as a table.
pub fn allowed_table(peers: &[proto::AllowedPeer]) -> String {
    let dash = or_dash;
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                dash(&p.name),
                p.key.clone(),
                source_text(p.source()).to_string(),
                dash(&p.address),
                dash(&p.address6),
                list_or_dash(&p.routes),
                match p.connected_address.is_empty() {
                    true => "no".to_string(),
                    false => format!("yes ({})", p.connected_address),
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "KEY",
            "SOURCE",
            "ADDRESS",
            "ADDRESS6",
            "ROUTES",
            "CONNECTED",
        ],
        &rows,
    )
}

/// Rows of cells, left-aligned in columns two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

pub fn peers_table(peers: &[proto::Peer], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.address.clone(),
                or_dash(&p.name),
                or_dash(&p.address6),
                p.remote.clone(),
                age(&p.connected_since, now),
                format!("{} ago", age(&p.last_seen, now)),
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes),
                dropped(p).to_string(),
                list_or_dash(&p.routes),
            ]
        })
        .collect();
    table(
        &[
            "ADDRESS",
            "NAME",
            "ADDRESS6",
            "REMOTE",
            "CONNECTED",
            "LAST SEEN",
            "RX",
            "TX",
            "DROPPED",
            "ROUTES",
        ],
        &rows,
    )
}

/// Who a ban is on: "key KEY" or "remote ADDRESS".
fn banned(ban: &proto::Ban) -> String {
    match ban.key.is_empty() {
        false => format!("key {}", ban.key),
        true => format!("remote {}", ban.remote),
    }
}

pub fn bans_table(bans: &[proto::Ban], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = bans
        .iter()
        .map(|b| vec![banned(b), until(&b.until, now), or_dash(&b.reason)])
        .collect();
    table(&["BANNED", "UNTIL", "REASON"], &rows)
}

/// A time to come: RFC 3339 and how far from `now` ("-" if unset; "0s
/// from now" once past).
fn until(ts: &Option<prost_types::Timestamp>, now: SystemTime) -> String {
    match time(ts) {
        Some(t) => format!(
            "{} ({} from now)",
            humantime::format_rfc3339_seconds(t),
            humantime::format_duration(Duration::from_secs(
                t.duration_since(now).map_or(0, |d| d.as_secs())
            ))
        ),
        None => "-".into(),
    }
}

fn invite_state(i: &proto::Invite) -> &'static str {
    match i.state() {
        proto::InviteState::Open => "open",
        proto::InviteState::Used => "used",
        proto::InviteState::Revoked => "revoked",
        proto::InviteState::Expired => "expired",
        proto::InviteState::Unspecified => "unknown",
    }
}

pub fn invites_table(invites: &[proto::Invite], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = invites
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                or_dash(&i.address),
                invite_state(i).to_string(),
                until(&i.expires, now),
            ]
        })
        .collect();
    table(&["NAME", "ADDRESS", "STATE", "EXPIRES"], &rows)
}

pub fn invite_json(i: &proto::Invite) -> Value {
    json!({
        "name": i.name,
        "address": or_null(&i.address),
        "state": invite_state(i),
        "created": rfc3339(&i.created),
        "expires": rfc3339(&i.expires),
    })
}

pub fn ban_json(b: &proto::Ban) -> Value {
    json!({
        "key": or_null(&b.key),
        "remote": or_null(&b.remote),
        "until": rfc3339(&b.until),
        "reason": or_null(&b.reason),
    })
}

/// The items joined by ", ", or "-" for none.
pub fn list_or_dash(items: &[String]) -> String {
    match items.is_empty() {
        true => "-".to_string(),
        false => items.join(", "),
    }
}

/// "key  value" lines, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn peer_fields(p: &proto::Peer, now: SystemTime) -> String {
    let when = |ts: &Option<prost_types::Timestamp>| match time(ts) {
        Some(t) => format!(
            "{} ({} ago)",
            humantime::format_rfc3339_seconds(t),
            age(ts, now)
        ),
        None => "-".into(),
    };
    fields(&[
        ("address", p.address.clone()),
        ("address6", or_dash(&p.address6)),
        ("remote", p.remote.clone()),
        ("protocol", p.protocol().text().to_string()),
        (
            "name",
            if p.name.is_empty() {
                "-".into()
            } else {
                p.name.clone()
            },
        ),
        ("routes", list_or_dash(&p.routes)),
        ("connected", when(&p.connected_since)),
        ("last seen", when(&p.last_seen)),
        (
            "rx",
            format!("{} in {} packets", human_bytes(p.rx_bytes), p.rx_packets),
        ),
        (
            "tx",
            format!("{} in {} packets", human_bytes(p.tx_bytes), p.tx_packets),
        ),
        (
            "dropped",
            format!(
                "{} spoofed, {} queue full, {} before a grant, {} to another client (denied)",
                p.dropped_spoofed,
                p.dropped_queue_full,
                p.dropped_unassigned,
                p.dropped_client_to_client
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_duration(Duration::from_secs(12)), "12s");
        assert_eq!(human_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(human_duration(Duration::from_secs(7500)), "2h05m");
        assert_eq!(
            human_duration(Duration::from_secs(4 * 86400 + 3 * 3600)),
            "4d03h"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1258291), "1.2 MiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nwide cell  x\ny          z");
    }
}
