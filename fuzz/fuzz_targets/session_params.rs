//! The session-parameters extension (`simplevpn_proto::params::SessionParams`) on
//! arbitrary bodies.
//!
//! Input: the body of a SESSION_PARAMS extension frame.
//!
//! Checked, besides "never panics": whatever `decode` accepts, `encode_body`
//! encodes (the encoder refuses only what the decoder refuses), into a
//! canonical body no longer than the input that decodes to the same value
//! and re-encodes to itself; `encode` wraps it in a frame that the wire
//! decoder (extensions on, maximum `MAX_ENCODED_LEN`) gives back as a
//! SESSION_PARAMS extension with that body.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use simplevpn_proto::params::{SessionParams, MAX_ENCODED_LEN};
use simplevpn_proto::wire::{Decoder, ExtensionKind, Frame};

fuzz_target!(|body: &[u8]| {
    let params = match SessionParams::decode(body) {
        Ok(params) => params,
        Err(error) => {
            // Error messages are logged: they must not panic either.
            let _ = error.to_string();
            return;
        }
    };
    let canonical = params
        .encode_body()
        .unwrap_or_else(|e| panic!("decoded {params:?}, but encode_body says {e}"));
    assert!(
        canonical.len() <= body.len(),
        "the canonical body ({} bytes) is longer than the input ({})",
        canonical.len(),
        body.len()
    );
    assert_eq!(
        SessionParams::decode(&canonical).as_ref(),
        Ok(&params),
        "encode_body then decode changed the value"
    );
    assert_eq!(
        params.encode_body().as_ref(),
        Ok(&canonical),
        "encode_body is not deterministic"
    );

    let frame = params
        .encode()
        .unwrap_or_else(|e| panic!("decoded {params:?}, but encode says {e}"));
    assert!(frame.len() <= MAX_ENCODED_LEN);
    let mut buf = BytesMut::from(&frame[..]);
    let decoded = Decoder::new(MAX_ENCODED_LEN)
        .with_extensions()
        .decode(&mut buf);
    let Ok(Some(Frame::Extension(extension))) = decoded else {
        panic!("the encoded frame decodes to {decoded:?}");
    };
    assert!(buf.is_empty());
    assert_eq!(
        ExtensionKind::from(extension.kind),
        ExtensionKind::SessionParams
    );
    assert_eq!(extension.body, canonical);
});
