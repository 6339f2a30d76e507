//! Ejections judged by another worker of the proxy, and the proxy's consecutive-failure
//! counters ([`EjectionRecord`]): applied to this picker's breakers as events of their own
//! transition function, so `max_ejection_percent` and the counts of `slots.rs` hold as for an
//! ejection judged here.

use std::time::Duration;

use super::{ServicePicker, Transition};
use crate::{
    breaker::{BreakerState, Event},
    ejections::EjectionRecord,
};

impl ServicePicker {
    /// Applies a service's shared ejections at `now` (the record's clock): every recorded
    /// ejection still running opens its endpoint's breaker here too
    /// ([`Event::EjectedElsewhere`]; refused like any ejection when `max_ejection_percent` is
    /// reached, ignored when it ends further ahead than `max_ejection_time`), and, unless the record is full, every breaker not closed here whose endpoint
    /// the record no longer holds learns that the ejection ended ([`Event::RestoredElsewhere`]).
    /// Every closed breaker then takes the record's consecutive counters for its endpoint
    /// ([`Event::CountedElsewhere`]; zero when the record has none and is not full of them),
    /// when the policy has a consecutive rule. Entries for addresses that are not endpoints of
    /// this service are ignored. Returns the changes of state kind, for the caller's metrics;
    /// allocates only for those.
    pub fn apply_shared_ejections(
        &mut self,
        record: &EjectionRecord,
        now: Duration,
    ) -> Vec<Transition> {
        let outlier_detection = &self.policy.outlier_detection;
        let mut transitions = Vec::new();
        for ejection in record.entries() {
            if ejection.until <= now {
                continue;
            }
            if let Some(slot) = self.slots.find(ejection.address) {
                transitions.extend(self.slots.transition(
                    slot,
                    Event::EjectedElsewhere {
                        until: ejection.until,
                        ejections: ejection.ejections,
                    },
                    now,
                    outlier_detection,
                ));
            }
        }
        if !record.is_full() && self.slots.not_closed() > 0 {
            for slot in 0..self.slots.len() {
                let entry = &self.slots[slot];
                if entry.stats.breaker.state().is_ejected()
                    && record.get(entry.endpoint.address).is_none()
                {
                    transitions.extend(self.slots.transition(
                        slot,
                        Event::RestoredElsewhere,
                        now,
                        outlier_detection,
                    ));
                }
            }
        }
        let counts_consecutive = outlier_detection.consecutive_failures > 0
            || outlier_detection.consecutive_gateway_errors > 0;
        if counts_consecutive {
            for slot in 0..self.slots.len() {
                let entry = &self.slots[slot];
                let breaker = &entry.stats.breaker;
                if !matches!(breaker.state(), BreakerState::Closed { .. }) {
                    continue;
                }
                if let Some(proxy) = record.consecutive(entry.endpoint.address)
                    && proxy != breaker.consecutive()
                {
                    // Counters are not a state kind: no transition comes back.
                    let _ = self.slots.transition(
                        slot,
                        Event::CountedElsewhere(proxy),
                        now,
                        outlier_detection,
                    );
                }
            }
        }
        transitions
    }
}
