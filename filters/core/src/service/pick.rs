//! How one request is picked: [`ServicePicker::pick`].
//!
//! 1. The rate limit, if the policy has one: an empty bucket rejects the request (429).
//! 2. A sticky session: a cookie naming an endpoint that is still selected, not unhealthy and
//!    admitted by its breaker sends the request there.
//! 3. Otherwise the admissible candidates (`eligible.rs`: healthy, selected, admitted by their
//!    breaker unless in panic, best locality tier), or a rejection when there are none.
//! 4. The service's algorithm chooses among them (`crate::select`) and says in which order it
//!    would take the others; the first `retry` admissible ones become the retry targets
//!    (`retry.rs`). A choice of an endpoint still warming up stands only with its slow-start
//!    factor's probability, else the algorithm chooses again (`warmup.rs`).
//! 5. The endpoint is counted in flight (and as a probe if its breaker is open) until
//!    [`ServicePicker::complete`].
//!
//! [`ServicePicker::pick_explained`] also says why (`explain.rs`), from the state between
//! steps 4 and 5: what the algorithm saw.

use std::time::Duration;

use super::{
    ChosenBy, Pick, PickExplanation, Rejection, RequestAttributes, RetryTargets, ServicePicker,
    explain::Picked, warmup::MAX_REDRAWS,
};
use crate::{
    ratelimit::BucketStore,
    rng::Rng,
    select::{Request, Select, candidates::Walk},
    validate::MAX_RETRY_TARGETS,
};

impl ServicePicker {
    /// Picks the endpoint for one request and counts it as inflight there.
    ///
    /// Order: rate limit; the sticky endpoint if the cookie names an admissible one; else the
    /// admissible candidates (healthy, selected, not ejected unless in panic, best locality
    /// tier) and the algorithm. The caller must later call [`complete`](Self::complete) with
    /// `Pick::endpoint`.
    ///
    /// The rate limit's buckets are this picker's own: the limit holds for the requests it
    /// picks. [`pick_with_buckets`](Self::pick_with_buckets) shares them.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Pick, Rejection> {
        let mut buckets = std::mem::take(&mut self.local_buckets);
        let picked = self.pick_with_buckets(attributes, now, rng, &mut buckets);
        self.local_buckets = buckets;
        picked
    }

    /// [`pick`](Self::pick) with the rate limit's tokens taken from `buckets`: the filter
    /// passes buckets every worker of the proxy shares, so the limit is per proxy.
    pub fn pick_with_buckets<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
        buckets: &mut dyn BucketStore,
    ) -> Result<Pick, Rejection> {
        let (pick, picked) = self.choose(attributes, now, rng, buckets)?;
        self.admit(picked.slot, now);
        Ok(pick)
    }

    /// [`pick_with_buckets`](Self::pick_with_buckets), and why: the same pick (the same
    /// draws from `rng`), explained from the state the algorithm saw, before the pick counts
    /// itself on the endpoint. Costs O(endpoints) and one allocation more, so only for the
    /// requests that ask.
    pub fn pick_explained<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
        buckets: &mut dyn BucketStore,
    ) -> Result<(Pick, PickExplanation), Rejection> {
        let (pick, picked) = self.choose(attributes, now, rng, buckets)?;
        let explanation = self.explain(&pick, picked, now);
        self.admit(picked.slot, now);
        Ok((pick, explanation))
    }

    /// Steps 1 to 4: the pick and how it was made, not yet counted on the endpoint.
    fn choose<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
        buckets: &mut dyn BucketStore,
    ) -> Result<(Pick, Picked), Rejection> {
        let policy = &self.policy;
        if let Some(limiter) = &self.limiter {
            let client = policy
                .rate_limit
                .as_ref()
                .and_then(|limit| limit.client_key_header.as_ref())
                .and(attributes.client_key);
            limiter
                .admit(buckets, client, now)
                .map_err(|retry_after| Rejection::RateLimited { retry_after })?;
        }
        let slots = &self.slots;
        let retries = policy.retry.min(MAX_RETRY_TARGETS) as usize;
        let session = self
            .sessions
            .as_ref()
            .and_then(|sessions| sessions.lookup(attributes.sticky_cookie))
            .filter(|&slot| {
                slots[slot]
                    .stats
                    .breaker
                    .admits(&policy.outlier_detection, now)
            });
        let candidates = self.eligible.candidates(slots, policy, now);

        let (picked, retry_targets, set_cookie) = if let Some(slot) = session {
            // A session's retries start at a place fixed by its endpoint, so they spread.
            let order = candidates.map_or_else(
                |_| Walk::empty(),
                |candidates| {
                    let entries = candidates.slots();
                    let start = slots[slot].address_hash % entries.len().max(1) as u64;
                    Walk::lap(entries, start as usize)
                },
            );
            let picked = Picked {
                slot,
                rival: None,
                chosen_by: ChosenBy::Session,
            };
            (
                picked,
                RetryTargets::after(order, slot, slots, retries),
                None,
            )
        } else {
            let mut candidates = candidates?;
            let slow_start = policy
                .slow_start
                .as_ref()
                .filter(|_| !self.algorithm.is_consistent_hash());
            let mut redraws = 0;
            loop {
                let choice = self.algorithm.pick(
                    &mut candidates,
                    Request {
                        attributes,
                        slots,
                        total_inflight: slots.total_inflight(),
                        level: slots.level(),
                        now,
                        rng: &mut *rng,
                    },
                );
                if redraws < MAX_REDRAWS
                    && !slots[choice.slot]
                        .stats
                        .warmup
                        .keeps_pick(slow_start, now, rng)
                {
                    redraws += 1;
                    continue;
                }
                let retry_targets = RetryTargets::after(choice.then, choice.slot, slots, retries);
                let (set_cookie, chosen_by) = match &self.sessions {
                    Some(sessions) => (
                        Some(sessions.set_cookie(&slots[choice.slot].endpoint.address)),
                        ChosenBy::NewSession,
                    ),
                    None => (choice.set_cookie, ChosenBy::Algorithm),
                };
                let picked = Picked {
                    slot: choice.slot,
                    rival: choice.rival,
                    chosen_by,
                };
                break (picked, retry_targets, set_cookie);
            }
        };
        let pick = Pick {
            endpoint: slots[picked.slot].endpoint.address,
            retry_targets,
            set_sticky_cookie: set_cookie,
        };
        Ok((pick, picked))
    }
}
