//! The invitation codec (`simplevpn_proto::join`) on arbitrary bytes: a join
//! message as a server reads it from a host that has proved nothing but
//! its key, and a token as a user pastes it.
//!
//! Input: bytes. Byte 0 chooses: even, the rest is a join message stream;
//! odd, the rest is a token's text (if UTF-8).
//!
//! Checked, besides "never panics" (error messages included): a message
//! that decodes took its length prefix and at most `MAX_JOIN_MESSAGE`
//! bytes, and re-encodes to exactly the bytes it came from (no field is
//! accepted and then dropped); a shorter prefix of those bytes is
//! incomplete. A token that decodes re-encodes to the same text (white
//! space around it aside).

#![no_main]

use libfuzzer_sys::fuzz_target;
use simplevpn_proto::join::{JoinMessage, Token, KEY_LEN, MAX_JOIN_MESSAGE};

/// Keys as bytes: the codec's part of a key is its length.
type Key = [u8; KEY_LEN];

fuzz_target!(|input: &[u8]| {
    let Some((&choice, rest)) = input.split_first() else {
        return;
    };
    if choice % 2 == 1 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        match Token::<Key>::decode(text) {
            Ok(token) => {
                let again = token
                    .encode()
                    .unwrap_or_else(|e| panic!("decoded {token:?}, but encode says {e}"));
                assert_eq!(again, text.trim(), "a token re-encodes otherwise");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        return;
    }
    match JoinMessage::<Key>::decode(rest) {
        Ok(Some((message, used))) => {
            assert!(used >= 2 && used <= 2 + MAX_JOIN_MESSAGE);
            let encoded = message
                .encode()
                .unwrap_or_else(|e| panic!("decoded {message:?}, but encode says {e}"));
            assert_eq!(encoded, rest[..used], "{message:?} re-encodes otherwise");
            for cut in 0..used {
                assert_eq!(JoinMessage::<Key>::decode(&rest[..cut]), Ok(None));
            }
        }
        Ok(None) => assert!(rest.len() < 2 + MAX_JOIN_MESSAGE),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
