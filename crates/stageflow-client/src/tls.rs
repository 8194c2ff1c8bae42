//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say, with rustls.
//!
//! Every Stageflow program connects through [`ConnectConfig::from_url`]: it takes `sslmode` and
//! `sslrootcert` out of a database URL (tokio-postgres knows only `disable`, `prefer` and
//! `require`, and no root certificates) and gives back tokio-postgres's own configuration and a
//! rustls connector that checks what the mode asks for:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as in libpq) | when the server offers it | no |
//! | `require` | always | no; with a root certificate file (`sslrootcert`, or the default one when it exists), as `verify-ca` (libpq does the same) |
//! | `verify-ca` | always | signed by a certificate of `sslrootcert` |
//! | `verify-full` | always | as `verify-ca`, and issued for the host connected to |
//!
//! `sslrootcert` is a PEM file of CA certificates (default `~/.postgresql/root.crt`, as libpq),
//! or `system`: the Mozilla roots built in (webpki-roots), which implies `verify-full`, as in
//! libpq 16. A URL is `postgres://...?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem` or a
//! key/value string (`host=... sslmode=require`).
//!
//! A client certificate, for a server whose pg_hba.conf says `cert` (or `clientcert=verify-*`):
//! `sslcert` (a PEM file, the certificate and any intermediates) and `sslkey` (its private key, a
//! PEM file that only its owner may read: mode 0600, or 0640 owned by root, as libpq demands),
//! by default `~/.postgresql/postgresql.crt` and `~/.postgresql/postgresql.key` when the first
//! exists, as libpq. Its other settings are tokio-postgres's, among
//! them several hosts tried in turn and the kind of server wanted:
//! `postgresql://u@db1:5432,db2:5432/app?target_session_attrs=read-write` connects to whichever
//! takes writes (a primary, not a standby: `docs/operations.md`, "Failover").

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::Error;

/// What a URL's `sslmode` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, Error> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries without TLS first: here it is the same as `prefer`'s opposite
            // order, which tokio-postgres cannot do; refused rather than silently changed.
            other => {
                return Err(Error::Config(format!(
                    "sslmode {other:?} is not supported: use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// A database URL's connection settings and the TLS connector its `sslmode` asks for.
#[derive(Clone)]
pub struct ConnectConfig {
    /// tokio-postgres's configuration, its `sslmode` set to what it can do (`verify-*` ->
    /// `require`: the connector checks the certificate).
    pub config: tokio_postgres::Config,
    /// The rustls connector (used by tokio-postgres only when the mode encrypts).
    pub tls: MakeRustlsConnect,
    /// The mode the URL asked for.
    pub mode: SslMode,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig").field("config", &self.config).field("mode", &self.mode).finish()
    }
}

impl ConnectConfig {
    /// Parses `url` (a `postgres://` URL or a key/value string), honouring `sslmode` and
    /// `sslrootcert`; reads the root certificates now, so that a missing or bad file is an error
    /// here rather than at the first connection.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (rest, settings) = take_tls_settings(url)?;
        let mut config: tokio_postgres::Config = rest.parse()?;
        let root = settings.root_cert;
        let mut mode = match settings.mode.as_deref() {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::Prefer,
        };
        if root.as_deref() == Some("system") {
            mode = SslMode::VerifyFull;
        } else if mode == SslMode::Require && (root.is_some() || default_root_file().exists()) {
            // libpq: require with a root certificate file (named, or its default one) is verify-ca.
            mode = SslMode::VerifyCa;
        }
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(EncryptOnly(provider.clone())),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(root_store(root.as_deref())?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| Error::Config(format!("sslrootcert: {e}")))?;
                if mode == SslMode::VerifyCa {
                    Arc::new(AnyName(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let tls_config = match client_certificate(settings.cert.as_deref(), settings.key.as_deref())? {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Config(format!("sslcert and sslkey: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(ConnectConfig { config, tls: MakeRustlsConnect::new(tls_config), mode })
    }
}

struct TlsSettings {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// `url` without its `sslmode` and `sslrootcert`, and their values.
fn take_tls_settings(url: &str) -> Result<(String, TlsSettings), Error> {
    let mut settings = TlsSettings { mode: None, root_cert: None, cert: None, key: None };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), settings));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => settings.mode = Some(percent_decode(value)?),
                "sslrootcert" => settings.root_cert = Some(percent_decode(value)?),
                "sslcert" => settings.cert = Some(percent_decode(value)?),
                "sslkey" => settings.key = Some(percent_decode(value)?),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((rest, settings));
    }
    // key=value pairs separated by spaces, values optionally in single quotes (libpq's form).
    let mut kept = Vec::new();
    let mut chars = url.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::Config(format!("connection string: {key:?} has no value")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            raw.push(chars.next().unwrap_or('\''));
            let mut closed = false;
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            raw.push(escaped);
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    _ => value.push(c),
                }
            }
            if !closed {
                return Err(Error::Config(format!("connection string: the value of {key:?} has no closing quote")));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                raw.push(c);
                value.push(c);
                chars.next();
            }
        }
        match key.as_str() {
            "sslmode" => settings.mode = Some(value),
            "sslrootcert" => settings.root_cert = Some(value),
            "sslcert" => settings.cert = Some(value),
            "sslkey" => settings.key = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    Ok((kept.join(" "), settings))
}

fn percent_decode(value: &str) -> Result<String, Error> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::Config(format!("bad percent-encoding in {value:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::Config(format!("{value:?} is not UTF-8 once decoded")))
}

/// The certificates `sslrootcert` names: a PEM file, libpq's default file, or `system`.
fn root_store(root: Option<&str>) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    if root == Some("system") {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    }
    let path = match root {
        Some(path) => PathBuf::from(path),
        None => default_root_file(),
    };
    if !path.exists() {
        return Err(Error::Config(format!(
            "root certificate file {} does not exist: sslmode verify-ca and verify-full check the server's certificate \
             against it (name the file with sslrootcert=/path/ca.pem, or sslrootcert=system for the public roots)",
            path.display()
        )));
    }
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("sslrootcert {}: {e}", path.display())))?;
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::Config(format!("sslrootcert {}: no certificate in it", path.display())));
    }
    Ok(store)
}

/// The client certificate chain and key `sslcert` and `sslkey` name (or libpq's default files,
/// when the certificate's exists); None when there is no certificate to present.
fn client_certificate(
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, Error> {
    let cert = match cert {
        Some(path) => PathBuf::from(path),
        None if key.is_none() && libpq_file("postgresql.crt").exists() => libpq_file("postgresql.crt"),
        None if key.is_none() => return Ok(None),
        None => return Err(Error::Config("sslkey without sslcert: name the certificate too".into())),
    };
    let key = key.map_or_else(|| libpq_file("postgresql.key"), PathBuf::from);
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("sslcert {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Config(format!("sslcert {}: no certificate in it", cert.display())));
    }
    check_key_permissions(&key)?;
    let private =
        PrivateKeyDer::from_pem_file(&key).map_err(|e| Error::Config(format!("sslkey {}: {e}", key.display())))?;
    Ok(Some((chain, private)))
}

/// libpq's rule for a private key file: readable by its owner only (0600 or less), or 0640 if
/// root owns it (a key a group of services shares).
fn check_key_permissions(path: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::Config(format!("sslkey {}: {e}", path.display())))?;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(Error::Config(format!(
            "sslkey {}: mode {mode:04o} lets others read the private key: chmod 0600 it (0640 if root owns it)",
            path.display()
        )));
    }
    Ok(())
}

/// libpq's default root certificate file: `~/.postgresql/root.crt`.
fn default_root_file() -> PathBuf {
    libpq_file("root.crt")
}

/// One of libpq's default files: `~/.postgresql/<name>`.
fn libpq_file(name: &str) -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".postgresql").join(name)
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` (libpq's meaning): encrypted, the certificate not checked. The
/// handshake's signatures still are (the session key is the server certificate's).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_loses_its_tls_settings_and_keeps_the_rest() {
        let (rest, s) = take_tls_settings(
            "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5432/db?application_name=x");
        assert_eq!(s.mode.as_deref(), Some("verify-full"));
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, s) = take_tls_settings("postgresql://h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(s.mode.as_deref(), Some("disable"));
        let (rest, s) = take_tls_settings("postgresql://h/db?sslcert=%2Fc.pem&user=u&sslkey=%2Fk.pem").unwrap();
        assert_eq!(rest, "postgresql://h/db?user=u");
        assert_eq!((s.cert.as_deref(), s.key.as_deref()), (Some("/c.pem"), Some("/k.pem")));
    }

    #[test]
    fn key_value_string_loses_its_tls_settings_and_keeps_the_rest() {
        let (rest, s) =
            take_tls_settings("host=h port=5432 sslmode=require password='a b\\'c' sslrootcert = '/x y/ca.pem'")
                .unwrap();
        assert_eq!(rest, "host=h port=5432 password='a b\\'c'");
        assert_eq!(s.mode.as_deref(), Some("require"));
        assert_eq!(s.root_cert.as_deref(), Some("/x y/ca.pem"));
        let (rest, s) = take_tls_settings("host=h sslcert=/c.pem sslkey='/k y.pem'").unwrap();
        assert_eq!(rest, "host=h");
        assert_eq!((s.cert.as_deref(), s.key.as_deref()), (Some("/c.pem"), Some("/k y.pem")));
        assert!(take_tls_settings("host=h password='open").is_err());
    }

    #[test]
    fn a_url_may_name_several_hosts_and_ask_for_the_writable_one() {
        use tokio_postgres::config::{Host, TargetSessionAttrs};
        let config = ConnectConfig::from_url(
            "postgresql://u:p@10.0.0.1:5601,10.0.0.2:5602/db?target_session_attrs=read-write&sslmode=disable&connect_timeout=2",
        )
        .unwrap();
        let hosts: Vec<String> = config
            .config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        assert_eq!(hosts, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(config.config.get_ports(), [5601, 5602]);
        assert_eq!(config.config.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
        assert_eq!(config.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(2)));
        assert_eq!(config.mode, SslMode::Disable);
    }

    #[test]
    fn modes_map_as_libpq_does() {
        let config = ConnectConfig::from_url("postgres://h/db").unwrap();
        assert_eq!(config.mode, SslMode::Prefer);
        assert_eq!(config.config.get_ssl_mode(), PgSslMode::Prefer);
        let config = ConnectConfig::from_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(config.config.get_ssl_mode(), PgSslMode::Disable);
        let config = ConnectConfig::from_url("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!(config.mode, SslMode::VerifyFull);
        assert_eq!(config.config.get_ssl_mode(), PgSslMode::Require);
        assert!(ConnectConfig::from_url("postgres://h/db?sslmode=allow").is_err());
        let missing = ConnectConfig::from_url("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(matches!(missing, Err(Error::Config(m)) if m.contains("/nonexistent/ca.pem")));
    }
}
