//! The throwaway PostgreSQL of tests/support/postgres.rs: each call gives a
//! new, empty, usable database; the test and durable clusters differ.

mod support;

use support::postgres::{database, durable_database, psql, ENV};

/// The database a URL names.
fn name(url: &str) -> &str {
    let path = url.rsplit('/').next().unwrap();
    path.split('?').next().unwrap()
}

#[test]
fn each_database_is_new_empty_and_usable() {
    let a = database();
    let b = database();
    assert_ne!(a, b);
    assert_eq!(psql(&a, "SELECT 1"), "1");
    assert_eq!(psql(&b, "SELECT 1"), "1");
    assert_eq!(psql(&a, "SELECT current_database()"), name(&a));
    assert_eq!(psql(&b, "SELECT current_database()"), name(&b));
    psql(&a, "CREATE TABLE t (x int)");
    psql(&a, "INSERT INTO t VALUES (7)");
    assert_eq!(psql(&a, "SELECT x FROM t"), "7");
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'";
    assert_eq!(psql(&b, tables), "0");
}

#[test]
fn durable_cluster_is_separate_and_syncs() {
    let durable = durable_database();
    let fast = database();
    assert_ne!(name(&durable), name(&fast));
    if std::env::var_os(ENV).is_some() {
        return; // one existing server for both
    }
    let port = |url: &str| psql(url, "SHOW port");
    assert_ne!(port(&durable), port(&fast));
    assert_eq!(psql(&durable, "SHOW fsync"), "on");
    assert_eq!(psql(&fast, "SHOW fsync"), "off");
    assert_eq!(psql(&durable, "SHOW max_connections"), "300");
}
