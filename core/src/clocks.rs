//! The per-row metadata blob: the clocks of a row's marker and of each of
//! its columns, packed into one value so that a row costs one metadata row,
//! not one per cell.
//!
//! Layout: `format: u8`, the base stamp (`hlc: u64 LE`, `site: varint`,
//! `row_dbv - dbv: varint`), then
//! - format `UNIFORM`: `n: varint`: the marker and cells `0..n` all carry the
//!   base stamp (the common case: a row as its insert wrote it);
//! - format `TOMBSTONE`: the marker carries the base stamp, no cells;
//! - format `EXPLICIT`: one entry for the marker, then one per cell slot:
//!   `SAME` (the base stamp), `ABSENT`, or `STAMP` followed by the hlc's
//!   distance to the base hlc (zigzag varint), the site (varint) and
//!   `row_dbv - dbv` (varint). Entries missing at the end are absent.
//!
//! The base is the stamp most entries share, and db_versions are stored as
//! distances to the row's `dbv` column (its newest), so a row costs a dozen
//! bytes or two, not 20 per column.

use crate::codec::{put_varint, unzigzag, zigzag, Reader};
use crate::error::{Error, Result};
use crate::hlc::Hlc;

const UNIFORM: u8 = 0;
const EXPLICIT: u8 = 1;
const TOMBSTONE: u8 = 2;

/// SQLite's largest possible column count.
const MAX_SLOTS: u64 = 32767;

const SAME: u8 = 0;
const ABSENT: u8 = 1;
const STAMP: u8 = 2;

/// A write's stamp as stored locally: the site is an ordinal into
/// `confluo_sites` (0 is this database).
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    pub hlc: Hlc,
    pub site: u32,
    pub dbv: u64,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub(crate) struct RowClocks {
    pub marker: Option<Stamp>,
    pub cells: Vec<Option<Stamp>>,
}

fn corrupt(what: &str) -> Error {
    Error::Sqlite {
        message: format!("corrupt confluo metadata: {what}"),
        code: None,
    }
}

/// The blob a local insert writes: every cell stamped alike.
pub(crate) fn encode_uniform(hlc: Hlc, site: u32, slots: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(13);
    out.push(UNIFORM);
    put_base(&mut out, hlc, site, 0);
    put_varint(&mut out, slots as u64);
    out
}

fn put_base(out: &mut Vec<u8>, hlc: Hlc, site: u32, dbv_delta: u64) {
    out.extend_from_slice(&hlc.0.to_le_bytes());
    put_varint(out, u64::from(site));
    put_varint(out, dbv_delta);
}

/// The blob a local delete writes.
pub(crate) fn encode_tombstone(hlc: Hlc, site: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.push(TOMBSTONE);
    put_base(&mut out, hlc, site, 0);
    out
}

impl RowClocks {
    /// The newest db_version among the row's stamps.
    #[cfg(test)]
    fn max_dbv(&self) -> u64 {
        self.stamps().map(|s| s.dbv).max().unwrap_or(0)
    }

    fn stamps(&self) -> impl Iterator<Item = &Stamp> {
        self.marker.iter().chain(self.cells.iter().flatten())
    }

    /// Encodes the clocks of a row whose `dbv` column is `row_dbv`
    /// (the newest db_version among the stamps).
    pub fn encode(&self, row_dbv: u64) -> Vec<u8> {
        // The common row (every cell as one transaction wrote it), without
        // looking for the most common stamp: what the search would find.
        if let Some(marker) = self.marker {
            if !self.cells.is_empty() && self.cells.iter().all(|c| *c == Some(marker)) {
                let mut out = Vec::with_capacity(16);
                out.push(UNIFORM);
                put_base(
                    &mut out,
                    marker.hlc,
                    marker.site,
                    row_dbv.saturating_sub(marker.dbv),
                );
                put_varint(&mut out, self.cells.len() as u64);
                return out;
            }
        }
        self.encode_on_most_common(row_dbv)
    }

    /// `encode` for any row: the base is the stamp most entries carry.
    fn encode_on_most_common(&self, row_dbv: u64) -> Vec<u8> {
        let entries: Vec<&Stamp> = self.stamps().collect();
        // The most common stamp is the base (ties: the first seen).
        let base = entries
            .iter()
            .max_by_key(|s| {
                let count = entries.iter().filter(|o| o == s).count();
                let first = entries.iter().position(|o| o == *s).unwrap_or(0);
                (count, usize::MAX - first)
            })
            .map(|s| **s);
        let mut out = Vec::with_capacity(16);
        let Some(base) = base else {
            // No stamp at all: an explicit, empty entry list.
            out.push(EXPLICIT);
            put_base(&mut out, Hlc(0), 0, 0);
            return out;
        };
        let dbv_delta = |s: &Stamp| row_dbv.saturating_sub(s.dbv);
        let is_base = |s: &Option<Stamp>| s.as_ref() == Some(&base);
        let last_present = self.cells.iter().rposition(Option::is_some);
        if is_base(&self.marker) {
            if last_present.is_none() {
                out.push(TOMBSTONE);
                put_base(&mut out, base.hlc, base.site, dbv_delta(&base));
                return out;
            }
            if self.cells.iter().all(is_base) {
                out.push(UNIFORM);
                put_base(&mut out, base.hlc, base.site, dbv_delta(&base));
                put_varint(&mut out, self.cells.len() as u64);
                return out;
            }
        }
        out.push(EXPLICIT);
        put_base(&mut out, base.hlc, base.site, dbv_delta(&base));
        let used = last_present.map_or(0, |i| i + 1);
        for entry in std::iter::once(&self.marker).chain(&self.cells[..used]) {
            match entry {
                None => out.push(ABSENT),
                Some(s) if *s == base => out.push(SAME),
                Some(s) => {
                    out.push(STAMP);
                    put_varint(&mut out, zigzag(s.hlc.0.wrapping_sub(base.hlc.0) as i64));
                    put_varint(&mut out, u64::from(s.site));
                    put_varint(&mut out, dbv_delta(s));
                }
            }
        }
        out
    }

    pub fn decode(blob: &[u8], row_dbv: u64) -> Result<RowClocks> {
        let mut r = Reader::new(blob);
        let bad = |_| corrupt("truncated clocks");
        let site = |r: &mut Reader| -> Result<u32> {
            u32::try_from(r.varint().map_err(bad)?).map_err(|_| corrupt("site ordinal"))
        };
        let format = r.u8().map_err(bad)?;
        let base = Stamp {
            hlc: Hlc(r.u64_le().map_err(bad)?),
            site: site(&mut r)?,
            dbv: row_dbv.saturating_sub(r.varint().map_err(bad)?),
        };
        match format {
            UNIFORM => {
                // The count is not bounded by the blob's length (that is the
                // point of the format), only by SQLite's column limit.
                let n = r.varint().map_err(bad)?;
                if n > MAX_SLOTS {
                    return Err(corrupt("slot count"));
                }
                let n = n as usize;
                Ok(RowClocks {
                    marker: Some(base),
                    cells: vec![Some(base); n],
                })
            }
            TOMBSTONE => Ok(RowClocks {
                marker: Some(base),
                cells: Vec::new(),
            }),
            EXPLICIT => {
                let mut entries = Vec::new();
                while !r.is_empty() {
                    entries.push(match r.u8().map_err(bad)? {
                        SAME => Some(base),
                        ABSENT => None,
                        STAMP => {
                            let delta = unzigzag(r.varint().map_err(bad)?);
                            let hlc = Hlc(base.hlc.0.wrapping_add(delta as u64));
                            let site = site(&mut r)?;
                            let dbv = row_dbv.saturating_sub(r.varint().map_err(bad)?);
                            Some(Stamp { hlc, site, dbv })
                        }
                        _ => return Err(corrupt("unknown clock entry")),
                    });
                }
                let mut entries = entries.into_iter();
                let marker = entries.next().flatten();
                Ok(RowClocks {
                    marker,
                    cells: entries.collect(),
                })
            }
            _ => Err(corrupt("unknown clocks format")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uniform_row_of_many_columns_decodes() {
        let hlc = Hlc(99);
        for slots in [0, 1, 12, 13, 17, 200] {
            let clocks = RowClocks::decode(&encode_uniform(hlc, 0, slots), 5).unwrap();
            assert_eq!(clocks.cells.len(), slots);
            assert!(clocks.cells.iter().all(|c| c.is_some_and(|s| s.hlc == hlc)));
        }
    }

    fn s(hlc: u64, site: u32, dbv: u64) -> Option<Stamp> {
        Some(Stamp {
            hlc: Hlc(hlc),
            site,
            dbv,
        })
    }

    fn round_trip(c: &RowClocks) -> Vec<u8> {
        let dbv = c.max_dbv();
        let blob = c.encode(dbv);
        let mut back = RowClocks::decode(&blob, dbv).unwrap();
        // Trailing absent cells are not stored.
        back.cells.resize(c.cells.len(), None);
        assert_eq!(&back, c);
        blob
    }

    #[test]
    fn the_common_shapes_are_compact() {
        let inserted = RowClocks {
            marker: s(1 << 40, 0, 7),
            cells: vec![s(1 << 40, 0, 7); 3],
        };
        assert_eq!(round_trip(&inserted).len(), 12);
        assert_eq!(inserted.encode(7), encode_uniform(Hlc(1 << 40), 0, 3));
        let deleted = RowClocks {
            marker: s(1 << 41, 2, 9),
            cells: vec![],
        };
        assert_eq!(round_trip(&deleted), encode_tombstone(Hlc(1 << 41), 2));
    }

    #[test]
    fn a_uniform_row_is_encoded_as_the_search_for_a_base_would() {
        // The row's dbv ahead of the stamps', so the distance is stored too.
        for (cells, row_dbv) in [(1, 7), (3, 7), (3, 12), (40, 1_000)] {
            let row = RowClocks {
                marker: s(1 << 40, 5, 7),
                cells: vec![s(1 << 40, 5, 7); cells],
            };
            assert_eq!(row.encode(row_dbv), row.encode_on_most_common(row_dbv));
        }
    }

    #[test]
    fn mixed_stamps_round_trip() {
        round_trip(&RowClocks {
            marker: s(10, 0, 3),
            cells: vec![s(10, 0, 3), None, s(99, 4, 12), s(50, 1, 3), None],
        });
        round_trip(&RowClocks {
            marker: None,
            cells: vec![s(5, 1, 2)],
        });
        round_trip(&RowClocks::default());
        // One column updated: the others stay the base, the new stamp is short.
        let old = s(1 << 50, 0, 4);
        let new = s((1 << 50) + 65_536_000, 0, 9);
        let updated = RowClocks {
            marker: old,
            cells: vec![old, new, old],
        };
        assert_eq!(round_trip(&updated).len(), 21);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for blob in [
            &[][..],
            &[7, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x80],
        ] {
            assert!(RowClocks::decode(blob, 1).is_err());
        }
    }
}
