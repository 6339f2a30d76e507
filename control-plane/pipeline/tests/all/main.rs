//! The pipeline's stages against real backends on loopback: the sample backend's `/healthz`
//! fails on demand (`fail_health_checks`) while its traffic keeps answering.

mod health;
