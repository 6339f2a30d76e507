//! Scenario tests of the balancer, the policy and the algorithms, named as specifications.

mod balancer;
