//! Site ids: one random UUID per database, created once and persisted.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies one database (one device). Ordered by its bytes, which breaks
/// ties between writes with equal clocks.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SiteId(Uuid);

impl SiteId {
    pub fn random() -> SiteId {
        SiteId(Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> SiteId {
        SiteId(Uuid::from_bytes(bytes))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<SiteId> {
        Some(SiteId::from_bytes(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn parse(s: &str) -> Option<SiteId> {
        Uuid::parse_str(s).ok().map(SiteId)
    }
}

impl std::fmt::Display for SiteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::fmt::Debug for SiteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SiteId({})", self.0.hyphenated())
    }
}
