//! The wire decoder (`simplevpn_proto::wire::Decoder`) on arbitrary bytes, cut into
//! arbitrary pieces as TCP may deliver them, with and without extensions.
//!
//! Input: byte 0 chooses the pieces (0: the whole stream at once; n: pieces
//! of 1..=n bytes, sizes from a PRNG seeded by n), byte 1 the decoder's
//! maximum frame length; the rest is the stream.
//!
//! Checked, besides "never panics":
//! - `decode` agrees with `frame_len`: the same error, `Ok(None)` leaving the
//!   buffer untouched while fewer bytes than the frame are there, and a frame
//!   that takes exactly `frame_len` bytes off the front, never more than the
//!   maximum;
//! - a packet, and a super-packet frame, is those bytes unchanged; a
//!   super-packet's header is exactly what `SuperPacket::header` writes for
//!   its metadata (every header field is checked or carried: none is
//!   accepted and then dropped) and its segment size is at least the
//!   minimum (`Gso::fits_wire`); an extension frame re-encodes to
//!   them exactly (and only comes from a decoder with extensions); a control
//!   message is 20 bytes, re-encodes to the same version, length and
//!   addresses (the bytes receivers ignore become the template's), to the
//!   same 20 bytes when the input had the template's, and decodes back to
//!   itself;
//! - the frames and the error do not depend on how the stream was cut.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use simplevpn_proto::wire::{
    Control, Decoder, Extension, Frame, ProtocolError, SuperPacket, CONTROL_LEN, DEFAULT_MAX_FRAME,
    EXTENSION_FIRST_BYTE, SUPER_HEADER_LEN, SUPER_PACKET,
};

/// Maximum frame lengths to try: below the control length (the decoder
/// raises it to 20), a small MTU, the usual one, the default, beyond u16.
const MAX_FRAMES: [usize; 5] = [0, 64, 1500, DEFAULT_MAX_FRAME, 70_000];

/// What decoding a whole stream gives: the frames, the error that ended it
/// (if any), and the bytes left over when there was none (after an error,
/// the bytes in the buffer depend on how many had arrived).
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<ProtocolError>,
    rest: Option<Vec<u8>>,
}

fuzz_target!(|data: &[u8]| {
    let [split, max_choice, stream @ ..] = data else {
        return;
    };
    let max = MAX_FRAMES[usize::from(*max_choice) % MAX_FRAMES.len()];
    // Decoder::new raises a maximum below the control length to it.
    let limit = max.max(CONTROL_LEN);
    for decoder in [Decoder::new(max), Decoder::new(max).with_extensions()] {
        let whole = run(&decoder, limit, stream, &[stream.len()]);
        let cuts = pieces(*split, stream.len());
        let split = run(&decoder, limit, stream, &cuts);
        assert_eq!(whole, split, "the outcome depends on the split {cuts:?}");
    }
});

/// Piece sizes that add up to `len`: one piece for seed 0, else sizes in
/// 1..=seed from a xorshift PRNG.
fn pieces(seed: u8, len: usize) -> Vec<usize> {
    if seed == 0 {
        return vec![len];
    }
    let mut state = u32::from(seed).wrapping_mul(0x9e37_79b9) | 1;
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state % u32::from(seed)) as usize + 1;
        let size = size.min(left);
        out.push(size);
        left -= size;
    }
    out
}

/// Feeds `stream` to `decoder` in pieces of the given sizes, decoding all it
/// can after each, as a connection does; stops at the first error (which
/// closes a connection).
fn run(decoder: &Decoder, limit: usize, stream: &[u8], pieces: &[usize]) -> Outcome {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut from = 0;
    for &size in pieces {
        buf.extend_from_slice(&stream[from..from + size]);
        from += size;
        loop {
            match decode_checked(decoder, limit, &mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    // Error messages are logged: they must not panic either.
                    let _ = error.to_string();
                    return Outcome {
                        frames,
                        error: Some(error),
                        rest: None,
                    };
                }
            }
        }
    }
    Outcome {
        frames,
        error: None,
        rest: Some(buf.to_vec()),
    }
}

/// One `decode`, checked against `frame_len` and the bytes it consumed.
fn decode_checked(
    decoder: &Decoder,
    limit: usize,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, ProtocolError> {
    let before = buf.clone();
    let len = decoder.frame_len(&before);
    let decoded = decoder.decode(buf);
    let len = match len {
        Err(error) => {
            assert_eq!(decoded, Err(error), "decode and frame_len disagree");
            return decoded;
        }
        Ok(None) => {
            assert_eq!(decoded, Ok(None), "decode without a length");
            assert_eq!(*buf, before, "Ok(None) consumed bytes");
            return decoded;
        }
        Ok(Some(len)) => len,
    };
    // A super-packet frame is its 8-byte header and a packet of at most
    // the maximum.
    let super_header = if before.get(1) == Some(&SUPER_PACKET) && before[0] == EXTENSION_FIRST_BYTE
    {
        SUPER_HEADER_LEN
    } else {
        0
    };
    assert!(
        len <= limit + super_header,
        "frame of {len} bytes above the maximum"
    );
    if before.len() < len {
        assert_eq!(
            decoded,
            Ok(None),
            "a frame out of {} < {len} bytes",
            before.len()
        );
        assert_eq!(*buf, before, "Ok(None) consumed bytes");
        return decoded;
    }
    let frame = match decoded {
        Ok(Some(frame)) => frame,
        other => panic!(
            "{len} of {} bytes there, but decode said {other:?}",
            before.len()
        ),
    };
    assert_eq!(
        before.len() - buf.len(),
        len,
        "consumed other than frame_len"
    );
    assert_eq!(
        &before[len..],
        &buf[..],
        "the bytes after the frame changed"
    );
    let bytes = &before[..len];
    match &frame {
        Frame::Packet(packet) => {
            assert_eq!(&packet[..], bytes, "a packet is not its bytes");
            assert!(
                matches!(bytes[0] >> 4, 4 | 6),
                "a packet of version {}",
                bytes[0] >> 4
            );
            assert!(
                bytes[0] >> 4 != 4 || bytes[2..4] != [0, 0],
                "a control as a packet"
            );
        }
        Frame::Control(control) => check_control(control, bytes),
        Frame::Super(packet) => {
            assert!(decoder.extensions(), "a super-packet with extensions off");
            assert_eq!(&packet.frame[..], bytes, "a super-packet is not its bytes");
            assert_eq!(
                &bytes[..SUPER_HEADER_LEN],
                &SuperPacket::header(packet.gso),
                "the decoder accepted a header field that re-encodes differently"
            );
            assert!(packet.gso.fits_wire(), "segments below the minimum");
            assert!(matches!(bytes[SUPER_HEADER_LEN] >> 4, 4 | 6));
        }
        Frame::Extension(extension) => {
            assert!(
                decoder.extensions(),
                "an extension frame with extensions off"
            );
            assert_eq!(bytes[0], EXTENSION_FIRST_BYTE);
            assert_eq!(extension.kind, bytes[1]);
            assert_eq!(&extension.body[..], &bytes[4..]);
            let encoded = extension.encode().expect("a decoded extension re-encodes");
            assert_eq!(
                &encoded[..],
                bytes,
                "the extension frame re-encodes differently"
            );
            let again = Extension {
                kind: extension.kind,
                body: extension.body.clone(),
            };
            assert_eq!(&again, extension);
        }
    }
    Ok(Some(frame))
}

fn check_control(control: &Control, bytes: &[u8]) {
    assert_eq!(
        bytes.len(),
        CONTROL_LEN,
        "a control message of {} bytes",
        bytes.len()
    );
    assert_eq!(bytes[0] >> 4, 4);
    assert_eq!(bytes[2..4], [0, 0]);
    let encoded = control.encode();
    assert_eq!(encoded[0] >> 4, 4);
    assert_eq!(encoded[2..4], [0, 0]);
    assert_eq!(
        encoded[12..20],
        bytes[12..20],
        "the addresses re-encode differently"
    );
    let template = Control::KEEPALIVE.encode();
    if bytes[..12] == template[..12] {
        assert_eq!(
            encoded[..],
            bytes[..],
            "a canonical control re-encodes differently"
        );
    }
    // The re-encoded message decodes back to itself, with or without
    // extensions, whatever the maximum.
    for decoder in [Decoder::new(0), Decoder::default().with_extensions()] {
        let mut buf = BytesMut::from(&encoded[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(Frame::Control(*control))));
        assert!(buf.is_empty());
    }
    // Its readings as a request and as a reply never panic.
    let _ = control.as_request();
    let _ = control.as_reply();
}
