//! Byte-level encoding shared by the wire format and the metadata blobs:
//! LEB128 varints, tagged values and packed primary keys. Every read is
//! bounds-checked and returns a typed error on bad input.

use crate::error::{Error, Result};
use crate::value::Value;

const TAG_NULL: u8 = 0;
const TAG_INTEGER: u8 = 1;
const TAG_REAL: u8 = 2;
const TAG_TEXT: u8 = 3;
const TAG_BLOB: u8 = 4;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub(crate) fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(TAG_NULL),
        Value::Integer(i) => {
            out.push(TAG_INTEGER);
            put_varint(out, zigzag(*i));
        }
        Value::Real(f) => {
            out.push(TAG_REAL);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Text(s) => {
            out.push(TAG_TEXT);
            put_bytes(out, s.as_bytes());
        }
        Value::Blob(b) => {
            out.push(TAG_BLOB);
            put_bytes(out, b);
        }
    }
}

/// Packs a composite primary key into one blob: the values, tagged, in
/// primary-key order. Single-column keys are stored as the value itself.
pub fn pack_values(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.iter().map(|v| v.payload_len() + 2).sum());
    for v in values {
        put_value(&mut out, v);
    }
    out
}

pub fn unpack_values(bytes: &[u8]) -> Result<Vec<Value>> {
    let mut r = Reader::new(bytes);
    let mut values = Vec::new();
    while !r.is_empty() {
        values.push(r.value(usize::MAX)?);
    }
    Ok(values)
}

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::malformed(format!(
                "truncated: needed {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u64_le(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Error::malformed("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::malformed("varint longer than 10 bytes"))
    }

    /// A varint used as a count or index: bounded so that a hostile count
    /// cannot make us allocate more than the input could describe.
    pub fn len(&mut self, what: &str) -> Result<usize> {
        let v = self.varint()?;
        if v > self.bytes.len() as u64 {
            return Err(Error::malformed(format!(
                "{what} {v} is larger than the whole input"
            )));
        }
        Ok(v as usize)
    }

    pub fn bytes(&mut self, max_len: usize) -> Result<&'a [u8]> {
        let n = self.len("length")?;
        if n > max_len {
            return Err(Error::invalid(format!(
                "value of {n} bytes exceeds the limit of {max_len} bytes"
            )));
        }
        self.take(n)
    }

    pub fn str(&mut self, max_len: usize) -> Result<&'a str> {
        std::str::from_utf8(self.bytes(max_len)?)
            .map_err(|_| Error::malformed("text is not valid UTF-8"))
    }

    /// Reads past a value, checking it as `value` does.
    pub fn skip_value(&mut self) -> Result<()> {
        match self.u8()? {
            TAG_NULL => {}
            TAG_INTEGER => {
                self.varint()?;
            }
            TAG_REAL => {
                if f64::from_bits(self.u64_le()?).is_nan() {
                    return Err(Error::invalid("NaN is not a value SQLite keeps"));
                }
            }
            TAG_TEXT => {
                self.str(usize::MAX)?;
            }
            TAG_BLOB => {
                self.bytes(usize::MAX)?;
            }
            tag => return Err(Error::malformed(format!("unknown value tag {tag}"))),
        }
        Ok(())
    }

    pub fn value(&mut self, max_len: usize) -> Result<Value> {
        Ok(match self.u8()? {
            TAG_NULL => Value::Null,
            TAG_INTEGER => Value::Integer(unzigzag(self.varint()?)),
            TAG_REAL => {
                let f = f64::from_bits(self.u64_le()?);
                if f.is_nan() {
                    // SQLite stores NaN as NULL, so no honest peer sends one.
                    return Err(Error::invalid("NaN is not a value SQLite keeps"));
                }
                Value::Real(f)
            }
            TAG_TEXT => Value::Text(self.str(max_len)?.to_owned()),
            TAG_BLOB => Value::Blob(self.bytes(max_len)?.to_vec()),
            tag => return Err(Error::malformed(format!("unknown value tag {tag}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint().unwrap(), v);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn overlong_varints_are_rejected() {
        let bytes = [0xff; 11];
        assert!(Reader::new(&bytes).varint().is_err());
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&bytes).varint().is_err());
    }

    #[test]
    fn values_round_trip_exactly() {
        let values = vec![
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Integer(i64::MAX),
            Value::Integer(-1),
            Value::Real(-0.0),
            Value::Real(f64::MIN_POSITIVE / 4.0),
            Value::Real(f64::INFINITY),
            Value::Real(f64::NEG_INFINITY),
            Value::Text("naïve 日本 🚀".into()),
            Value::Text(String::new()),
            Value::Blob(vec![]),
            Value::Blob(vec![0, 255, 1]),
        ];
        assert_eq!(unpack_values(&pack_values(&values)).unwrap(), values);
    }

    #[test]
    fn truncated_and_bad_tags_are_errors() {
        let packed = pack_values(&[Value::Text("hello".into())]);
        for cut in 1..packed.len() {
            assert!(unpack_values(&packed[..cut]).is_err());
        }
        assert!(unpack_values(&[9]).is_err());
        let mut nan = vec![TAG_REAL];
        nan.extend_from_slice(&f64::NAN.to_bits().to_le_bytes());
        assert!(unpack_values(&nan).is_err());
    }
}
