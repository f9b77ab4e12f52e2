//! Changes and change sets: what one database sends another. The binary
//! encoding is what goes on the wire; serde gives a readable debug form.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{put_bytes, put_value, put_varint, Reader};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::site::SiteId;
use crate::value::Value;

const MAGIC: &[u8; 4] = b"CFCS";
/// Version of the binary encoding; a decoder refuses versions it does not know.
pub const FORMAT_VERSION: u8 = 1;
const MAX_NAME_BYTES: usize = 1024;

/// One write to one cell, or to a row's existence (`column: None`, the row
/// marker, whose `cl` says whether the row exists: odd yes, even no).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub table: Arc<str>,
    pub pk: Arc<[Value]>,
    pub column: Option<Arc<str>>,
    pub value: Value,
    pub hlc: Hlc,
    pub site: SiteId,
    /// The row's causal length when this was written.
    pub cl: u64,
    /// The sender's db_version that recorded this change.
    pub db_version: u64,
    /// Position within `db_version`, assigned when the set was made.
    pub seq: u32,
}

/// The changes one database sends another, with what they cover:
/// everything `source` recorded after db_version `since` up to `until`,
/// except, when `recipient` is set, changes that originated there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeSet {
    pub source: SiteId,
    pub recipient: Option<SiteId>,
    pub since: u64,
    pub until: u64,
    pub changes: Vec<Change>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// The compact binary form. Consecutive changes of one row share its
    /// table, key and causal length; stamps are written relative to the
    /// row's first change when they differ.
    pub fn encode(&self) -> Vec<u8> {
        let mut names: Interner<Arc<str>> = Interner::default();
        let mut sites: Interner<SiteId> = Interner::default();
        let mut groups: Vec<&[Change]> = Vec::new();
        let mut start = 0;
        for i in 1..=self.changes.len() {
            let boundary = i == self.changes.len() || {
                let (a, b) = (&self.changes[i - 1], &self.changes[i]);
                !(a.table == b.table && a.pk == b.pk && a.cl == b.cl)
            };
            if boundary {
                groups.push(&self.changes[start..i]);
                start = i;
            }
        }
        let mut body = Vec::with_capacity(self.changes.len() * 48);
        put_varint(&mut body, groups.len() as u64);
        let mut seqs = SeqCounter::default();
        for group in groups {
            let first = &group[0];
            put_varint(&mut body, names.index(&first.table));
            put_varint(&mut body, first.pk.len() as u64);
            for v in first.pk.iter() {
                put_value(&mut body, v);
            }
            put_varint(&mut body, first.cl);
            body.extend_from_slice(&first.hlc.0.to_le_bytes());
            put_varint(&mut body, sites.index(&first.site));
            put_varint(&mut body, first.db_version);
            put_varint(&mut body, group.len() as u64);
            for c in group {
                let same_stamp =
                    c.hlc == first.hlc && c.site == first.site && c.db_version == first.db_version;
                let implied_seq = seqs.next(c.db_version);
                let mut flags = 0u8;
                if c.column.is_some() {
                    flags |= 1;
                }
                if !same_stamp {
                    flags |= 2;
                }
                if c.seq != implied_seq {
                    flags |= 4;
                }
                body.push(flags);
                if let Some(col) = &c.column {
                    put_varint(&mut body, names.index(col));
                }
                if !same_stamp {
                    body.extend_from_slice(&c.hlc.0.to_le_bytes());
                    put_varint(&mut body, sites.index(&c.site));
                    put_varint(&mut body, c.db_version);
                }
                if c.seq != implied_seq {
                    put_varint(&mut body, u64::from(c.seq));
                }
                put_value(&mut body, &c.value);
                seqs.saw(c.db_version, c.seq);
            }
        }

        let mut out =
            Vec::with_capacity(body.len() + 64 + 16 * (names.items.len() + sites.items.len()));
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(u8::from(self.recipient.is_some()));
        out.extend_from_slice(self.source.as_bytes());
        if let Some(r) = &self.recipient {
            out.extend_from_slice(r.as_bytes());
        }
        put_varint(&mut out, self.since);
        put_varint(&mut out, self.until);
        put_varint(&mut out, names.items.len() as u64);
        for n in &names.items {
            put_bytes(&mut out, n.as_bytes());
        }
        put_varint(&mut out, sites.items.len() as u64);
        for s in &sites.items {
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&body);
        out
    }

    /// Decodes the binary form. Truncated, corrupted or unknown input is an
    /// error, never a panic; values are checked for shape only (limits and
    /// names are checked by `apply`).
    pub fn decode(bytes: &[u8]) -> Result<ChangeSet> {
        Self::decode_at_most(bytes, usize::MAX)
    }

    /// `decode`, refusing (with `Error::InvalidInput`) a change set of more
    /// than `max_changes` changes before it holds them all in memory: a
    /// receiver's memory stays bounded whatever the bytes say.
    pub fn decode_at_most(bytes: &[u8], max_changes: usize) -> Result<ChangeSet> {
        let mut r = Reader::new(bytes);
        let Header {
            source,
            recipient,
            since,
            until,
            names,
            sites,
        } = Header::read(&mut r)?;
        let group_count = r.len("group count")?;
        let mut changes = Vec::with_capacity(group_count.min(r.remaining()).min(1 << 16));
        let mut seqs = SeqCounter::default();
        for _ in 0..group_count {
            let (table, pk_len) = read_group_key(&mut r, names.len())?;
            let table = names[table].clone();
            let mut pk = Vec::with_capacity(pk_len.min(r.remaining()));
            for _ in 0..pk_len {
                pk.push(r.value(usize::MAX)?);
            }
            let pk: Arc<[Value]> = pk.into();
            let group = GroupStamp::read(&mut r, sites.len())?;
            let (cl, base_hlc, base_site, base_dbv) =
                (group.cl, Hlc(group.hlc), sites[group.site], group.dbv);
            for _ in 0..group.changes {
                let head = ChangeHead::read(&mut r, names.len(), sites.len())?;
                let column = head.column.map(|i| names[i].clone());
                let (hlc, site, db_version) = match head.stamp {
                    Some((hlc, site, dbv)) => (Hlc(hlc), sites[site], dbv),
                    None => (base_hlc, base_site, base_dbv),
                };
                let seq = match head.seq {
                    Some(seq) => {
                        u32::try_from(seq).map_err(|_| Error::malformed("seq out of range"))?
                    }
                    None => seqs.next(db_version),
                };
                let value = r.value(usize::MAX)?;
                seqs.saw(db_version, seq);
                if changes.len() == max_changes {
                    return Err(Error::invalid(format!(
                        "more than {max_changes} changes in one change set"
                    )));
                }
                changes.push(Change {
                    table: table.clone(),
                    pk: pk.clone(),
                    column,
                    value,
                    hlc,
                    site,
                    cl,
                    db_version,
                    seq,
                });
            }
        }
        if !r.is_empty() {
            return Err(Error::malformed(format!(
                "{} trailing bytes",
                r.remaining()
            )));
        }
        Ok(ChangeSet {
            source,
            recipient,
            since,
            until,
            changes,
        })
    }

    /// The tables an encoded change set writes, each with the number of
    /// values of its keys: every distinct pair, in order of appearance.
    /// Reads the whole set, with `decode`'s checks of its structure, but
    /// keeps no value: a receiver checks a large set's keys against what
    /// it knows at a fraction of a decode's cost.
    pub fn key_shapes(bytes: &[u8]) -> Result<Vec<(Arc<str>, usize)>> {
        let mut r = Reader::new(bytes);
        let Header { names, sites, .. } = Header::read(&mut r)?;
        let mut shapes: Vec<(usize, usize)> = Vec::new();
        let group_count = r.len("group count")?;
        for _ in 0..group_count {
            let shape = read_group_key(&mut r, names.len())?;
            for _ in 0..shape.1 {
                r.skip_value()?;
            }
            if !shapes.contains(&shape) {
                shapes.push(shape);
            }
            let group = GroupStamp::read(&mut r, sites.len())?;
            for _ in 0..group.changes {
                ChangeHead::read(&mut r, names.len(), sites.len())?;
                r.skip_value()?;
            }
        }
        if !r.is_empty() {
            return Err(Error::malformed(format!(
                "{} trailing bytes",
                r.remaining()
            )));
        }
        Ok(shapes
            .into_iter()
            .map(|(table, arity)| (names[table].clone(), arity))
            .collect())
    }
}

/// An index into the header's names or sites, checked against their count.
fn read_index(r: &mut Reader, len: usize, what: &str) -> Result<usize> {
    let i = r.varint()?;
    if i >= len as u64 {
        return Err(Error::malformed(format!("{what} index {i} out of range")));
    }
    Ok(i as usize)
}

/// A group's table (a name index) and how many values its key has; the key
/// values follow.
fn read_group_key(r: &mut Reader, names: usize) -> Result<(usize, usize)> {
    let table = read_index(r, names, "name")?;
    Ok((table, r.len("key length")?))
}

/// What follows a group's key: the row's causal length, the stamp its
/// changes share unless they carry their own, and how many changes follow.
struct GroupStamp {
    cl: u64,
    hlc: u64,
    site: usize,
    dbv: u64,
    changes: usize,
}

impl GroupStamp {
    fn read(r: &mut Reader, sites: usize) -> Result<GroupStamp> {
        let cl = r.varint()?;
        let hlc = r.u64_le()?;
        let site = read_index(r, sites, "site")?;
        let dbv = r.varint()?;
        let changes = r.len("change count")?;
        if changes == 0 {
            return Err(Error::malformed("empty change group"));
        }
        Ok(GroupStamp {
            cl,
            hlc,
            site,
            dbv,
            changes,
        })
    }
}

/// One change up to its value, as its flags say: a column (a name index;
/// none for a row-level change), its own stamp, its own sequence number.
struct ChangeHead {
    column: Option<usize>,
    stamp: Option<(u64, usize, u64)>,
    seq: Option<u64>,
}

impl ChangeHead {
    fn read(r: &mut Reader, names: usize, sites: usize) -> Result<ChangeHead> {
        let flags = r.u8()?;
        if flags > 7 {
            return Err(Error::malformed("unknown change flags"));
        }
        let column = if flags & 1 != 0 {
            Some(read_index(r, names, "name")?)
        } else {
            None
        };
        let stamp = if flags & 2 != 0 {
            Some((r.u64_le()?, read_index(r, sites, "site")?, r.varint()?))
        } else {
            None
        };
        let seq = if flags & 4 != 0 {
            Some(r.varint()?)
        } else {
            None
        };
        Ok(ChangeHead { column, stamp, seq })
    }
}

/// What precedes a change set's rows: who sent it, what it covers, and the
/// names and sites its rows refer to by index.
struct Header {
    source: SiteId,
    recipient: Option<SiteId>,
    since: u64,
    until: u64,
    names: Vec<Arc<str>>,
    sites: Vec<SiteId>,
}

impl Header {
    fn read(r: &mut Reader) -> Result<Header> {
        if r.take(4).map_err(|_| Error::malformed("too short"))? != MAGIC {
            return Err(Error::malformed("not a Confluo change set"));
        }
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(Error::malformed(format!(
                "change set format {version} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let flags = r.u8()?;
        if flags > 1 {
            return Err(Error::malformed("unknown header flags"));
        }
        let site = |r: &mut Reader| -> Result<SiteId> {
            Ok(SiteId::from_slice(r.take(16)?).expect("16 bytes"))
        };
        let source = site(r)?;
        let recipient = if flags & 1 == 1 { Some(site(r)?) } else { None };
        let since = r.varint()?;
        let until = r.varint()?;
        let name_count = r.len("name count")?;
        let mut names: Vec<Arc<str>> = Vec::with_capacity(name_count.min(r.remaining()));
        for _ in 0..name_count {
            names.push(Arc::from(r.str(MAX_NAME_BYTES)?));
        }
        let site_count = r.len("site count")?;
        let mut sites = Vec::with_capacity(site_count.min(r.remaining() / 16));
        for _ in 0..site_count {
            sites.push(site(r)?);
        }
        Ok(Header {
            source,
            recipient,
            since,
            until,
            names,
            sites,
        })
    }
}

/// Seq runs 0, 1, 2... within each db_version in the order changes appear;
/// the encoding only spells it out when it breaks that pattern.
///
/// The last db_version seen is kept aside from the map: consecutive
/// changes mostly share one, and then cost no hashing.
#[derive(Default)]
struct SeqCounter {
    last: Option<(u64, u32)>,
    earlier: HashMap<u64, u32>,
}

impl SeqCounter {
    fn next(&self, db_version: u64) -> u32 {
        match self.last {
            Some((v, seq)) if v == db_version => seq.wrapping_add(1),
            _ => self
                .earlier
                .get(&db_version)
                .map_or(0, |s| s.wrapping_add(1)),
        }
    }

    fn saw(&mut self, db_version: u64, seq: u32) {
        if let Some((v, last)) = self.last.filter(|(v, _)| *v != db_version) {
            self.earlier.insert(v, last);
        }
        self.last = Some((db_version, seq));
    }
}

struct Interner<T> {
    items: Vec<T>,
    index: HashMap<T, u64>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

/// Up to this many items an interner searches its list: a row's cells (as
/// the server stores them) name a few columns and sites, and hashing them
/// cost more than comparing.
const INTERNER_LIST: usize = 8;

impl<T: Clone + Eq + std::hash::Hash> Interner<T> {
    fn index(&mut self, item: &T) -> u64 {
        if self.items.len() <= INTERNER_LIST {
            if let Some(i) = self.items.iter().position(|x| x == item) {
                return i as u64;
            }
        } else if let Some(&i) = self.index.get(item) {
            return i;
        }
        let i = self.items.len() as u64;
        self.items.push(item.clone());
        if self.items.len() > INTERNER_LIST {
            if self.index.is_empty() {
                // The list outgrew searching: hashed from now on.
                let all = self.items.iter().enumerate();
                self.index.extend(all.map(|(j, x)| (x.clone(), j as u64)));
            } else {
                self.index.insert(item.clone(), i);
            }
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChangeSet {
        let site_a = SiteId::from_bytes([1; 16]);
        let site_b = SiteId::from_bytes([2; 16]);
        let table: Arc<str> = Arc::from("todo");
        let pk: Arc<[Value]> = vec![Value::Text("k1".into())].into();
        let mk = |column: Option<&str>, value: Value, hlc, site, cl, dbv, seq| Change {
            table: table.clone(),
            pk: pk.clone(),
            column: column.map(Arc::from),
            value,
            hlc: Hlc(hlc),
            site,
            cl,
            db_version: dbv,
            seq,
        };
        ChangeSet {
            source: site_a,
            recipient: Some(site_b),
            since: 3,
            until: 9,
            changes: vec![
                mk(None, Value::Null, 100, site_a, 1, 4, 0),
                mk(
                    Some("title"),
                    Value::Text("Buy".into()),
                    100,
                    site_a,
                    1,
                    4,
                    1,
                ),
                mk(Some("n"), Value::Integer(i64::MIN), 250, site_b, 1, 7, 0),
                mk(Some("x"), Value::Real(-0.0), 250, site_b, 1, 7, 5),
                mk(None, Value::Null, 300, site_b, 2, 8, 0),
            ],
        }
    }

    #[test]
    fn binary_encoding_round_trips() {
        let cs = sample();
        let bytes = cs.encode();
        assert_eq!(ChangeSet::decode(&bytes).unwrap(), cs);
        let empty = ChangeSet {
            changes: vec![],
            recipient: None,
            ..cs
        };
        assert_eq!(ChangeSet::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn serde_form_round_trips() {
        let cs = sample();
        let json = serde_json::to_string(&cs).unwrap();
        assert!(json.contains("\"title\""));
        assert_eq!(serde_json::from_str::<ChangeSet>(&json).unwrap(), cs);
    }

    #[test]
    fn key_shapes_are_read_without_decoding() {
        let mut cs = sample();
        let wide: Arc<[Value]> = vec![Value::Integer(1), Value::Blob(vec![2])].into();
        cs.changes.push(Change {
            table: Arc::from("pair"),
            pk: wide.clone(),
            ..cs.changes[0].clone()
        });
        cs.changes.push(Change {
            pk: vec![Value::Null].into(),
            cl: 3,
            ..cs.changes[0].clone()
        });
        let shapes = ChangeSet::key_shapes(&cs.encode()).unwrap();
        let expected: Vec<(Arc<str>, usize)> = vec![(Arc::from("todo"), 1), (Arc::from("pair"), 2)];
        assert_eq!(shapes, expected);
        // Bad input is refused as `decode` refuses it.
        let bytes = cs.encode();
        for cut in 0..bytes.len() {
            assert!(ChangeSet::key_shapes(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn many_names_and_sites_round_trip() {
        // Past the interners' short lists, into their hash maps.
        let mut cs = sample();
        let first = cs.changes[0].clone();
        for i in 0..40u8 {
            cs.changes.push(Change {
                column: Some(Arc::from(format!("c{}", i % 20))),
                site: SiteId::from_bytes([i % 13 + 10; 16]),
                hlc: Hlc(1000 + u64::from(i)),
                cl: 9,
                ..first.clone()
            });
        }
        assert_eq!(ChangeSet::decode(&cs.encode()).unwrap(), cs);
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let err = ChangeSet::decode(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, Error::MalformedChangeSet(_)),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = ChangeSet::decode(&b);
            }
        }
        let mut wrong_version = bytes.clone();
        wrong_version[4] = 99;
        assert!(ChangeSet::decode(&wrong_version)
            .unwrap_err()
            .to_string()
            .contains("format 99"));
    }
}
