//! TLS settings of engine connections (docs on [`SslMode`]).

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// How to secure connections, as libpq's `sslmode`.
///
/// TLS for engine connections (feature `rustls`).
///
/// `sslmode` follows libpq: `disable`, `prefer` and `require` encrypt
/// without checking the server's certificate (libpq's `require` without a
/// root certificate); `verify-ca` checks the chain; `verify-full` checks the
/// chain and that the certificate names the host connected to. Roots come
/// from `sslrootcert` (a PEM file) or, without it, the system's store.
/// tokio-postgres knows only disable / prefer / require, so pgassist takes
/// `sslmode` and `sslrootcert` out of the URL itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, without checking its certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS; the certificate must chain to a trusted root.
    VerifyCa,
    /// TLS; the certificate must chain to a trusted root and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // The value is not echoed: in a malformed key=value string it may
            // run into the next parameter, a password.
            _ => {
                return Err(Error::Config(
                    "unknown sslmode (expected disable, allow, prefer, require, verify-ca or verify-full)".into(),
                ));
            }
        })
    }

    /// The mode tokio-postgres negotiates with: verification is ours.
    pub(crate) fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The TLS part of an engine's configuration.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.mode)?;
        if let Some(p) = &self.root_cert {
            write!(f, " (sslrootcert {})", p.display())?;
        }
        Ok(())
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key=value string:
/// returns the string for tokio-postgres and the TLS settings.
pub(crate) fn split_tls_params(url: &str) -> Result<(String, TlsSettings)> {
    let mut tls = TlsSettings::default();
    let mut take = |key: &str, value: &str| -> Result<bool> {
        match key {
            "sslmode" => tls.mode = SslMode::parse(value)?,
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // Keys may be escaped too (libpq and tokio-postgres decode them);
            // one that does not decode is not ours and is left to the driver.
            let key = percent_decode_str(k).decode_utf8().unwrap_or_default();
            if matches!(&*key, "sslmode" | "sslrootcert") {
                take(&key, &url_param_value(&key, v)?)?;
            } else {
                kept.push(pair);
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rebuilt, tls));
    }
    // key=value form: take the TLS pairs out, keep every other byte as it was.
    if !url.contains("sslmode") && !url.contains("sslrootcert") {
        return Ok((url.to_owned(), tls));
    }
    let bytes = url.as_bytes();
    let is_space = |b: u8| b.is_ascii_whitespace();
    let mut kept = String::with_capacity(url.len());
    let mut i = 0;
    loop {
        while i < bytes.len() && is_space(bytes[i]) {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !is_space(bytes[i]) {
            i += 1;
        }
        let key = &url[start..i];
        while i < bytes.len() && is_space(bytes[i]) {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            // Malformed: leave the rest to the driver, which reports it.
            push_kept(&mut kept, &url[start..]);
            break;
        }
        i += 1;
        while i < bytes.len() && is_space(bytes[i]) {
            i += 1;
        }
        let value = if i < bytes.len() && bytes[i] == b'\'' {
            let mut v = Vec::new();
            i += 1;
            let mut closed = false;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if i + 1 < bytes.len() => {
                        v.push(bytes[i + 1]);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    b => {
                        v.push(b);
                        i += 1;
                    }
                }
            }
            if !closed {
                push_kept(&mut kept, &url[start..]);
                break;
            }
            String::from_utf8_lossy(&v).into_owned()
        } else {
            let vstart = i;
            while i < bytes.len() && !is_space(bytes[i]) {
                i += 1;
            }
            url[vstart..i].to_owned()
        };
        if !take(key, &value)? {
            push_kept(&mut kept, &url[start..i]);
        }
    }
    Ok((kept, tls))
}

/// Appends one `key=value` pair (or an unparsed rest) to a connection string.
fn push_kept(kept: &mut String, pair: &str) {
    if !kept.is_empty() {
        kept.push(' ');
    }
    kept.push_str(pair);
}

/// Decodes the percent-escapes of one of our URL parameters strictly, as
/// libpq does: a `%` not followed by two hex digits, or escapes that decode
/// to bytes that are not UTF-8, are a configuration error rather than a
/// guess (`percent_decode_str` alone would keep a malformed escape as it is).
/// The value is never echoed: a malformed URL may run it into a password.
fn url_param_value(key: &str, v: &str) -> Result<String> {
    let bytes = v.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(Error::Config(format!(
            "URL parameter {key}: malformed percent-escape (a % must be followed by two hex digits)"
        )));
    }
    percent_decode_str(v)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| {
            Error::Config(format!(
                "URL parameter {key}: its percent-escapes do not decode to UTF-8"
            ))
        })
}

#[cfg(feature = "rustls")]
pub(crate) use enabled::connector;

#[cfg(feature = "rustls")]
mod enabled {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{
        CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    };
    use tokio_postgres_rustls::MakeRustlsConnect;

    use super::{SslMode, TlsSettings};
    use crate::error::{Error, Result};

    /// The rustls connector for `settings` (roots loaded now, so a bad
    /// `sslrootcert` is a configuration error at build time).
    pub(crate) fn connector(engine: &str, settings: &TlsSettings) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("engine `{engine}`: TLS setup: {e}")))?;
        let config = match settings.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(roots(engine, settings)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| Error::Config(format!("engine `{engine}`: TLS roots: {e}")))?;
                let verifier: Arc<dyn ServerCertVerifier> = if settings.mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(engine: &str, settings: &TlsSettings) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        match &settings.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| {
                        Error::Config(format!(
                            "engine `{engine}`: sslrootcert {}: {e}",
                            path.display()
                        ))
                    })?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(Error::Config(format!(
                        "engine `{engine}`: sslrootcert {} holds no certificate",
                        path.display()
                    )));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(native.certs);
                if store.is_empty() {
                    return Err(Error::Config(format!(
                        "engine `{engine}`: sslmode {:?} needs trusted roots: set sslrootcert=<PEM file>",
                        settings.mode
                    )));
                }
            }
        }
        Ok(store)
    }

    /// `prefer` / `require`: encrypt, accept any certificate, but still
    /// check the handshake signatures.
    #[derive(Debug)]
    struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for EncryptOnly {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must verify; the host name is not checked.
    #[derive(Debug)]
    struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (url, tls) =
            split_tls_params("postgres://u:p@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem")
                .unwrap();
        assert_eq!(url, "postgres://u:p@h/db?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        let (url, tls) = split_tls_params("host=h sslmode=verify-ca dbname=d").unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("host=h dbname=d", SslMode::VerifyCa)
        );
        let (url, tls) = split_tls_params("postgres://h/db").unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://h/db", SslMode::Prefer)
        );
        assert!(split_tls_params("postgres://h/db?sslmode=bogus").is_err());
        // Quoted values keep every byte, and an unknown mode never echoes its value.
        let (kv, _) = split_tls_params("host=h password='a  b\\' c' sslmode=require").unwrap();
        assert_eq!(kv, "host=h password='a  b\\' c'");
        let err = split_tls_params("sslmode=disablepassword='s3cret x'")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    fn root_cert_of(url: &str) -> Option<PathBuf> {
        split_tls_params(url).unwrap().1.root_cert
    }

    #[test]
    fn url_escapes_decode_like_libpq() {
        let path = |p: &str| Some(PathBuf::from(p));
        // An escape at the very end, mixed case hex, multi-byte UTF-8, and a
        // `+` that stays a plus (URLs are not form data).
        assert_eq!(
            root_cert_of("postgres://h/d?sslrootcert=ca%2E%70em"),
            path("ca.pem")
        );
        assert_eq!(
            root_cert_of("postgres://h/d?sslrootcert=%2ftmp%2Fa%2B+b"),
            path("/tmp/a++b")
        );
        assert_eq!(
            root_cert_of("postgres://h/d?sslrootcert=%C3%A9.pem"),
            path("é.pem")
        );
        assert_eq!(
            root_cert_of("postgres://h/d?sslrootcert=%25zz"),
            path("%zz")
        );
        // An escaped key is still ours, and is taken out.
        let (url, tls) = split_tls_params("postgres://h/d?ssl%6Dode=require&x=1").unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://h/d?x=1", SslMode::Require)
        );
    }

    #[test]
    fn malformed_url_escapes_are_config_errors_that_hide_the_value() {
        for bad in [
            "sslrootcert=%zz",
            "sslrootcert=s3cret%",
            "sslrootcert=s3cret%4",
            "sslrootcert=%4g",
            "sslrootcert=%%41",
            "sslmode=s3cret%",
            "sslrootcert=%FF",       // not UTF-8
            "sslrootcert=%C3",       // a truncated UTF-8 sequence
            "sslrootcert=%ED%A0%80", // a surrogate, never valid UTF-8
            "sslrootcert=a%C3%28b",  // an invalid continuation byte
        ] {
            let url = format!("postgres://h/d?application_name=x&{bad}");
            match split_tls_params(&url) {
                Err(Error::Config(msg)) => {
                    let (key, value) = bad.split_once('=').unwrap();
                    assert!(msg.contains(key), "{bad}: {msg}");
                    assert!(
                        !msg.contains(value) && !msg.contains("s3cret"),
                        "{bad}: {msg}"
                    );
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Other parameters are the driver's: their escapes are not judged here.
        let (url, _) = split_tls_params("postgres://h/d?password=%zz&sslmode=disable").unwrap();
        assert_eq!(url, "postgres://h/d?password=%zz");
    }
}
