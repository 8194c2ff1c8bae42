//! The private cluster (`stageflow cluster`, what the demo and the tests use): every login needs
//! its password, which only the cluster's owner can read; a directory given as a symbolic link
//! is refused before anything is handed to the `postgres` user.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output, Stdio};

fn stageflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stageflow")).args(args).stdin(Stdio::null()).output().expect("stageflow runs")
}

struct Stop(std::path::PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = stageflow(&["cluster", "stop", "--dir", self.0.to_str().unwrap(), "--mode", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_cluster_asks_every_login_for_a_password_only_its_owner_can_read() {
    let dir = std::env::temp_dir().join(format!("stageflow-cluster-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _stop = Stop(dir.clone());
    let started = stageflow(&["cluster", "start", "--dir", dir.to_str().unwrap()]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let url = String::from_utf8(started.stdout).unwrap().trim().to_owned();
    // postgres://postgres:<64 hex>@127.0.0.1:<port>/postgres
    let (userinfo, host) = url.strip_prefix("postgres://").unwrap().split_once('@').unwrap();
    let (user, password) = userinfo.split_once(':').expect("a password in the URL");
    assert_eq!(user, "postgres");
    assert!(password.len() == 64 && password.chars().all(|c| c.is_ascii_hexdigit()), "{password}");

    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let method: String =
        client.query_one("SELECT string_agg(DISTINCT auth_method, ',') FROM pg_hba_file_rules", &[]).unwrap().get(0);
    assert_eq!(method, "scram-sha-256", "every pg_hba.conf line asks for a password");
    let wrong = format!("postgres://postgres:wrong@{host}");
    let error = postgres::Client::connect(&wrong, postgres::NoTls).err().unwrap_or_else(|| panic!("{wrong} connected"));
    let code = error.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("28P01"), "{wrong}: {error}");
    // Without a password, libpq asks for one and gives up: not let in.
    let psql = Command::new("psql")
        .args([&format!("postgres://postgres@{host}"), "-X", "-w", "-c", "SELECT 1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!psql.status.success());
    assert!(String::from_utf8_lossy(&psql.stderr).contains("password"), "{}", String::from_utf8_lossy(&psql.stderr));
    // Its URL (with the password) is readable by its owner only, and so was the password file
    // initdb read (gone).
    let url_file = std::fs::metadata(dir.join("url")).unwrap();
    assert_eq!(url_file.permissions().mode() & 0o777, 0o600);
    assert!(!dir.join(".initdb-password").exists());
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(url_file.uid().to_string(), uid.trim(), "the URL file belongs to who started the cluster");
    // Started again, it answers on the same URL.
    drop(client);
    let stopped = stageflow(&["cluster", "stop", "--dir", dir.to_str().unwrap()]);
    assert!(stopped.status.success());
    let again = stageflow(&["cluster", "start", "--dir", dir.to_str().unwrap()]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), url);
    postgres::Client::connect(&url, postgres::NoTls).unwrap();
}

#[test]
fn a_cluster_directory_given_as_a_symbolic_link_is_refused() {
    let base = std::env::temp_dir().join(format!("stageflow-cluster-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("target")).unwrap();
    let _cleanup = Stop(base.clone());
    let link = base.join(".stageflow");
    std::os::unix::fs::symlink(base.join("target"), &link).unwrap();
    let owner_before = std::fs::metadata(base.join("target")).unwrap().uid();

    let refused = stageflow(&["cluster", "start", "--dir", link.to_str().unwrap()]);
    assert!(!refused.status.success(), "a symlinked cluster directory was used");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("symbolic link"), "{stderr}");
    // Nothing was handed over or created where the link points.
    assert_eq!(std::fs::metadata(base.join("target")).unwrap().uid(), owner_before);
    assert_eq!(std::fs::read_dir(base.join("target")).unwrap().count(), 0);
}
