//! Which control-plane replica a proxy follows, so it never alternates between two views.
//!
//! Replicas of the control plane compute the same content-versioned snapshot from the same
//! sources, but not at the same instant: while an endpoint's health check flips, or a source
//! change reaches one replica a moment before the other, they serve different versions. A proxy
//! whose polls land on replicas in turn would flip between the two views on every poll, and a
//! filter resets the state of what changed on every switch. Kubernetes' `sessionAffinity:
//! ClientIP` on the Service keeps a proxy's polls on one replica where kube-proxy implements
//! it; this rule makes it hold wherever the polls land:
//!
//! - the control plane names itself in each snapshot answer (`x-fulcrum-replica`);
//! - the proxy follows the replica that answered first, and applies answers from that replica
//!   only ([`Verdict::Follow`]);
//! - an answer from another replica is ignored ([`Verdict::Ignore`]) while the followed one
//!   answered within `failover_after`; after that silence the proxy moves to the one that
//!   answers ([`Verdict::FailOver`]) and follows it from then on.
//!
//! So a proxy changes view at most once per replica loss, never back and forth. An answer that
//! names no replica (a control plane from before this rule, during a rolling upgrade, or any
//! plain server) is followed, as before. Replica names are bytes from the network: they are
//! compared, never parsed, and cut at [`MAX_REPLICA_BYTES`].

use std::time::Duration;

/// The longest replica name compared; longer names are cut (a pod name is at most 253).
pub const MAX_REPLICA_BYTES: usize = 253;

/// The replica a proxy follows and when it last answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    /// The replica's name, at most [`MAX_REPLICA_BYTES`].
    pub replica: Vec<u8>,
    /// When it last answered (a 200 or a 304), on the proxy's clock.
    pub last_heard: Duration,
}

/// What to do with one snapshot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// From the followed replica, or the first answer, or from a server that names no
    /// replica: use it.
    Follow,
    /// From another replica after the followed one was silent for `failover_after`: follow
    /// this one from now on, and use the answer.
    FailOver,
    /// From another replica while the followed one answers: leave it.
    Ignore,
}

/// `name` as compared: cut at [`MAX_REPLICA_BYTES`].
pub fn replica_name(name: &[u8]) -> &[u8] {
    &name[..name.len().min(MAX_REPLICA_BYTES)]
}

/// Judges an answer from replica `from` (`None`: it names none) at `now`, given the replica
/// followed so far.
pub fn judge(
    followed: Option<&Followed>,
    from: Option<&[u8]>,
    now: Duration,
    failover_after: Duration,
) -> Verdict {
    let (Some(followed), Some(from)) = (followed, from) else {
        return Verdict::Follow;
    };
    if followed.replica == replica_name(from) {
        Verdict::Follow
    } else if now.saturating_sub(followed.last_heard) >= failover_after {
        Verdict::FailOver
    } else {
        Verdict::Ignore
    }
}

impl Followed {
    /// The replica `name` (cut), heard at `now`.
    pub fn new(name: &[u8], now: Duration) -> Self {
        Self {
            replica: replica_name(name).to_vec(),
            last_heard: now,
        }
    }

    /// Eight bytes of `last_heard` in nanoseconds (little endian), then the name: the form
    /// kept in shared data.
    pub fn encode(&self) -> Vec<u8> {
        let nanos = crate::duration::nanos(self.last_heard);
        let mut bytes = Vec::with_capacity(8 + self.replica.len());
        bytes.extend_from_slice(&nanos.to_le_bytes());
        bytes.extend_from_slice(&self.replica);
        bytes
    }

    /// Reads [`encode`](Self::encode)'s form; `None` for anything shorter than eight bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (nanos, name) = bytes.split_first_chunk::<8>()?;
        Some(Self::new(
            name,
            Duration::from_nanos(u64::from_le_bytes(*nanos)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const AFTER: Duration = Duration::from_secs(10);

    fn at(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    #[test]
    fn the_first_answer_and_answers_naming_no_replica_are_followed() {
        assert_eq!(judge(None, Some(b"a"), at(0), AFTER), Verdict::Follow);
        let followed = Followed::new(b"a", at(0));
        assert_eq!(judge(Some(&followed), None, at(1), AFTER), Verdict::Follow);
    }

    #[test]
    fn another_replica_is_ignored_until_the_followed_one_is_silent_for_failover_after() {
        let followed = Followed::new(b"a", at(100));
        assert_eq!(
            judge(Some(&followed), Some(b"a"), at(101), AFTER),
            Verdict::Follow
        );
        assert_eq!(
            judge(Some(&followed), Some(b"b"), at(109), AFTER),
            Verdict::Ignore
        );
        assert_eq!(
            judge(Some(&followed), Some(b"b"), at(110), AFTER),
            Verdict::FailOver
        );
    }

    #[test]
    fn names_are_cut_at_the_limit_and_compared_as_bytes() {
        let long = vec![0xff; MAX_REPLICA_BYTES + 50];
        let followed = Followed::new(&long, at(0));
        assert_eq!(followed.replica.len(), MAX_REPLICA_BYTES);
        assert_eq!(
            judge(Some(&followed), Some(&long), at(1), AFTER),
            Verdict::Follow
        );
    }

    proptest! {
        #[test]
        fn the_shared_form_reads_back(name in proptest::collection::vec(any::<u8>(), 0..300), nanos in any::<u64>()) {
            let followed = Followed::new(&name, Duration::from_nanos(nanos));
            prop_assert_eq!(Followed::decode(&followed.encode()), Some(followed));
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Followed::decode(&bytes);
        }

        /// Whatever order answers from two replicas arrive in, each at least every
        /// `failover_after`, a proxy applying the verdicts switches replica at most as often
        /// as the followed one falls silent: never back and forth while both answer.
        #[test]
        fn while_both_replicas_answer_the_followed_one_never_changes(
            answers in proptest::collection::vec(any::<bool>(), 1..200),
        ) {
            let mut followed: Option<Followed> = None;
            let mut first: Option<Vec<u8>> = None;
            let (mut last_a, mut last_b) = (at(0), at(0));
            for (tick, from_a) in answers.iter().enumerate() {
                let now = Duration::from_millis(500 * tick as u64);
                // Each replica answers at least every failover_after / 2: the one quiet that
                // long answers next, whatever the random order says.
                let from: &[u8] = if now.saturating_sub(last_a) >= AFTER / 2 {
                    b"a"
                } else if now.saturating_sub(last_b) >= AFTER / 2 || !*from_a {
                    b"b"
                } else {
                    b"a"
                };
                if from == b"a" {
                    last_a = now;
                } else {
                    last_b = now;
                }
                match judge(followed.as_ref(), Some(from), now, AFTER) {
                    Verdict::Follow | Verdict::FailOver => {
                        followed = Some(Followed::new(from, now));
                        first.get_or_insert_with(|| from.to_vec());
                    }
                    Verdict::Ignore => {}
                }
                prop_assert_eq!(followed.as_ref().map(|f| f.replica.clone()), first.clone());
            }
        }
    }
}
