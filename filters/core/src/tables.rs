//! The memory of consistent-hash tables, and the per-VM budget a snapshot must fit.
//!
//! `ring_hash` and `maglev` build one lookup table per service, sized by the policy
//! (`minimum_ring_size`, `table_size`) rather than by the endpoints: a default Maglev table
//! is 65537 entries (256 KiB), the largest 5000011 (19 MiB). One policy reaches every service
//! of the mesh (`default`), so a mesh of 1,000 services under default Maglev would ask every
//! VM of every proxy for 250 MiB. [`check_budget`] adds up what the tables of a whole
//! snapshot would take and refuses it, naming the service and the policy field that crosses
//! the budget, before anything is built: the caller keeps its last good state (the filter:
//! `max_table_bytes`, see `docs/filter.md`).
//!
//! Costs are what the tables hold once built ([`RING_POINT_BYTES`], [`MAGLEV_ENTRY_BYTES`]);
//! building one briefly needs about twice that for its scratch space.

use std::{collections::BTreeSet, fmt};

use crate::{LoadBalancer, Policy, select::ring_hash};

/// Bytes per ring point: its 64-bit position and the 32-bit slot owning it.
pub const RING_POINT_BYTES: u64 = 12;
/// Bytes per Maglev entry: the 32-bit slot serving it.
pub const MAGLEV_ENTRY_BYTES: u64 = 4;
/// The default per-VM budget for every table together: 64 MiB.
pub const DEFAULT_TABLE_BUDGET_BYTES: u64 = 64 << 20;

/// A snapshot whose tables would not fit the budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "service {service}: {field} = {value} needs {bytes} bytes of lookup table, which brings this VM's tables to {total} bytes, over the budget of {budget} bytes (max_table_bytes); lower {field}, use another load_balancer for the service, or raise max_table_bytes"
)]
pub struct TableBudgetError {
    /// The service whose table crosses the budget (services are added up in name order).
    pub service: String,
    /// The policy field that sizes its table, with its path in the policy
    /// (`services.<name>.…` or `default.…`).
    pub field: String,
    /// That field's value.
    pub value: u32,
    /// The bytes of the service's table.
    pub bytes: u64,
    /// The bytes of every table up to and including this service's.
    pub total: u64,
    /// The budget.
    pub budget: u64,
}

/// One service's table: its size in bytes, and the field that sizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCost {
    /// Bytes of the built table.
    pub bytes: u64,
    /// The field that sizes it, relative to the service policy
    /// (`load_balancer.maglev.table_size`).
    pub field: SizingField,
    /// The field's value.
    pub value: u32,
}

/// The policy field that sizes a consistent-hash table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizingField {
    /// `load_balancer.ring_hash.minimum_ring_size` (or `sticky`'s fallback's).
    MinimumRingSize { sticky: bool },
    /// `load_balancer.maglev.table_size` (or `sticky`'s fallback's).
    MaglevTableSize { sticky: bool },
}

impl fmt::Display for SizingField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sticky, rest) = match self {
            Self::MinimumRingSize { sticky } => (*sticky, "ring_hash.minimum_ring_size"),
            Self::MaglevTableSize { sticky } => (*sticky, "maglev.table_size"),
        };
        let via = if sticky { "sticky.fallback." } else { "" };
        write!(f, "load_balancer.{via}{rest}")
    }
}

/// Whether `load_balancer` builds a lookup table.
pub fn has_table(load_balancer: &LoadBalancer) -> bool {
    matches!(
        load_balancer.algorithm(),
        LoadBalancer::RingHash(_) | LoadBalancer::Maglev(_)
    )
}

/// Whether any service under `policy` builds a lookup table: when none does, a snapshot
/// costs no table memory and [`check_budget`] has nothing to add up.
pub fn policy_has_tables(policy: &Policy) -> bool {
    std::iter::once(&policy.default)
        .chain(policy.services.values())
        .any(|service| has_table(&service.load_balancer))
}

/// The table a service under `load_balancer` builds over endpoints of these `weights` (all
/// of its endpoints: the eligible ones, which the table is built over, are never more);
/// `None` for algorithms without a table.
pub fn table_cost(load_balancer: &LoadBalancer, weights: &[u64]) -> Option<TableCost> {
    let sticky = matches!(load_balancer, LoadBalancer::Sticky(_));
    match load_balancer.algorithm() {
        LoadBalancer::RingHash(ring) => {
            let points = ring_hash::ring_points(ring.minimum_ring_size, weights.iter().copied());
            Some(TableCost {
                bytes: points * RING_POINT_BYTES,
                field: SizingField::MinimumRingSize { sticky },
                value: ring.minimum_ring_size,
            })
        }
        LoadBalancer::Maglev(maglev) => {
            let entries = if weights.is_empty() {
                0
            } else {
                u64::from(maglev.table_size.max(1))
            };
            Some(TableCost {
                bytes: entries * MAGLEV_ENTRY_BYTES,
                field: SizingField::MaglevTableSize { sticky },
                value: maglev.table_size,
            })
        }
        _ => None,
    }
}

/// Adds up the tables of `services` (each name with its endpoints' weights, read only for
/// services whose policy builds a table; summed in name order so every VM names the same
/// service) under `policy`: the total, or the service that crosses `budget`.
pub fn check_budget<'s, W>(
    policy: &Policy,
    services: impl IntoIterator<Item = (&'s str, W)>,
    budget: u64,
) -> Result<u64, TableBudgetError>
where
    W: Iterator<Item = u32>,
{
    let mut costs: Vec<(&str, TableCost)> = services
        .into_iter()
        .filter_map(|(name, weights)| {
            let load_balancer = &policy.for_service(name).load_balancer;
            if !has_table(load_balancer) {
                return None;
            }
            let weights: Vec<u64> = weights.map(|weight| u64::from(weight.max(1))).collect();
            table_cost(load_balancer, &weights).map(|cost| (name, cost))
        })
        .collect();
    costs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut total: u64 = 0;
    let mut seen = BTreeSet::new();
    for (name, cost) in costs {
        if !seen.insert(name) {
            continue;
        }
        total = total.saturating_add(cost.bytes);
        if total > budget {
            let scope = if policy.services.contains_key(name) {
                format!("services.{name}")
            } else {
                "default".to_owned()
            };
            return Err(TableBudgetError {
                service: name.to_owned(),
                field: format!("policy.{scope}.{}", cost.field),
                value: cost.value,
                bytes: cost.bytes,
                total,
                budget,
            });
        }
    }
    Ok(total)
}
