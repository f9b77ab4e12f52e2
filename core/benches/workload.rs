//! The todo workload both benchmarks use: 100,000 rows with random UUID
//! ids and about 190 bytes of text each, the same rows on every run.

use rand::{Rng, SeedableRng};

pub const ROWS: usize = 100_000;
pub const SCHEMA: &str =
    "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT, body TEXT)";

pub struct Row {
    pub id: String,
    pub title: String,
    pub status: &'static str,
    pub body: String,
}

fn words(rng: &mut impl Rng, len: usize) -> String {
    const WORDS: &[&str] = &[
        "buy", "milk", "call", "mom", "water", "plants", "fix", "bike", "book", "flight", "pay",
        "rent",
    ];
    let mut s = String::with_capacity(len + 8);
    while s.len() < len {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s.truncate(len);
    s
}

pub fn workload() -> Vec<Row> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..ROWS)
        .map(|_| Row {
            id: uuid::Uuid::from_u128(rng.random()).to_string(),
            title: words(&mut rng, 40),
            status: "in_progress",
            body: words(&mut rng, 140),
        })
        .collect()
}
