//! Runs the SQL-level tests in `pg_test/` with psql, each file in a database of its own and each
//! statement in its own transaction, as a client would. A file fails by raising (plpgsql ASSERT or
//! RAISE): psql stops at the first error.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use stageflow_tests::*;

#[test]
fn sql_files_under_pg_test_pass() {
    // The runtime variable, not env!(): a build cache shared between checkouts may hold a test
    // binary compiled in another one.
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test")).join("../../pg_test");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no SQL tests in {}", dir.display());

    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let url = fresh_database(&format!("sql_{name}"));
        let output = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"])
            .arg(file)
            .output()
            .expect("psql runs");
        if output.status.success() {
            println!("pg_test/{name}.sql ok");
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            println!("pg_test/{name}.sql FAILED:\n{stderr}");
            failures.push(format!("{name}: {stderr}"));
        }
    }
    assert!(failures.is_empty(), "failed SQL tests:\n{}", failures.join("\n"));
}
