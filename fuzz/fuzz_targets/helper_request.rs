//! The helper protocol's codec (`simplevpn::privsep::protocol`): one frame,
//! a u32 big-endian length then JSON, decoded as a `HelperRequest` (what
//! the privileged helper reads from the daemon) and as a `HelperResponse`.
//!
//! Input: byte 0 chooses the mode; even: the rest is the frame as it
//! arrives; odd: the rest is the JSON payload, behind a correct length
//! prefix (so that the fuzzer explores the JSON without having to keep the
//! prefix right).
//!
//! Checked, besides "never panics": frames longer than `MAX_FRAME` or whose
//! prefix disagrees with their length are refused; whatever decodes
//! re-encodes, within `MAX_FRAME` and no longer than the input, to a frame
//! that decodes to the same value and re-encodes to itself.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use simplevpn::privsep::protocol::{decode, encode, HelperRequest, HelperResponse, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let frame = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut frame = (rest.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(rest);
        frame
    };
    if let Ok(request) = check::<HelperRequest>(&frame) {
        // The helper logs what it was asked.
        let _ = request.to_string();
    }
    let _ = check::<HelperResponse>(&frame);
});

fn check<T>(frame: &[u8]) -> Result<T, ()>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let well_framed = frame.len() <= MAX_FRAME
        && frame.len() >= 4
        && u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize == frame.len() - 4;
    let value = match decode::<T>(frame) {
        Ok(value) => value,
        Err(error) => {
            // Error messages are logged (and some sent back): no panics.
            let _ = error.to_string();
            return Err(());
        }
    };
    assert!(well_framed, "accepted a frame with a bad length: {value:?}");
    let encoded =
        encode(&value).unwrap_or_else(|e| panic!("decoded {value:?}, but encode says {e}"));
    assert!(encoded.len() <= MAX_FRAME);
    assert!(
        encoded.len() <= frame.len(),
        "re-encoding {value:?} grew the frame from {} to {} bytes",
        frame.len(),
        encoded.len()
    );
    let again = decode::<T>(&encoded)
        .unwrap_or_else(|e| panic!("{value:?} re-encoded does not decode: {e}"));
    assert_eq!(again, value, "encode then decode changed the value");
    assert_eq!(
        encode(&again).ok().as_ref(),
        Some(&encoded),
        "re-encoding is not stable"
    );
    Ok(value)
}
