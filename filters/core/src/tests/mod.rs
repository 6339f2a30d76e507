//! Scenario and property tests of the balancer, the policy and the algorithms, named as
//! specifications.

mod algorithms;
mod balancer;
mod breaker;
mod policy;
mod receive;
