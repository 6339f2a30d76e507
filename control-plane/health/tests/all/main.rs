//! Probes against real answers on loopback: `probe` checks one probe against hand-written
//! answers. (The health *stage* of the control plane is tested in `fulcrum-pipeline`.)

mod probe;
