//! HTTP content coding of change sets on the wire: zstd (RFC 8878), the
//! same on the device and on the server. Either side may send plain
//! bodies: a pull is compressed only for a client that sends
//! `Accept-Encoding: zstd`, and a push only to a server that answered with
//! `Accept-Encoding: zstd` (RFC 7694), so proxies and other clients keep
//! working.

use std::io::Read;
use std::sync::Mutex;

use zstd::zstd_safe::DCtx;

/// The content coding's token in HTTP headers.
pub const ZSTD: &str = "zstd";

/// Bodies shorter than this go as they are, whatever the other side takes:
/// a change set of one todo row is 110 bytes plain and 111 compressed, and
/// compressing it still costs a context reset (about 50k instructions).
/// Five rows, 286 bytes, compress to 154.
pub const MIN_COMPRESSED_BYTES: usize = 256;

/// zstd's level for change sets. On the benchmark's 100k todo rows (22 MB
/// encoded, in parts of 2.5 MB), level 1 is both the smaller and the faster:
/// 5.43 MB in 69 ms, against 5.57 MB in 83 ms at level 3. Higher levels buy
/// little on this kind of data and cost a device's battery and a server's
/// cores.
const LEVEL: i32 = 1;

/// Contexts kept for the next body: making one allocates and clears
/// hundreds of kilobytes of tables, more work than compressing the few
/// kilobytes of a typical sync. A few are kept, so idle threads hold no
/// memory and a burst of threads makes its own.
struct Pool<T>(Mutex<Vec<T>>);

const POOLED: usize = 4;

impl<T> Pool<T> {
    const fn new() -> Self {
        Pool(Mutex::new(Vec::new()))
    }

    fn with<R>(&self, make: impl FnOnce() -> T, f: impl FnOnce(&mut T) -> R) -> R {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut item = taken.unwrap_or_else(make);
        let out = f(&mut item);
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOLED {
            idle.push(item);
        }
        out
    }
}

static COMPRESSORS: Pool<zstd::bulk::Compressor<'static>> = Pool::new();
static DECOMPRESSORS: Pool<DCtx<'static>> = Pool::new();

/// `body` compressed with zstd.
pub fn compress(body: &[u8]) -> Vec<u8> {
    COMPRESSORS.with(
        || zstd::bulk::Compressor::new(LEVEL).expect("a zstd context"),
        |c| {
            c.compress(body)
                .expect("compressing into memory cannot fail")
        },
    )
}

/// Why a compressed body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// It decodes to more than the limit.
    TooLarge { limit: usize },
    /// It is not a zstd stream.
    Malformed(String),
}

/// `body` decompressed, refusing one that decodes to more than `limit`
/// bytes (a small body can decode to a huge one) without decoding more.
pub fn decompress(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    DECOMPRESSORS.with(DCtx::create, |context| {
        // A context starts each body afresh (`with_context` resets it), and
        // one left mid-frame by an error is reset the same way next time.
        let decoder = zstd::stream::read::Decoder::with_context(body, context);
        let mut out = Vec::new();
        decoder
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if out.len() > limit {
            return Err(DecodeError::TooLarge { limit });
        }
        Ok(out)
    })
}

/// Whether an `Accept-Encoding` header value accepts zstd (listed, and
/// not with `q=0`).
pub fn accepts_zstd(header: &str) -> bool {
    header.split(',').any(|item| {
        let mut fields = item.split(';').map(str::trim);
        let coding = fields.next().unwrap_or("");
        let refused = fields.any(|f| {
            f.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        coding.eq_ignore_ascii_case(ZSTD) && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_comes_back_as_it_was_and_smaller() {
        let body: Vec<u8> = b"buy milk call mom water plants ".repeat(1000);
        let packed = compress(&body);
        assert!(packed.len() * 10 < body.len(), "{}", packed.len());
        assert_eq!(decompress(&packed, body.len()), Ok(body));
    }

    #[test]
    fn a_body_that_decodes_past_the_limit_is_refused() {
        let bomb = compress(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 4096, "{}", bomb.len());
        assert_eq!(
            decompress(&bomb, 1 << 20),
            Err(DecodeError::TooLarge { limit: 1 << 20 })
        );
        assert!(matches!(
            decompress(b"not zstd at all", 1 << 20),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_context_left_by_a_refused_body_decodes_the_next_one_whole() {
        let body: Vec<u8> = b"walk the dog ".repeat(500);
        let packed = compress(&body);
        for _ in 0..2 * POOLED {
            assert!(decompress(&packed[..packed.len() / 2], 1 << 20).is_err());
            assert!(decompress(&compress(&vec![7u8; 1 << 16]), 100).is_err());
            assert_eq!(decompress(&packed, body.len()), Ok(body.clone()));
            assert_eq!(compress(&body), packed, "a reused compressor");
        }
    }

    #[test]
    fn accept_encoding_lists_are_read_with_their_weights() {
        assert!(accepts_zstd("zstd"));
        assert!(accepts_zstd("gzip, ZSTD;q=0.5"));
        assert!(!accepts_zstd("gzip, br"));
        assert!(!accepts_zstd("zstd;q=0"));
        assert!(!accepts_zstd("zstdx"));
        assert!(!accepts_zstd(""));
    }
}
