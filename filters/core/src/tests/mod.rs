//! Scenario and property tests of the picker, the policy and the algorithms, named as
//! specifications.

mod algorithms;
mod breaker;
mod closed_loop;
mod ejections;
mod equal_shares;
mod explain;
mod locality;
mod mesh;
mod picker;
mod policy;
mod receive;
mod relative_latency;
mod shared_counts;
mod slow_endpoint;
mod slow_start;
