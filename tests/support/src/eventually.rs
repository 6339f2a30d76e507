//! The one bounded wait for eventually consistent state (Envoy's clusters after a push, a
//! snapshot after a file change, a process that starts serving): poll, sleep a little, give
//! up after a deadline with an error that names what was awaited.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::Error;

/// How long [`eventually`] sleeps between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a poll of [`eventually`] answers: ready or not, and the value when ready.
pub trait Ready {
    /// What a ready poll yields.
    type Value;
    /// The value if ready, `None` to poll again.
    fn ready(self) -> Option<Self::Value>;
}

/// `true` is ready (with no value).
impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

/// `Some(value)` is ready with `value`.
impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `check` every 20 ms until it is ready (`true`, or `Some(value)`), and returns the
/// value; after `within` it fails with [`Error::Timeout`] naming `what`. `check` runs at
/// least once, even when `within` is zero.
pub async fn eventually<R, F, Fut>(
    within: Duration,
    what: &str,
    check: F,
) -> Result<R::Value, Error>
where
    R: Ready,
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
{
    poll_until(within, what, || Ok(()), check).await
}

/// [`eventually`] that also calls `alive` before every poll and fails with its error at once:
/// a wait on a child process ends as soon as the process dies.
pub(crate) async fn poll_until<R, F, Fut>(
    within: Duration,
    what: &str,
    mut alive: impl FnMut() -> Result<(), Error>,
    mut check: F,
) -> Result<R::Value, Error>
where
    R: Ready,
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
{
    let deadline = Instant::now() + within;
    loop {
        alive()?;
        if let Some(value) = check().await.ready() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                within,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_of_the_first_ready_poll() {
        let mut polls = 0;
        let value = eventually(Duration::from_secs(1), "the third poll", || {
            polls += 1;
            let ready = (polls == 3).then_some(polls * 10);
            async move { ready }
        })
        .await
        .expect("ready on the third poll");
        assert_eq!((value, polls), (30, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bool_check_is_ready_when_true() {
        let mut polls = 0;
        eventually(Duration::from_secs(1), "true", || {
            polls += 1;
            let ready = polls == 2;
            async move { ready }
        })
        .await
        .expect("ready on the second poll");
        assert_eq!(polls, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_deadline_naming_what_was_awaited() {
        let started = Instant::now();
        let mut polls = 0;
        let error = eventually(Duration::from_millis(100), "the impossible", || {
            polls += 1;
            async { false }
        })
        .await
        .expect_err("never ready");
        assert_eq!(error.to_string(), "not within 100ms: the impossible");
        // Polls at 0, 20, ..., 100 ms: the one at the deadline still counts.
        assert_eq!(polls, 6);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn polls_once_even_with_no_time_at_all() {
        let value = eventually(Duration::ZERO, "now", || async { Some(7) }).await;
        assert_eq!(value.ok(), Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_process_ends_the_wait_at_once() {
        let error = poll_until(
            Duration::from_secs(60),
            "anything",
            || {
                Err(Error::Timeout {
                    what: "dead".to_owned(),
                    within: Duration::ZERO,
                })
            },
            || async { true },
        )
        .await
        .expect_err("not alive");
        assert!(error.to_string().contains("dead"), "{error}");
    }
}
