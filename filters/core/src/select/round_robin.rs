//! Round robin: each admissible candidate in turn, ignoring weights.
//!
//! Envoy's unweighted `ROUND_ROBIN`. The cursor is shared across candidate sets, so when
//! endpoints are ejected or return the rotation continues without restarting.

/// The position to pick, advancing `cursor`.
pub(crate) fn pick(candidates_len: usize, cursor: &mut u64) -> usize {
    if candidates_len == 0 {
        return 0;
    }
    let position = (*cursor % candidates_len as u64) as usize;
    *cursor = cursor.wrapping_add(1);
    position
}
