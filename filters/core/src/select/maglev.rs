//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as Envoy's `MAGLEV` does.
//!
//! Each endpoint has a permutation of the table positions (`offset + i × skip mod M`, with `M`
//! prime so every `skip` visits every position). Endpoints take turns claiming their next free
//! position; an endpoint of weight `w` takes a turn only in rounds where `round × w` has caught
//! up with its claims × the maximum weight, so shares follow weights. Lookups are one table
//! read; each endpoint owns `M / N` entries within a few percent.

use super::{
    Slot,
    hash::{HashTable, Layout},
};
use crate::rng::mix64;

/// The lookup table's layout: its `table_size` from the policy.
#[derive(Debug, Clone)]
pub(crate) struct Table(pub u32);

impl Layout for Table {
    fn build(&self, eligible: &[u32], slots: &[Slot]) -> HashTable {
        build(eligible, slots, self.0)
    }
}

/// Builds a table of `table_size` entries (should be prime) over `members` (slot indices).
pub(crate) fn build(members: &[u32], slots: &[Slot], table_size: u32) -> HashTable {
    let size = u64::from(table_size.max(1));
    if members.is_empty() {
        return HashTable::Maglev { table: Vec::new() };
    }
    struct Entry {
        slot: u32,
        offset: u64,
        skip: u64,
        next: u64,
        weight: u64,
        target: u64,
    }
    let mut entries: Vec<Entry> = members
        .iter()
        .map(|&slot| {
            let s = &slots[slot as usize];
            Entry {
                slot,
                offset: mix64(s.address_hash) % size,
                skip: if size > 1 {
                    mix64(s.address_hash ^ 0x5851_F42D_4C95_7F2D) % (size - 1) + 1
                } else {
                    1
                },
                next: 0,
                weight: u64::from(s.weight()),
                target: 0,
            }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);
    let mut table: Vec<Option<u32>> = vec![None; size as usize];
    let mut filled: u64 = 0;
    let mut round: u64 = 1;
    while filled < size {
        for entry in &mut entries {
            if filled == size {
                break;
            }
            if round * entry.weight < entry.target {
                continue;
            }
            entry.target += max_weight;
            let permutation = |next: u64| (entry.offset + entry.skip * (next % size)) % size;
            let mut position = permutation(entry.next);
            let mut probes = 0;
            while table[position as usize].is_some() && probes < size {
                entry.next += 1;
                probes += 1;
                position = permutation(entry.next);
            }
            if table[position as usize].is_some() {
                // Only reachable when `size` is not prime (an unvalidated policy): the
                // permutation cycles early, so take the first free entry instead.
                position = table.iter().position(Option::is_none).unwrap_or(0) as u64;
            }
            table[position as usize] = Some(entry.slot);
            entry.next += 1;
            filled += 1;
        }
        round += 1;
    }
    HashTable::Maglev {
        table: table.into_iter().map(|slot| slot.unwrap_or(0)).collect(),
    }
}
