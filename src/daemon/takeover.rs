//! One key, one session: when a key connects while it already holds a
//! session, the newer connection takes over (the client reconnected before
//! the server noticed its old connection die). A key used on two hosts at
//! once would take over for ever, each host kicking the other; so a key
//! that takes over more than [`MAX_TAKEOVERS`] times within
//! [`TAKEOVER_WINDOW`] is refused for a back-off that doubles from
//! [`BACKOFF_MIN`] up to [`BACKOFF_MAX`] while it goes on.
//!
//! No I/O here: the time comes in as an argument, so it is unit-tested.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Takeovers of one key counted together.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(60);
/// Takeovers allowed within [`TAKEOVER_WINDOW`]; the next is refused.
pub const MAX_TAKEOVERS: usize = 3;
/// The first back-off of a key that takes over too often.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
/// The longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What happens to a connection that would take over its key's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It takes over.
    Allow,
    /// It is refused: the key is backing off for `remaining`.
    Refuse {
        remaining: Duration,
        /// Takeovers within the window, this one included.
        takeovers: usize,
    },
}

#[derive(Debug)]
struct KeyState {
    /// Takeovers within the window, oldest first.
    recent: VecDeque<Instant>,
    backoff_until: Option<Instant>,
    /// The next back-off is [`BACKOFF_MIN`] doubled this many times.
    level: u32,
}

/// The takeovers of every key, and the keys backing off.
#[derive(Debug)]
pub struct Takeovers<K> {
    keys: HashMap<K, KeyState>,
}

impl<K: Hash + Eq + Copy> Default for Takeovers<K> {
    fn default() -> Self {
        Takeovers {
            keys: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> Takeovers<K> {
    /// How long `key` is still refused at `now`, if it is backing off.
    pub fn backing_off(&self, key: &K, now: Instant) -> Option<Duration> {
        let until = self.keys.get(key)?.backoff_until?;
        Some(until.saturating_duration_since(now)).filter(|d| !d.is_zero())
    }

    /// A connection of `key` would take over its session at `now`: allowed
    /// (and counted) or refused.
    pub fn takeover(&mut self, key: K, now: Instant) -> Verdict {
        if let Some(remaining) = self.backing_off(&key, now) {
            let takeovers = self.keys.get(&key).map_or(0, |k| k.recent.len()) + 1;
            return Verdict::Refuse {
                remaining,
                takeovers,
            };
        }
        self.forget_stale(now);
        let state = self.keys.entry(key).or_insert_with(|| KeyState {
            recent: VecDeque::new(),
            backoff_until: None,
            level: 0,
        });
        while state
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= TAKEOVER_WINDOW)
        {
            state.recent.pop_front();
        }
        if state.recent.len() < MAX_TAKEOVERS {
            state.recent.push_back(now);
            return Verdict::Allow;
        }
        let backoff = BACKOFF_MIN
            .saturating_mul(1u32.checked_shl(state.level).unwrap_or(u32::MAX))
            .min(BACKOFF_MAX);
        state.level = state.level.saturating_add(1);
        state.backoff_until = Some(now + backoff);
        Verdict::Refuse {
            remaining: backoff,
            takeovers: state.recent.len() + 1,
        }
    }

    /// Forgets keys that neither took over within the window nor back off:
    /// after such a quiet spell a key starts again at the first back-off.
    fn forget_stale(&mut self, now: Instant) {
        self.keys.retain(|_, state| {
            let recent = state
                .recent
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < TAKEOVER_WINDOW);
            let backing_off = state
                .backoff_until
                .is_some_and(|until| now.saturating_duration_since(until) < TAKEOVER_WINDOW);
            recent || backing_off
        });
    }

    /// Keys remembered (the map stays bounded).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_few_takeovers_are_allowed_then_the_back_off_doubles_to_its_cap() {
        let t0 = Instant::now();
        let mut takeovers = Takeovers::default();
        for i in 0..MAX_TAKEOVERS as u64 {
            assert_eq!(takeovers.takeover('k', t0 + secs(i)), Verdict::Allow);
        }
        let t = t0 + secs(3);
        assert_eq!(
            takeovers.takeover('k', t),
            Verdict::Refuse {
                remaining: BACKOFF_MIN,
                takeovers: 4
            }
        );
        assert_eq!(takeovers.backing_off(&'k', t + secs(1)), Some(secs(4)));
        // Refused while backing off, without making it longer.
        assert!(matches!(
            takeovers.takeover('k', t + secs(2)),
            Verdict::Refuse { remaining, .. } if remaining == secs(3)
        ));
        assert_eq!(takeovers.backing_off(&'k', t + secs(5)), None);
        // Still flapping after the back-off: twice as long, and so on.
        let mut t = t + secs(5);
        let mut expected = BACKOFF_MIN * 2;
        for _ in 0..10 {
            match takeovers.takeover('k', t) {
                Verdict::Refuse { remaining, .. } => assert_eq!(remaining, expected),
                Verdict::Allow => panic!("allowed at {:?}", t - t0),
            }
            t += expected;
            // The window forgets old takeovers, so keep it full.
            for _ in 0..MAX_TAKEOVERS {
                if takeovers.takeover('k', t) != Verdict::Allow {
                    break;
                }
            }
            expected = (expected * 2).min(BACKOFF_MAX);
        }
        assert_eq!(takeovers.backing_off(&'k', t), None);
        // Another key is not affected.
        assert_eq!(takeovers.takeover('j', t), Verdict::Allow);
    }

    #[test]
    fn takeovers_spread_out_over_the_window_are_fine() {
        let t0 = Instant::now();
        let mut takeovers = Takeovers::default();
        for i in 0..20 {
            // One every 20 s: never more than 3 within a minute.
            assert_eq!(takeovers.takeover(1u8, t0 + secs(20 * i)), Verdict::Allow);
        }
    }

    #[test]
    fn a_quiet_key_is_forgotten_and_starts_again_at_the_first_back_off() {
        let t0 = Instant::now();
        let mut takeovers = Takeovers::default();
        for i in 0..4 {
            takeovers.takeover(1u8, t0 + secs(i));
        }
        assert_eq!(takeovers.backing_off(&1, t0 + secs(4)), Some(secs(4)));
        let later = t0 + secs(3) + BACKOFF_MIN + TAKEOVER_WINDOW;
        assert_eq!(takeovers.takeover(2u8, later), Verdict::Allow);
        assert_eq!(takeovers.len(), 1, "key 1 is forgotten");
        for i in 0..3 {
            assert_eq!(takeovers.takeover(1u8, later + secs(i)), Verdict::Allow);
        }
        assert_eq!(
            takeovers.takeover(1u8, later + secs(3)),
            Verdict::Refuse {
                remaining: BACKOFF_MIN,
                takeovers: 4
            }
        );
    }
}
