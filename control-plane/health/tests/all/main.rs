//! The health stage against real backends on loopback: the sample backend's `/healthz`
//! fails on demand (`fail_health_checks`) while its traffic keeps answering; `probe` checks one
//! probe against hand-written answers.

mod overlay;
mod probe;
