//! The merge rules, as a pure function of (local row state, incoming change).
//! Device and server both merge through this module.
//!
//! - A row has a causal length `cl`: odd means it exists, even means deleted.
//! - A change with a higher `cl` wins over every change with a lower one, and
//!   a row moving to a higher `cl` forgets the cells of its old incarnation.
//! - Within the same `cl`, each cell keeps the change with the larger
//!   `(hlc, site)`: total and deterministic.
//!
//! The state after any set of changes is therefore: `cl` = the largest `cl`
//! seen; each cell = the largest version among changes at that `cl`. That is
//! independent of order and repeats, which is what makes sync converge.

use crate::hlc::Hlc;
use crate::site::SiteId;

/// The version of one write. Larger wins; ties are impossible between
/// different sites and harmless within one (same clock, same write).
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Version {
    pub hlc: Hlc,
    pub site: SiteId,
}

/// A cell's current winner, with whatever the caller tracks beside it
/// (the device: where the value comes from and its local db_version).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell<T> {
    pub version: Version,
    pub data: T,
}

/// What a change writes: the row marker (its causal length) or a column,
/// by slot.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Target {
    Marker,
    Column(usize),
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// The change lost or was already known: nothing changed.
    Stale,
    /// The change is now the winner. `reset` says the row moved to a higher
    /// causal length, so every other cell of the row was cleared.
    Won { reset: bool },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RowState<T> {
    pub cl: u64,
    pub marker: Option<Cell<T>>,
    pub cells: Vec<Option<Cell<T>>>,
}

impl<T> RowState<T> {
    /// A row this database has never heard of.
    pub fn unknown() -> Self {
        RowState {
            cl: 0,
            marker: None,
            cells: Vec::new(),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.cl % 2 == 1
    }

    /// Merges one change into the row. Column changes only exist for live
    /// rows (odd `cl`); a column change with an even `cl` can still move
    /// the row forward but stores no cell.
    pub fn merge(&mut self, target: Target, cl: u64, version: Version, data: T) -> Outcome {
        if cl < self.cl {
            return Outcome::Stale;
        }
        let reset = cl > self.cl;
        if reset {
            self.cl = cl;
            self.marker = None;
            self.cells.iter_mut().for_each(|c| *c = None);
        }
        let slot = match target {
            Target::Marker => &mut self.marker,
            Target::Column(_) if cl % 2 == 0 => {
                return if reset {
                    Outcome::Won { reset }
                } else {
                    Outcome::Stale
                }
            }
            Target::Column(i) => {
                if self.cells.len() <= i {
                    self.cells.resize_with(i + 1, || None);
                }
                &mut self.cells[i]
            }
        };
        if slot.as_ref().is_none_or(|c| version > c.version) {
            *slot = Some(Cell { version, data });
            Outcome::Won { reset }
        } else {
            Outcome::Stale
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64, site: u8) -> Version {
        Version {
            hlc: Hlc(hlc),
            site: SiteId::from_bytes([site; 16]),
        }
    }

    #[test]
    fn later_version_wins_and_ties_break_by_site() {
        let mut row = RowState::unknown();
        assert_eq!(
            row.merge(Target::Marker, 1, v(1, 1), "a"),
            Outcome::Won { reset: true }
        );
        assert_eq!(
            row.merge(Target::Column(0), 1, v(5, 1), "x"),
            Outcome::Won { reset: false }
        );
        assert_eq!(
            row.merge(Target::Column(0), 1, v(4, 9), "y"),
            Outcome::Stale
        );
        assert_eq!(
            row.merge(Target::Column(0), 1, v(5, 2), "z"),
            Outcome::Won { reset: false }
        );
        assert_eq!(
            row.merge(Target::Column(0), 1, v(5, 2), "z"),
            Outcome::Stale
        );
        assert_eq!(row.cells[0].as_ref().unwrap().data, "z");
    }

    #[test]
    fn a_delete_beats_concurrent_edits_and_a_reinsert_beats_the_delete() {
        let mut row = RowState::unknown();
        row.merge(Target::Column(0), 1, v(1, 1), "title");
        // The delete (cl 2) clears the row, even against a later clock.
        assert_eq!(
            row.merge(Target::Marker, 2, v(2, 1), ""),
            Outcome::Won { reset: true }
        );
        assert_eq!(
            row.merge(Target::Column(0), 1, v(99, 2), "edit"),
            Outcome::Stale
        );
        assert!(!row.is_alive());
        assert!(row.cells.iter().all(Option::is_none));
        // An insert made after the delete was seen (cl 3) brings it back.
        assert_eq!(
            row.merge(Target::Column(0), 3, v(3, 1), "again"),
            Outcome::Won { reset: true }
        );
        assert!(row.is_alive());
    }

    #[test]
    fn merge_is_order_independent_and_idempotent() {
        let changes = [
            (Target::Marker, 1, v(1, 1), 'a'),
            (Target::Column(0), 1, v(2, 2), 'b'),
            (Target::Column(0), 1, v(3, 1), 'c'),
            (Target::Column(1), 1, v(2, 1), 'd'),
            (Target::Marker, 2, v(4, 2), 'e'),
            (Target::Column(1), 3, v(5, 1), 'f'),
            (Target::Marker, 3, v(5, 1), 'g'),
        ];
        let mut expected: Option<RowState<char>> = None;
        // Every rotation and its reverse, each applied twice.
        for start in 0..changes.len() {
            for reverse in [false, true] {
                let mut order: Vec<_> = changes
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(changes.len())
                    .collect();
                if reverse {
                    order.reverse();
                }
                let mut row = RowState::unknown();
                for &&(t, cl, ver, d) in order.iter().chain(order.iter()) {
                    row.merge(t, cl, ver, d);
                }
                match &expected {
                    None => expected = Some(row),
                    Some(e) => assert_eq!(&row, e),
                }
            }
        }
        let row = expected.unwrap();
        assert_eq!(row.cl, 3);
        assert_eq!(row.marker.unwrap().data, 'g');
        assert_eq!(row.cells.get(1).cloned().flatten().unwrap().data, 'f');
        assert!(row.cells[0].is_none());
    }
}
