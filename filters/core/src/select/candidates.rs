//! What an algorithm chooses among, and the order it hands back: the request's admissible
//! [`Candidates`], and a [`Walk`], one lap around a cyclic sequence of endpoints.
//!
//! In the steady state (no breaker open) the candidates are a whole locality tier, borrowed
//! as is; otherwise they are the admitted subset, collected into scratch space the picker
//! reuses, so a pick copies nothing in the common case and allocates nothing in any case. The
//! hash algorithms walk a table of every eligible endpoint and skip the ones that are not
//! candidates; membership is a tier check, a binary search in a subset of one tier, or, for
//! a subset across tiers (rare), stamped into [`Marks`] when they ask.
//!
//! A [`Walk`] is the one notion of "preference order" every algorithm shares: the candidates
//! from the pick onwards for the list-based algorithms, the table from the key's entry for the
//! hash ones. The picker takes the retry targets from the walk an algorithm returns, so the
//! retry order is always "what the algorithm would have picked next".
//!
//! The small methods here are `#[inline]`: the picks that call them are generic over the
//! RNG, so they are compiled in the caller's crate, where a plain call would not inline.

/// Generation-stamped candidate marks, one per slot, reused by every pick: a slot is marked
/// when its mark equals the generation, so unmarking is one increment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Marks {
    marks: Vec<u32>,
    generation: u32,
}

impl Marks {
    /// Unmarked marks for `slots` slots.
    pub fn reset(&mut self, slots: usize) {
        self.marks = vec![0; slots];
        self.generation = 0;
    }

    /// Marks exactly `members`.
    fn mark(&mut self, members: &[u32]) -> Membership<'_> {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.iter_mut().for_each(|mark| *mark = 0);
            self.generation = 1;
        }
        for &slot in members {
            self.marks[slot as usize] = self.generation;
        }
        Membership::Marked {
            marks: &self.marks,
            generation: self.generation,
        }
    }
}

/// The endpoints one request may go to, as slot indices; never empty when handed to an
/// algorithm.
#[derive(Debug)]
pub(crate) struct Candidates<'a> {
    slots: &'a [u32],
    kind: Kind<'a>,
}

#[derive(Debug)]
enum Kind<'a> {
    /// Every member of locality tier `tier`.
    Tier { tier_of: &'a [u16], tier: u16 },
    /// A subset of the eligible endpoints, markable for membership tests; within one tier
    /// (and then ascending) or across tiers.
    Subset {
        marks: &'a mut Marks,
        tier: Option<u16>,
    },
}

/// Where the candidates lie among the locality tiers: what tells an algorithm whether a
/// structure it keeps per tier serves this pick as is, with rejections, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every member of this tier, in the tier's order (the steady state).
    Whole(usize),
    /// Some members of this tier, ascending (a breaker is open).
    Part(usize),
    /// Members of several tiers (no tier has enough admissible members).
    Mixed,
}

impl<'a> Candidates<'a> {
    /// All of tier `tier`: `slots` are its members and `tier_of` gives every slot's tier.
    #[inline]
    pub fn tier(slots: &'a [u32], tier_of: &'a [u16], tier: usize) -> Self {
        Self {
            slots,
            kind: Kind::Tier {
                tier_of,
                tier: tier as u16,
            },
        }
    }

    /// The subset `slots`, with `marks` to test membership in when asked: members of tier
    /// `tier` only, ascending, when it is `Some`.
    #[inline]
    pub fn subset(slots: &'a [u32], marks: &'a mut Marks, tier: Option<usize>) -> Self {
        debug_assert!(
            tier.is_none() || slots.is_sorted(),
            "a subset within one tier must be ascending"
        );
        Self {
            slots,
            kind: Kind::Subset {
                marks,
                tier: tier.map(|tier| tier as u16),
            },
        }
    }

    /// The candidates' slot indices.
    #[inline]
    pub fn slots(&self) -> &'a [u32] {
        self.slots
    }

    /// Where the candidates lie among the tiers.
    #[inline]
    pub fn scope(&self) -> Scope {
        match self.kind {
            Kind::Tier { tier, .. } => Scope::Whole(usize::from(tier)),
            Kind::Subset {
                tier: Some(tier), ..
            } => Scope::Part(usize::from(tier)),
            Kind::Subset { tier: None, .. } => Scope::Mixed,
        }
    }

    /// The position of `slot` among the candidates, if it is one: O(log candidates) for a
    /// whole tier or part of one (both ascending), O(candidates) across tiers.
    #[inline]
    pub fn position(&self, slot: u32) -> Option<usize> {
        match self.scope() {
            Scope::Whole(_) | Scope::Part(_) => self.slots.binary_search(&slot).ok(),
            Scope::Mixed => self.slots.iter().position(|&member| member == slot),
        }
    }

    /// A membership test, for algorithms that walk more than the candidates: O(1) a test
    /// for a whole tier, O(log candidates) for part of one (a binary search); for candidates
    /// across tiers this marks them (O(candidates)), so call it once per pick.
    #[inline]
    pub fn membership(&mut self) -> Membership<'_> {
        match &mut self.kind {
            Kind::Tier { tier_of, tier } => Membership::Tier {
                tier_of,
                tier: *tier,
            },
            Kind::Subset { tier: Some(_), .. } => Membership::Sorted(self.slots),
            Kind::Subset { marks, tier: None } => marks.mark(self.slots),
        }
    }
}

/// Whether a slot is one of the current pick's candidates.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Membership<'a> {
    Tier { tier_of: &'a [u16], tier: u16 },
    Sorted(&'a [u32]),
    Marked { marks: &'a [u32], generation: u32 },
}

impl Membership<'_> {
    #[inline]
    pub fn contains(&self, slot: u32) -> bool {
        match *self {
            Self::Tier { tier_of, tier } => tier_of[slot as usize] == tier,
            Self::Sorted(members) => members.binary_search(&slot).is_ok(),
            Self::Marked { marks, generation } => marks[slot as usize] == generation,
        }
    }
}

/// One lap around `entries` (slot indices, cyclic) from `start`, optionally only the
/// candidates among them. Yields slot indices; copying it restarts nothing, it is a cursor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Walk<'a> {
    entries: &'a [u32],
    next: usize,
    remaining: usize,
    only: Option<Membership<'a>>,
}

impl<'a> Walk<'a> {
    /// Every entry once, from `entries[start % len]`.
    #[inline]
    pub fn lap(entries: &'a [u32], start: usize) -> Self {
        Self {
            entries,
            next: start,
            remaining: entries.len(),
            only: None,
        }
    }

    /// The same walk yielding only the candidates of `membership`.
    #[inline]
    pub fn among(self, membership: Membership<'a>) -> Self {
        Self {
            only: Some(membership),
            ..self
        }
    }

    /// A walk that yields nothing.
    #[inline]
    pub fn empty() -> Self {
        Self::lap(&[], 0)
    }
}

impl Iterator for Walk<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        while self.remaining > 0 {
            let slot = self.entries[self.next % self.entries.len()];
            self.next += 1;
            self.remaining -= 1;
            if self.only.is_none_or(|members| members.contains(slot)) {
                return Some(slot);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lap_visits_every_entry_once_from_its_start_wrapping_around() {
        let entries = [7, 8, 9];
        assert_eq!(Walk::lap(&entries, 1).collect::<Vec<_>>(), [8, 9, 7]);
        assert_eq!(Walk::lap(&entries, 3).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(Walk::empty().count(), 0);
    }

    #[test]
    fn a_walk_among_candidates_skips_the_others_whether_searched_or_marked() {
        let mut marks = Marks::default();
        marks.reset(6);
        let table = [5, 0, 3, 3, 1, 4];
        let first = [1, 3];
        let mut candidates = Candidates::subset(&first, &mut marks, Some(0));
        let walk = Walk::lap(&table, 4).among(candidates.membership());
        assert_eq!(walk.collect::<Vec<_>>(), [1, 3, 3]);
        let second = [0, 4];
        let mut candidates = Candidates::subset(&second, &mut marks, None);
        let walk = Walk::lap(&table, 0).among(candidates.membership());
        assert_eq!(walk.collect::<Vec<_>>(), [0, 4]);
    }

    #[test]
    fn a_tier_s_members_are_the_slots_of_that_tier() {
        let tier_of = [1, 0, 1, u16::MAX];
        let members = [0, 2];
        let mut candidates = Candidates::tier(&members, &tier_of, 1);
        let membership = candidates.membership();
        let found: Vec<u32> = (0..4).filter(|&slot| membership.contains(slot)).collect();
        assert_eq!(found, members);
    }
}
