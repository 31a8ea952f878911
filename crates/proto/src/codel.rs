//! CoDel (RFC 8289) for a peer's send queue, sans-IO: the queue's writer
//! asks, for each frame it takes off the queue, with the current time and
//! the time the frame was queued, whether to send it, drop it, or send it
//! with its inner packet marked Congestion Experienced (ECN, RFC 3168).
//!
//! Bytes alone bound a queue badly: 4 MiB drains in 6 ms at 5 Gbit/s and in
//! 3 s at 10 Mbit/s. Time in queue does not depend on the rate. When frames
//! have waited longer than [`CODEL_TARGET`] for a whole [`CODEL_INTERVAL`],
//! the queue is standing (not a burst that drains by itself): one packet is
//! dropped (or marked, when its sender speaks ECN), and then more often, at
//! intervals shrinking with the square root of the count, until the time in
//! queue falls below the target. The inner TCP backs off instead of filling
//! the tunnel's queue, as with fq_codel on a router.
//!
//! Only IP packets are dropped or marked (plain packet frames and
//! super-packet frames); control messages, session parameters and other
//! extension frames always pass.

use std::time::{Duration, Instant};

use crate::limits::{CODEL_INTERVAL, CODEL_TARGET};
use crate::wire::{EXTENSION_FIRST_BYTE, SUPER_HEADER_LEN, SUPER_PACKET};

/// What to do with a frame taken off the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it as it is.
    Pass,
    /// Drop it, and judge the next one.
    Drop,
    /// Send it with its inner packet marked CE ([`mark_ce`]).
    Mark,
}

/// A frame just taken off the queue, as CoDel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// When it was queued.
    pub queued: Instant,
    /// Its length.
    pub len: usize,
    /// Bytes still queued behind it.
    pub backlog: usize,
    /// The ECN field of its packet ([`ecn_of_frame`]); `None`: not a
    /// packet (a control message, session parameters), never dropped.
    pub ecn: Option<Ecn>,
}

/// The state of one queue's CoDel.
#[derive(Debug, Clone)]
pub struct Codel {
    target: Duration,
    interval: Duration,
    /// The largest frame seen: a backlog of at most this is one frame
    /// being sent, not a standing queue.
    max_frame: usize,
    /// When the time in queue, above the target since, will have been so
    /// for an interval (`None`: below the target now).
    first_above: Option<Instant>,
    /// Dropping (or marking) at intervals shrinking with `count`.
    dropping: bool,
    /// When the next drop is due while dropping.
    drop_next: Option<Instant>,
    /// Drops since dropping began (carried over when it begins again soon).
    count: u32,
    /// `count` when the last dropping state began.
    last_count: u32,
}

impl Default for Codel {
    fn default() -> Self {
        Codel::new(CODEL_TARGET, CODEL_INTERVAL)
    }
}

impl Codel {
    pub fn new(target: Duration, interval: Duration) -> Codel {
        Codel {
            target,
            interval,
            max_frame: 0,
            first_above: None,
            dropping: false,
            drop_next: None,
            count: 0,
            last_count: 0,
        }
    }

    /// The queue was found empty: whatever stood has drained.
    pub fn empty(&mut self) {
        self.first_above = None;
        self.dropping = false;
    }

    /// The verdict on a frame taken off the queue at `now`. `Mark` only for
    /// an ECN-capable packet; a frame that is no packet always passes,
    /// though its time in queue counts.
    pub fn judge(&mut self, now: Instant, taken: Taken) -> Verdict {
        self.max_frame = self.max_frame.max(taken.len);
        let sojourn = now.saturating_duration_since(taken.queued);
        let ok_to_drop = self.ok_to_drop(now, sojourn, taken.backlog);
        let Some(ecn) = taken.ecn else {
            // Never dropped, and no drop spent on it.
            if !ok_to_drop {
                self.dropping = false;
            }
            return Verdict::Pass;
        };
        let drop = if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                false
            } else if self.drop_next.is_some_and(|next| now >= next) {
                self.count = self.count.saturating_add(1);
                let from = self.drop_next.unwrap_or(now);
                self.drop_next = Some(self.control_law(from));
                true
            } else {
                false
            }
        } else if ok_to_drop {
            self.dropping = true;
            // Dropping began again soon after it ended: go on at the rate it
            // had reached rather than from the start.
            let delta = self.count.saturating_sub(self.last_count);
            let recent = self
                .drop_next
                .is_some_and(|next| now.saturating_duration_since(next) < self.interval * 16);
            self.count = if delta > 1 && recent { delta } else { 1 };
            self.last_count = self.count;
            self.drop_next = Some(self.control_law(now));
            true
        } else {
            false
        };
        match (drop, ecn.capable()) {
            (false, _) => Verdict::Pass,
            (true, true) => Verdict::Mark,
            (true, false) => Verdict::Drop,
        }
    }

    /// Whether the time in queue has stood above the target for an
    /// interval; a backlog of at most one frame never counts.
    fn ok_to_drop(&mut self, now: Instant, sojourn: Duration, backlog: usize) -> bool {
        if sojourn < self.target || backlog <= self.max_frame {
            self.first_above = None;
            return false;
        }
        match self.first_above {
            None => {
                self.first_above = Some(now + self.interval);
                false
            }
            Some(at) => now >= at,
        }
    }

    /// When the next drop is due: `interval / sqrt(count)` after `from`.
    fn control_law(&self, from: Instant) -> Instant {
        from + self.interval.div_f64(f64::from(self.count.max(1)).sqrt())
    }
}

/// The ECN field of an IP header (RFC 3168).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecn {
    NotEct,
    Ect1,
    Ect0,
    Ce,
}

impl Ecn {
    fn from_bits(bits: u8) -> Ecn {
        match bits & 0b11 {
            0b00 => Ecn::NotEct,
            0b01 => Ecn::Ect1,
            0b10 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// Whether a router may mark the packet instead of dropping it.
    pub fn capable(self) -> bool {
        self != Ecn::NotEct
    }
}

/// Where the IP packet of a queued frame begins: 0 for a packet frame, 8
/// for a super-packet frame; `None` for anything else (a control message,
/// whose IPv4-like header has a total length of 0, or another extension
/// frame), which is never dropped.
pub fn packet_offset(frame: &[u8]) -> Option<usize> {
    let offset = match frame.first()? {
        &EXTENSION_FIRST_BYTE if frame.get(1) == Some(&SUPER_PACKET) => SUPER_HEADER_LEN,
        _ => 0,
    };
    let packet = frame.get(offset..)?;
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0F) * 4;
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            (ihl >= 20 && total >= ihl && packet.len() >= ihl).then_some(offset)
        }
        6 => (packet.len() >= 40).then_some(offset),
        _ => None,
    }
}

/// The ECN field of the packet in `frame`, if it holds one.
pub fn ecn_of_frame(frame: &[u8]) -> Option<Ecn> {
    let offset = packet_offset(frame)?;
    ecn(&frame[offset..])
}

/// The ECN field of an IPv4 or IPv6 packet.
pub fn ecn(packet: &[u8]) -> Option<Ecn> {
    match packet.first()? >> 4 {
        4 => Some(Ecn::from_bits(*packet.get(1)?)),
        6 => Some(Ecn::from_bits(*packet.get(1)? >> 4)),
        _ => None,
    }
}

/// Marks the packet in `frame` Congestion Experienced, as a router does:
/// the ECN bits of the IPv4 TOS byte (the header checksum updated, RFC
/// 1624) or of the IPv6 traffic class (which no checksum covers). Returns
/// false, changing nothing, for a frame without an ECN-capable packet.
pub fn mark_ce(frame: &mut [u8]) -> bool {
    let Some(offset) = packet_offset(frame) else {
        return false;
    };
    let packet = &mut frame[offset..];
    let capable = ecn(packet).is_some_and(Ecn::capable);
    if !capable {
        return false;
    }
    match packet[0] >> 4 {
        4 => {
            let old = u16::from_be_bytes([packet[0], packet[1]]);
            packet[1] |= 0b11;
            let new = u16::from_be_bytes([packet[0], packet[1]]);
            // HC' = ~(~HC + ~m + m') in one's complement arithmetic.
            let check = u16::from_be_bytes([packet[10], packet[11]]);
            let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
            while sum > 0xFFFF {
                sum = (sum & 0xFFFF) + (sum >> 16);
            }
            packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        }
        _ => packet[1] |= 0b11 << 4,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// An IPv4 UDP packet of `len` bytes with TOS `tos` and a valid header
    /// checksum.
    fn ipv4(len: usize, tos: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[1] = tos;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 1, 2]);
        p[16..20].copy_from_slice(&[198, 19, 0, 1]);
        let check = header_sum(&p[..20]);
        p[10..12].copy_from_slice(&(!check).to_be_bytes());
        p
    }

    /// The one's complement sum of a header (0xFFFF for a valid checksum).
    fn header_sum(header: &[u8]) -> u16 {
        let mut sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    fn ipv6(len: usize, traffic_class: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60 | traffic_class >> 4;
        p[1] = traffic_class << 4 | 0x0A;
        p[2] = 0xBC;
        p[3] = 0xDE;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = 17;
        p
    }

    const FRAME: usize = 1500;

    /// A 1500-byte packet taken at `now` after waiting `wait`, with
    /// `behind` such packets behind it.
    fn taken(now: Instant, wait: Duration, behind: usize, ecn: Option<Ecn>) -> Taken {
        Taken {
            queued: now - wait,
            len: FRAME,
            backlog: behind * FRAME,
            ecn,
        }
    }

    /// A queue that drains one packet a millisecond from `start`, each
    /// having waited `wait`, with 4 behind it: the verdicts on `frames`.
    fn run(
        codel: &mut Codel,
        start: Instant,
        frames: usize,
        wait: Duration,
        ect: bool,
    ) -> Vec<Verdict> {
        let ecn = Some(if ect { Ecn::Ect0 } else { Ecn::NotEct });
        (0..frames)
            .map(|i| {
                let now = start + MS * i as u32;
                codel.judge(now, taken(now, wait, 4, ecn))
            })
            .collect()
    }

    #[test]
    fn a_short_queue_passes_untouched() {
        let mut codel = Codel::new(MS, 100 * MS);
        let start = Instant::now();
        // Below the target for seconds: nothing dropped.
        let verdicts = run(&mut codel, start, 3000, MS / 2, false);
        assert!(verdicts.iter().all(|v| *v == Verdict::Pass));
        // Above the target, but with at most one frame behind: a burst
        // that drains by itself.
        let now = start + Duration::from_secs(10);
        for i in 0..300u32 {
            let at = now + MS * i;
            let one = taken(at, 50 * MS, 1, Some(Ecn::NotEct));
            assert_eq!(codel.judge(at, one), Verdict::Pass);
        }
    }

    #[test]
    fn packets_that_wait_longer_than_the_target_for_an_interval_are_dropped() {
        let mut codel = Codel::new(MS, 100 * MS);
        let start = Instant::now();
        // 300 ms of frames that each waited 5 ms, one taken every 1 ms.
        let verdicts = run(&mut codel, start, 300, 5 * MS, false);
        let drops: Vec<usize> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| **v == Verdict::Drop)
            .map(|(i, _)| i)
            .collect();
        // Nothing within the first interval; the first drop right after it,
        // then an interval later, then at interval / sqrt(count): + 70.7 ms.
        assert_eq!(drops, [100, 200, 271]);
        assert!(verdicts.iter().all(|v| *v != Verdict::Mark));
        // Back below the target: dropping ends at once.
        let now = start + 300 * MS;
        let short = taken(now, MS / 2, 4, Some(Ecn::NotEct));
        assert_eq!(codel.judge(now, short), Verdict::Pass);
        assert!(!codel.dropping);
    }

    #[test]
    fn ecn_capable_packets_are_marked_instead_and_other_frames_pass() {
        let mut codel = Codel::new(MS, 100 * MS);
        let start = Instant::now();
        let verdicts = run(&mut codel, start, 200, 5 * MS, true);
        assert_eq!(verdicts[100], Verdict::Mark);
        assert!(verdicts.iter().all(|v| *v != Verdict::Drop));
        // A control message due for a drop passes; the next packet due is
        // dropped on the law's schedule.
        let mut codel = Codel::new(MS, 100 * MS);
        run(&mut codel, start, 100, 5 * MS, false);
        let at = start + 100 * MS;
        assert_eq!(codel.judge(at, taken(at, 5 * MS, 4, None)), Verdict::Pass);
        let next = at + MS;
        let packet = taken(next, 5 * MS, 4, Some(Ecn::NotEct));
        assert_eq!(codel.judge(next, packet), Verdict::Drop);
    }

    #[test]
    fn an_emptied_queue_starts_over() {
        let mut codel = Codel::new(MS, 100 * MS);
        let start = Instant::now();
        run(&mut codel, start, 99, 5 * MS, false);
        codel.empty();
        // The interval starts again from the first frame above the target.
        let later = start + 100 * MS;
        let verdicts = run(&mut codel, later, 100, 5 * MS, false);
        assert!(verdicts.iter().all(|v| *v == Verdict::Pass));
    }

    #[test]
    fn which_frames_hold_packets() {
        let packet = ipv4(100, 0);
        assert_eq!(packet_offset(&packet), Some(0));
        assert_eq!(packet_offset(&ipv6(60, 0)), Some(0));
        let mut sup = crate::wire::SuperPacket::header(crate::offload::Gso {
            kind: crate::offload::GsoKind::Udp,
            size: 1400,
        })
        .to_vec();
        sup.extend_from_slice(&packet);
        assert_eq!(packet_offset(&sup), Some(SUPER_HEADER_LEN));
        // A control message (total length 0), a FEATURES frame, garbage.
        let keepalive = crate::wire::Control::KEEPALIVE.encode();
        assert_eq!(packet_offset(&keepalive), None);
        assert_eq!(packet_offset(&crate::wire::Features(2).encode()), None);
        assert_eq!(packet_offset(&[]), None);
        assert_eq!(packet_offset(&[0x45, 0]), None);
        assert_eq!(packet_offset(&[0x60; 39]), None);
    }

    #[test]
    fn ecn_marking_rewrites_the_tos_with_a_valid_checksum() {
        for (tos, marked) in [
            (0x02, 0x03),
            (0x01, 0x03),
            (0xB8 | 0x02, 0xBB),
            (0x03, 0x03),
        ] {
            let mut p = ipv4(100, tos);
            assert_eq!(header_sum(&p[..20]), 0xFFFF);
            assert!(ecn(&p).is_some_and(Ecn::capable));
            let body = p[20..].to_vec();
            assert!(mark_ce(&mut p));
            assert_eq!(p[1], marked, "tos {tos:#x}");
            assert_eq!(ecn(&p), Some(Ecn::Ce));
            assert_eq!(header_sum(&p[..20]), 0xFFFF, "tos {tos:#x}");
            assert_eq!(p[20..], body[..]);
        }
        // Not ECN-capable: unchanged.
        let mut p = ipv4(100, 0xB8);
        let before = p.clone();
        assert!(!mark_ce(&mut p));
        assert_eq!(p, before);
        // Inside a super-packet frame.
        let mut frame = crate::wire::SuperPacket::header(crate::offload::Gso {
            kind: crate::offload::GsoKind::TcpV4,
            size: 1448,
        })
        .to_vec();
        frame.extend_from_slice(&ipv4(3000, 0x02));
        assert_eq!(ecn_of_frame(&frame), Some(Ecn::Ect0));
        assert!(mark_ce(&mut frame));
        assert_eq!(ecn_of_frame(&frame), Some(Ecn::Ce));
        assert_eq!(header_sum(&frame[8..28]), 0xFFFF);
    }

    #[test]
    fn ecn_marking_rewrites_the_ipv6_traffic_class_only() {
        let mut p = ipv6(80, 0xB8 | 0x01);
        assert_eq!(ecn(&p), Some(Ecn::Ect1));
        let before = p.clone();
        assert!(mark_ce(&mut p));
        assert_eq!(ecn(&p), Some(Ecn::Ce));
        // DSCP, version and flow label as they were.
        let tc = |p: &[u8]| (p[0] & 0x0F) << 4 | p[1] >> 4;
        assert_eq!(tc(&p), 0xBB);
        assert_eq!((p[0] >> 4, p[1] & 0x0F, &p[2..]), (6, 0x0A, &before[2..]));
        let mut not_ect = ipv6(80, 0xB8);
        assert!(!mark_ce(&mut not_ect));
        assert_eq!(ecn(&not_ect), Some(Ecn::NotEct));
    }
}
