//! TLS to PostgreSQL: a private cluster of its own with `ssl = on`, a CA and a server certificate
//! made by openssl for the name `localhost` only, and `hostssl` as the only TCP line of
//! pg_hba.conf. The client, the worker, the CLI and the HTTP server connect with the URL's
//! `sslmode` and `sslrootcert`; a wrong CA, a wrong name under verify-full and a plain connection
//! are refused.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn stageflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stageflow")).args(args).stdin(Stdio::null()).output().expect("stageflow runs")
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A CA (`<name>.crt`, `<name>.key`) made with openssl.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=stageflow test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A cluster directory that stops its cluster when dropped.
struct TlsCluster {
    dir: PathBuf,
    port: u16,
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = stageflow(&["cluster", "stop", "--dir", self.dir.to_str().unwrap(), "--mode", "immediate"]);
    }
}

/// As root the cluster runs as `postgres` (the cluster command's rule): its files are given to it.
fn chown_postgres(path: &Path) {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        let status = Command::new("chown").arg("postgres:postgres").arg(path).status().unwrap();
        assert!(status.success());
    }
}

/// Starts a cluster, then restarts it with TLS on and only `hostssl` for TCP.
fn tls_cluster(dir: &Path) -> TlsCluster {
    let started = stageflow(&["cluster", "start", "--dir", dir.to_str().unwrap()]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let url = String::from_utf8(started.stdout).unwrap().trim().to_owned();
    let port: u16 = url.rsplit_once(':').unwrap().1.split('/').next().unwrap().parse().unwrap();
    let cluster = TlsCluster { dir: dir.to_owned(), port };
    let stopped = stageflow(&["cluster", "stop", "--dir", dir.to_str().unwrap()]);
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));

    let data = dir.join("data");
    make_ca(dir, "ca");
    // The server's certificate, for the name localhost only (no IP address): verify-full to
    // 127.0.0.1 must fail where verify-ca passes.
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    for file in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(dir.join(file), data.join(file)).unwrap();
        chown_postgres(&data.join(file));
    }
    let status = Command::new("chmod").arg("600").arg(data.join("server.key")).status().unwrap();
    assert!(status.success());
    // TCP only over TLS; the unix socket stays for the cluster command's own checks.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all certuser 127.0.0.1/32 cert\nhostssl all certuser ::1/128 cert\n\
         hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    )
    .unwrap();
    let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
    // (ssl_ca_file: the CA the clients' certificates must come from, for the `cert` line)
    conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n");
    std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
    let restarted = stageflow(&["cluster", "start", "--dir", dir.to_str().unwrap()]);
    assert!(restarted.status.success(), "{}", String::from_utf8_lossy(&restarted.stderr));
    let again = String::from_utf8(restarted.stdout).unwrap();
    assert!(again.contains(&format!(":{port}/")), "the cluster came back on another port: {again}");
    cluster
}

fn wait_for_http(url: &str, child: &mut Child, log: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("stageflow serve exited: {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        let output = Command::new("curl").args(["-s", "-f", url]).output().unwrap();
        if output.status.success() {
            return serde_json::from_slice(&output.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP server did not answer {url}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_honours_sslmode_and_sslrootcert() {
    let base = std::env::temp_dir().join(format!("stageflow-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // The postgres user must reach the cluster directory (the cluster command checks).
    let status = Command::new("chmod").arg("755").arg(&base).status().unwrap();
    assert!(status.success());
    let dir = base.join("cluster");
    let cluster = tls_cluster(&dir);
    make_ca(&base, "wrong");
    let ca = dir.join("ca.crt");
    let port = cluster.port;
    let url = |host: &str, mode: &str, root: Option<&Path>| {
        let mut url = format!("postgres://postgres@{host}:{port}/postgres?sslmode={mode}");
        if let Some(root) = root {
            url.push_str(&format!("&sslrootcert={}", root.display()));
        }
        url
    };

    // verify-full to the certificate's name: connected, over TLS.
    let full = url("localhost", "verify-full", Some(&ca));
    let client = stageflow_client::connect(&full).await.unwrap();
    let row = client.raw().query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the session is not encrypted");
    client.raw().batch_execute("CREATE EXTENSION IF NOT EXISTS stageflow CASCADE").await.unwrap();
    drop(client);

    // Refused: another CA; verify-full to a name the certificate does not carry; no TLS at all.
    let refused = |url: String| async move {
        match stageflow_client::connect(&url).await {
            Ok(_) => panic!("{url} connected"),
            Err(error) => error.to_string(),
        }
    };
    let wrong_ca = refused(url("localhost", "verify-full", Some(&base.join("wrong.crt")))).await;
    assert!(wrong_ca.to_lowercase().contains("certificate"), "{wrong_ca}");
    let wrong_name = refused(url("127.0.0.1", "verify-full", Some(&ca))).await;
    assert!(wrong_name.to_lowercase().contains("certificate"), "{wrong_name}");
    let plain = refused(url("127.0.0.1", "disable", None)).await;
    assert!(plain.contains("no encryption") || plain.contains("pg_hba.conf"), "{plain}");
    // verify-ca checks the chain, not the name; require (no root) encrypts without checking; a
    // root certificate file that is not there is an error before any connection.
    stageflow_client::connect(&url("127.0.0.1", "verify-ca", Some(&ca))).await.unwrap();
    stageflow_client::connect(&url("127.0.0.1", "require", None)).await.unwrap();
    let wrong_ca_require = refused(url("localhost", "require", Some(&base.join("wrong.crt")))).await;
    assert!(wrong_ca_require.to_lowercase().contains("certificate"), "{wrong_ca_require}");
    let missing = refused(url("localhost", "verify-full", Some(&base.join("missing.crt")))).await;
    assert!(missing.contains("missing.crt") && missing.contains("does not exist"), "{missing}");

    // A login whose pg_hba.conf line says `cert`: it presents a certificate for its name, signed
    // by the CA the server trusts (sslcert, sslkey); without one it is refused; a key file others
    // may read is refused before connecting, as libpq does.
    let admin = stageflow_client::connect(&full).await.unwrap();
    admin.raw().batch_execute("CREATE ROLE certuser LOGIN").await.unwrap();
    drop(admin);
    // (an X.509 v3 certificate: rustls takes no other)
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage = clientAuth\n").unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=certuser",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        ],
    );
    let key = dir.join("client.key");
    let status = Command::new("chmod").arg("600").arg(&key).status().unwrap();
    assert!(status.success());
    let as_certuser = |cert: bool| {
        let mut url =
            format!("postgres://certuser@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}", ca.display());
        if cert {
            url.push_str(&format!("&sslcert={}&sslkey={}", dir.join("client.crt").display(), key.display()));
        }
        url
    };
    let certified = stageflow_client::connect(&as_certuser(true)).await.unwrap();
    let row = certified
        .raw()
        .query_one("SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "certuser");
    assert!(row.get::<_, Option<String>>(1).unwrap_or_default().contains("CN=certuser"), "no client certificate seen");
    drop(certified);
    let uncertified = refused(as_certuser(false)).await;
    assert!(uncertified.contains("certificate") || uncertified.contains("pg_hba.conf"), "{uncertified}");
    let status = Command::new("chmod").arg("644").arg(&key).status().unwrap();
    assert!(status.success());
    let exposed = refused(as_certuser(true)).await;
    assert!(exposed.contains("lets others read the private key"), "{exposed}");

    // The worker, the CLI and the HTTP server on the verify-full URL: a job runs through.
    let mut worker = common::spawn_worker(&full, &base, "tls-worker", &[]);
    let submitted = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["submit", "hello_world", "-p", "n=2", "--wait", "--json"])
        .env("STAGEFLOW_DATABASE_URL", &full)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    common::signal(&worker, "TERM");
    let _ = worker.wait();
    assert!(
        submitted.status.success(),
        "submit over TLS: {}\nworker log: {}",
        String::from_utf8_lossy(&submitted.stderr),
        std::fs::read_to_string(base.join("tls-worker.log")).unwrap_or_default()
    );
    let status: Value = serde_json::from_slice(&submitted.stdout).unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    let job_id = status["job_id"].as_str().unwrap().to_owned();

    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let serve_log = base.join("serve.log");
    let log = std::fs::File::create(&serve_log).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["serve", "--no-auth", "--listen", &listen.to_string()])
        .env("STAGEFLOW_DATABASE_URL", &full)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let job = wait_for_http(&format!("http://{listen}/api/jobs/status/{job_id}"), &mut server, &serve_log);
    common::signal(&server, "TERM");
    let _ = server.wait();
    assert_eq!(job["status"], "completed", "{job}");
    // The server refuses to start on a URL whose certificate check fails.
    let refused_server = Command::new(env!("CARGO_BIN_EXE_stageflow"))
        .args(["serve", "--no-auth", "--listen", "127.0.0.1:0"])
        .env("STAGEFLOW_DATABASE_URL", url("localhost", "verify-full", Some(&base.join("wrong.crt"))))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused_server.status.success());
    assert!(String::from_utf8_lossy(&refused_server.stderr).to_lowercase().contains("certificate"));

    drop(cluster);
    let _ = std::fs::remove_dir_all(&base);
}
