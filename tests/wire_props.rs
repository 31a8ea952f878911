//! Property tests of the sans-IO codec: any stream of valid frames, cut into
//! any pieces, decodes to the same frames; arbitrary bytes never panic.

use std::net::Ipv4Addr;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use simplevpn::wire::{Control, Decoder, Frame, DEFAULT_MAX_FRAME};

/// A valid frame and its bytes on the wire.
fn frame() -> impl Strategy<Value = (Frame, Vec<u8>)> {
    let control = (any::<u32>(), any::<u32>()).prop_map(|(s, d)| {
        let c = Control {
            source: Ipv4Addr::from(s),
            destination: Ipv4Addr::from(d),
        };
        (Frame::Control(c), c.encode().to_vec())
    });
    let v4 = (prop::collection::vec(any::<u8>(), 20..2000), 0u8..16).prop_map(|(mut p, low)| {
        let len = p.len() as u16;
        p[0] = 0x40 | low;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        (Frame::Packet(Bytes::from(p.clone())), p)
    });
    let v6 = prop::collection::vec(any::<u8>(), 40..2000).prop_map(|mut p| {
        let payload = (p.len() - 40) as u16;
        p[0] = 0x60 | (p[0] & 0x0f);
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        (Frame::Packet(Bytes::from(p.clone())), p)
    });
    prop_oneof![control, v4, v6]
}

proptest! {
    #[test]
    fn frames_survive_any_split(
        frames in prop::collection::vec(frame(), 1..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(_, b)| b.clone()).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();

        let decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in points {
            buf.extend_from_slice(&stream[from..to]);
            from = to;
            while let Some(frame) = decoder.decode(&mut buf).expect("valid stream") {
                got.push(frame);
            }
        }
        let want: Vec<Frame> = frames.into_iter().map(|(f, _)| f).collect();
        prop_assert_eq!(got, want);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), max in 20usize..=DEFAULT_MAX_FRAME) {
        let decoder = Decoder::new(max);
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        let mut consumed = 0;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Control(_))) => consumed += 20,
                Ok(Some(Frame::Packet(p))) => {
                    prop_assert!(p.len() <= max);
                    consumed += p.len();
                }
                Ok(None) | Err(_) => break,
            }
            prop_assert_eq!(before - buf.len(), consumed);
        }
    }
}
