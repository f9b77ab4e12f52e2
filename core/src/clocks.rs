//! The per-row metadata blob: the clocks of a row's marker and of each of
//! its columns, packed into one value so that a row costs one metadata row,
//! not one per cell.
//!
//! Layout: `format: u8`, `base hlc: u64 LE`, `base site: varint`, then
//! - format `UNIFORM`: `n: varint`: the marker and cells `0..n` all carry the
//!   base stamp (the common case: a row as its insert wrote it);
//! - format `TOMBSTONE`: the marker carries the base stamp, no cells;
//! - format `EXPLICIT`: one entry for the marker, then one per cell slot:
//!   `SAME` (the base stamp), `ABSENT`, or `STAMP hlc: u64 LE, site: varint,
//!   dbv_delta: varint`. Entries missing at the end are absent.
//!
//! The base stamp's db_version is the row's `dbv` column (the row's newest),
//! so it is not repeated here; explicit entries store their distance to it.

use crate::codec::{put_varint, Reader};
use crate::error::{Error, Result};
use crate::hlc::Hlc;

const UNIFORM: u8 = 0;
const EXPLICIT: u8 = 1;
const TOMBSTONE: u8 = 2;

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
    let mut out = Vec::with_capacity(12);
    out.push(UNIFORM);
    out.extend_from_slice(&hlc.0.to_le_bytes());
    put_varint(&mut out, u64::from(site));
    put_varint(&mut out, slots as u64);
    out
}

/// The blob a local delete writes.
pub(crate) fn encode_tombstone(hlc: Hlc, site: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(11);
    out.push(TOMBSTONE);
    out.extend_from_slice(&hlc.0.to_le_bytes());
    put_varint(&mut out, u64::from(site));
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
    /// (which must be the newest db_version among the stamps).
    pub fn encode(&self, row_dbv: u64) -> Vec<u8> {
        let base = self
            .stamps()
            .copied()
            .find(|s| s.dbv == row_dbv)
            .or_else(|| self.stamps().copied().max_by_key(|s| s.dbv));
        let Some(base) = base else {
            // No stamp at all: an explicit, empty entry list.
            let mut out = vec![EXPLICIT];
            out.extend_from_slice(&0u64.to_le_bytes());
            put_varint(&mut out, 0);
            out.push(ABSENT);
            return out;
        };
        let is_base = |s: &Option<Stamp>| s.as_ref() == Some(&base);
        let mut out = Vec::with_capacity(16);
        let header = |out: &mut Vec<u8>, format| {
            out.push(format);
            out.extend_from_slice(&base.hlc.0.to_le_bytes());
            put_varint(out, u64::from(base.site));
        };
        let last_present = self.cells.iter().rposition(Option::is_some);
        if base.dbv == row_dbv && is_base(&self.marker) {
            if last_present.is_none() {
                header(&mut out, TOMBSTONE);
                return out;
            }
            if self.cells.iter().all(is_base) {
                header(&mut out, UNIFORM);
                put_varint(&mut out, self.cells.len() as u64);
                return out;
            }
        }
        header(&mut out, EXPLICIT);
        let used = last_present.map_or(0, |i| i + 1);
        for entry in std::iter::once(&self.marker).chain(&self.cells[..used]) {
            match entry {
                None => out.push(ABSENT),
                Some(s) if *s == base && s.dbv == row_dbv => out.push(SAME),
                Some(s) => {
                    out.push(STAMP);
                    out.extend_from_slice(&s.hlc.0.to_le_bytes());
                    put_varint(&mut out, u64::from(s.site));
                    put_varint(&mut out, row_dbv.saturating_sub(s.dbv));
                }
            }
        }
        out
    }

    pub fn decode(blob: &[u8], row_dbv: u64) -> Result<RowClocks> {
        let mut r = Reader::new(blob);
        let bad = |_| corrupt("truncated clocks");
        let format = r.u8().map_err(bad)?;
        let base = Stamp {
            hlc: Hlc(r.u64_le().map_err(bad)?),
            site: u32::try_from(r.varint().map_err(bad)?).map_err(|_| corrupt("site ordinal"))?,
            dbv: row_dbv,
        };
        match format {
            UNIFORM => {
                let n = r.len("slot count").map_err(bad)?;
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
                            let hlc = Hlc(r.u64_le().map_err(bad)?);
                            let site = u32::try_from(r.varint().map_err(bad)?)
                                .map_err(|_| corrupt("site ordinal"))?;
                            let delta = r.varint().map_err(bad)?;
                            Some(Stamp {
                                hlc,
                                site,
                                dbv: row_dbv.saturating_sub(delta),
                            })
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
        assert_eq!(round_trip(&inserted).len(), 11);
        assert_eq!(inserted.encode(7), encode_uniform(Hlc(1 << 40), 0, 3));
        let deleted = RowClocks {
            marker: s(1 << 41, 2, 9),
            cells: vec![],
        };
        assert_eq!(round_trip(&deleted), encode_tombstone(Hlc(1 << 41), 2));
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
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for blob in [
            &[][..],
            &[7, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
        ] {
            assert!(RowClocks::decode(blob, 1).is_err());
        }
    }
}
