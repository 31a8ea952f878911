//! Wall-clock times built from numbers someone else wrote: a ban's length
//! from svpnctl, a ban or lease time read from the state store or etcd.
//! `SystemTime + Duration` panics when the sum does not fit; these saturate
//! at [`far_future()`](far_future) instead, so a huge number means "for good", never a
//! crash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 9999-12-31T23:59:59Z: later than anything the server means, and a time
/// every platform's `SystemTime` holds.
pub const FAR_FUTURE_SECS: u64 = 253_402_300_799;

/// [`FAR_FUTURE_SECS`] as a time.
pub fn far_future() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(FAR_FUTURE_SECS)
}

/// `base + span`, or [`far_future`] if that is later or does not fit.
pub fn after(base: SystemTime, span: Duration) -> SystemTime {
    base.checked_add(span)
        .filter(|t| *t <= far_future())
        .unwrap_or_else(far_future)
}

/// The time `secs` seconds after the Unix epoch, at most [`far_future`].
pub fn from_unix_secs(secs: u64) -> SystemTime {
    after(UNIX_EPOCH, Duration::from_secs(secs))
}

/// The time `millis` milliseconds after the Unix epoch, at most [`far_future`].
pub fn from_unix_millis(millis: u64) -> SystemTime {
    after(UNIX_EPOCH, Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_that_do_not_fit_saturate_instead_of_panicking() {
        let now = SystemTime::now();
        assert_eq!(
            after(now, Duration::from_secs(60)),
            now + Duration::from_secs(60)
        );
        assert_eq!(after(now, Duration::MAX), far_future());
        assert_eq!(after(now, Duration::from_secs(u64::MAX)), far_future());
        assert_eq!(from_unix_secs(u64::MAX), far_future());
        assert_eq!(from_unix_secs(1 << 63), far_future());
        assert_eq!(from_unix_secs(10), UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(from_unix_millis(u64::MAX), far_future());
    }
}
