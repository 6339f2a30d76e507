//! Stage 2, merged endpoints → valid endpoints: the filter's own snapshot validation, run
//! before anything is published.
//!
//! A filter refuses a service with any invalid endpoint, and Envoy NACKs a cluster with a
//! zero weight, so publishing what a source let through (a `weight: 0` in the static file, a
//! registration at port 0) would leave Envoy and the filters with different endpoint sets.
//! This stage screens every service with [`fulcrum_core::receive::screen_service`], the
//! function the filter's validation is built from: a bad endpoint is left out on its own, a
//! service without a name as a whole, each logged with its field when what is left out
//! changes (not on every merge). What was left out is
//! kept as a [`Dropped`] report for `/v1/status` and counted in
//! `fulcrum_snapshot_dropped{kind}`, so an operator can alert on it.

use std::{collections::BTreeMap, sync::Arc};

use fulcrum_core::{ServiceEndpoints, ValidationError, receive::screen_service};
use fulcrum_sources::Services;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info_span, warn};

use crate::{change::Traced, metrics::PipelineMetrics};

/// The most entries a [`Dropped`] report lists; the counts are always complete.
pub const REPORTED: usize = 100;

/// What the last validation left out of the published endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Endpoints left out.
    pub endpoints: usize,
    /// Services left out whole.
    pub services: usize,
    /// The first [`REPORTED`] problems, each `path: message`.
    pub problems: Vec<String>,
}

/// Runs the stage until `input` closes: sends `output` the valid part of every input, and
/// `report` what was left out.
pub async fn run(
    mut input: watch::Receiver<Option<Traced<Services>>>,
    output: watch::Sender<Option<Traced<Services>>>,
    report: watch::Sender<Arc<Dropped>>,
    metrics: PipelineMetrics,
) {
    let mut screener = Screener::default();
    loop {
        let merged = input.borrow_and_update().clone();
        if let Some(merged) = merged {
            let span = info_span!(
                parent: None,
                "validate",
                dropped_endpoints = tracing::field::Empty,
                dropped_services = tracing::field::Empty,
            );
            merged.trace.adopt(&span);
            let (valid, dropped) = screener.screen(merged.value);
            span.record("dropped_endpoints", dropped.endpoints);
            span.record("dropped_services", dropped.services);
            let valid = Traced::new(valid, merged.trace);
            metrics.observe_dropped(&dropped);
            report.send_if_modified(|current| {
                if **current == dropped {
                    return false;
                }
                // Logged when what is left out changes, not on every merge.
                for problem in &dropped.problems {
                    warn!(%problem, "left an invalid endpoint or service out of the snapshot");
                }
                *current = Arc::new(dropped);
                true
            });
            output.send_if_modified(|current| {
                if current.as_ref() == Some(&valid) {
                    return false;
                }
                *current = Some(valid);
                true
            });
        }
        if input.changed().await.is_err() {
            return;
        }
    }
}

/// The valid part of `merged` (`merged` itself when all of it is valid) and what was left out.
pub fn screen(merged: Arc<Services>) -> (Arc<Services>, Dropped) {
    Screener::default().screen(merged)
}

/// Screens services as [`screen`] does, remembering each service's result while its input
/// is the same [`Arc`]: a change screens the services that changed, not the mesh.
#[derive(Debug, Default)]
pub struct Screener {
    screened: BTreeMap<String, ScreenedService>,
}

/// What screening one service gave.
#[derive(Debug)]
struct ScreenedService {
    /// The service as merged.
    input: Arc<ServiceEndpoints>,
    /// Its valid part (`input` itself when all of it is); `None`: left out whole.
    valid: Option<Arc<ServiceEndpoints>>,
    /// Endpoints left out.
    dropped_endpoints: usize,
    /// Why anything was left out.
    problems: Vec<ValidationError>,
}

impl ScreenedService {
    fn new(name: &str, input: Arc<ServiceEndpoints>) -> Self {
        match screen_service(name, &input) {
            Ok(screened) if screened.dropped.is_empty() => Self {
                valid: Some(Arc::clone(&input)),
                input,
                dropped_endpoints: 0,
                problems: Vec::new(),
            },
            Ok(screened) => Self {
                dropped_endpoints: input.endpoints.len() - screened.service.endpoints.len(),
                valid: Some(Arc::new(screened.service)),
                input,
                problems: screened.dropped,
            },
            Err(errors) => Self {
                input,
                valid: None,
                dropped_endpoints: 0,
                problems: errors.errors,
            },
        }
    }
}

impl Screener {
    /// The valid part of `merged` (`merged` itself when all of it is valid) and what was
    /// left out; equal to [`screen`]'s answer whatever was screened before.
    pub fn screen(&mut self, merged: Arc<Services>) -> (Arc<Services>, Dropped) {
        let mut previous = std::mem::take(&mut self.screened);
        let mut dropped = Dropped::default();
        for (name, service) in merged.iter() {
            let screened = match previous.remove(name) {
                Some(kept) if Arc::ptr_eq(&kept.input, service) => kept,
                _ => ScreenedService::new(name, Arc::clone(service)),
            };
            if screened.valid.is_none() {
                dropped.services += 1;
            }
            dropped.endpoints += screened.dropped_endpoints;
            report(&mut dropped, &screened.problems);
            self.screened.insert(name.clone(), screened);
        }
        if dropped == Dropped::default() {
            return (merged, dropped);
        }
        let valid = self
            .screened
            .iter()
            .filter_map(|(name, screened)| {
                Some((name.clone(), Arc::clone(screened.valid.as_ref()?)))
            })
            .collect();
        (Arc::new(valid), dropped)
    }
}

fn report(dropped: &mut Dropped, problems: &[ValidationError]) {
    let room = REPORTED.saturating_sub(dropped.problems.len());
    dropped.problems.extend(
        problems
            .iter()
            .take(room)
            .map(|problem| format!("{}: {}", problem.path, problem.message)),
    );
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Endpoint, ServiceEndpoints};

    use super::*;

    fn endpoint(address: &str, weight: u32) -> Endpoint {
        Endpoint::new(address.parse().expect("address")).with_weight(weight)
    }

    fn services(entries: Vec<(&str, Vec<Endpoint>)>) -> Arc<Services> {
        Arc::new(
            entries
                .into_iter()
                .map(|(name, endpoints)| {
                    let service = ServiceEndpoints {
                        endpoints,
                        protocol: None,
                    };
                    (name.to_owned(), Arc::new(service))
                })
                .collect(),
        )
    }

    #[test]
    fn valid_endpoints_pass_through_as_they_are() {
        let merged = services(vec![("shop", vec![endpoint("10.0.0.1:80", 1)])]);
        let (valid, dropped) = screen(Arc::clone(&merged));
        assert!(
            Arc::ptr_eq(&valid, &merged),
            "no copy when nothing is dropped"
        );
        assert_eq!(dropped, Dropped::default());
    }

    #[test]
    fn a_bad_endpoint_is_left_out_alone_and_a_nameless_service_whole() {
        let merged = services(vec![
            ("", vec![endpoint("10.0.0.9:80", 1)]),
            (
                "shop",
                vec![endpoint("10.0.0.1:80", 1), endpoint("10.0.0.2:80", 0)],
            ),
        ]);
        let (valid, dropped) = screen(merged);
        assert_eq!(
            *valid,
            *services(vec![("shop", vec![endpoint("10.0.0.1:80", 1)])])
        );
        assert_eq!(dropped.endpoints, 1);
        assert_eq!(dropped.services, 1);
        assert_eq!(
            dropped.problems,
            [
                "services.\"\": service name must not be empty",
                "services.shop.endpoints[1].weight: must be at least 1, got 0",
            ]
        );
    }

    #[test]
    fn the_report_is_bounded_and_the_counts_are_not() {
        let many = (1..=REPORTED as u16 + 50)
            .map(|port| endpoint(&format!("10.0.0.1:{port}"), 0))
            .collect();
        let (valid, dropped) = screen(services(vec![("shop", many)]));
        assert!(valid["shop"].endpoints.is_empty());
        assert_eq!(dropped.endpoints, REPORTED + 50);
        assert_eq!(dropped.problems.len(), REPORTED);
    }
}
