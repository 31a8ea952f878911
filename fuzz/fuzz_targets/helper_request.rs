//! The helper protocol's codec (`simplevpn_helper::protocol`): one frame,
//! a u32 big-endian length then JSON, decoded as a `HelperRequest` (what
//! the privileged helper reads from the daemon) and as a `HelperResponse`.
//!
//! Input: byte 0 chooses the mode; even: the rest is the frame as it
//! arrives; odd: the rest is the JSON payload, behind a correct length
//! prefix (so that the fuzzer explores the JSON without having to keep the
//! prefix right).
//!
//! Checked, besides "never panics", as the protocol's decided field rules
//! say (every field required but those in `DEFAULTED_FIELDS`, which a
//! message may lack and then gets their default): frames longer than
//! `MAX_FRAME` or whose prefix disagrees with their length are refused; a
//! field the input lacks is one of `DEFAULTED_FIELDS` and decodes to its
//! default; whatever decodes re-encodes, within `MAX_FRAME` and no longer
//! than the input plus the defaults it lacked written out (and a byte per
//! IPv6 "::" that re-encodes as ":0:"), to a frame that decodes to the same
//! value and re-encodes to itself.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use simplevpn_helper::protocol::{
    decode, encode, HelperRequest, HelperResponse, DEFAULTED_FIELDS, MAX_FRAME,
};

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
    let grown = defaults_filled_in(&frame[4..], &value) + canonical_addresses(&frame[4..]);
    let encoded =
        encode(&value).unwrap_or_else(|e| panic!("decoded {value:?}, but encode says {e}"));
    assert!(encoded.len() <= MAX_FRAME);
    assert!(
        encoded.len() <= frame.len() + grown,
        "re-encoding {value:?} grew the frame from {} to {} bytes ({grown} for defaults)",
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

/// The bytes by which addresses may grow when they re-encode in their
/// canonical text (RFC 5952, Rust's `Display`): an IPv6 address whose "::"
/// stands for a single zero group re-encodes with ":0:" there, one byte
/// longer (the fuzzer's find: "6040:0:2001:2:0:20::1"); every other
/// non-canonical spelling (leading zeros, upper case, dotted quads, spelled
/// out zero runs) is no shorter than the canonical one. At most one byte
/// per "::" in the input.
fn canonical_addresses(payload: &[u8]) -> usize {
    payload.windows(2).filter(|w| w == b"::").count()
}

/// Checks the fields of `value`'s variant that the JSON `payload` lacks:
/// each must be one of `DEFAULTED_FIELDS` and hold its default. Returns
/// the bytes that writing them out adds (`,"field":default`).
fn defaults_filled_in<T: Serialize + Debug>(payload: &[u8], value: &T) -> usize {
    let input: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("decoded {value:?} from JSON that does not parse: {e}"));
    let output = serde_json::to_value(value).expect("a message is JSON");
    let Some((variant, Value::Object(fields))) = output.as_object().and_then(|o| o.iter().next())
    else {
        // A unit variant, or one with a single unnamed field: no named fields.
        return 0;
    };
    let given = input.get(variant).and_then(Value::as_object);
    let mut grown = 0;
    for (field, got) in fields {
        if given.is_some_and(|g| g.contains_key(field)) {
            continue;
        }
        let Some((_, _, default)) = DEFAULTED_FIELDS
            .iter()
            .find(|(v, f, _)| v == variant && f == field)
        else {
            panic!("{value:?} decoded without its required field {variant}.{field}");
        };
        let default: Value = serde_json::from_str(default).expect("defaults are JSON");
        assert_eq!(
            got, &default,
            "{variant}.{field} missing, but not its default"
        );
        grown += format!(",{}:{}", Value::from(field.as_str()), default).len();
    }
    grown
}
