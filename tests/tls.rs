//! TLS (feature `rustls`) against a TLS-enabled server the harness starts,
//! with a CA and server certificate made here (rcgen). The certificate names
//! `localhost` only, so connecting to 127.0.0.1 is a wrong host.
#![cfg(feature = "rustls")]

mod common;

use std::time::Duration;

use common::first_failure;
use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::{ClusterOptions, TestCluster};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// ssl (as pg_stat_ssl sees this connection) through an engine built from `url`.
async fn ssl_in_use(url: &str) -> Result<bool, Error> {
    let cfg = EngineConfig::from_url(url)?.connection_timeout(Duration::from_secs(2));
    let registry = Registry::builder().engine("db", cfg).build().await?;
    let row = registry
        .session("db")?
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn verify_full_accepts_the_right_host_and_rejects_a_wrong_one() {
    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("DATABASE_URL is set; the TLS test starts its own server anyway");
    }
    let pki = make_pki();
    let cluster = TestCluster::start(ClusterOptions {
        tls: Some((pki.cert_pem.clone(), pki.key_pem.clone())),
        ..Default::default()
    })
    .unwrap();
    let dir = std::env::temp_dir().join(format!("pgassist-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let other_ca = dir.join("other.pem");
    std::fs::write(&other_ca, make_pki().ca_pem).unwrap();
    let port = cluster.port();
    let url =
        |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/postgres?{params}");

    // The right host and CA.
    let full = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    assert!(
        ssl_in_use(&url("localhost", &full)).await.unwrap(),
        "verify-full to localhost uses TLS"
    );
    // A host the certificate does not name.
    let err = ssl_in_use(&url("127.0.0.1", &full)).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("certificate"), "{err}");
    // verify-ca checks the chain only, so the IP is fine.
    let ca_only = format!("sslmode=verify-ca&sslrootcert={}", ca.display());
    assert!(ssl_in_use(&url("127.0.0.1", &ca_only)).await.unwrap());
    // A certificate from another CA is refused.
    let wrong_ca = format!("sslmode=verify-full&sslrootcert={}", other_ca.display());
    let err = ssl_in_use(&url("localhost", &wrong_ca)).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // … at once, not after a 30 s connection_timeout of retries.
    let started = std::time::Instant::now();
    let slow = EngineConfig::from_url(&url("localhost", &wrong_ca))
        .unwrap()
        .connection_timeout(Duration::from_secs(30));
    let err = Registry::builder()
        .engine("db", slow)
        .build()
        .await
        .unwrap_err();
    println!("untrusted certificate: {:?}: {err}", started.elapsed());
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // require encrypts without checking; disable does not encrypt.
    assert!(
        ssl_in_use(&url("127.0.0.1", "sslmode=require"))
            .await
            .unwrap()
    );
    assert!(
        !ssl_in_use(&url("127.0.0.1", "sslmode=disable"))
            .await
            .unwrap()
    );
    // A missing root file is a configuration error at build time.
    let missing = url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let err = Registry::builder()
        .engine("db", EngineConfig::from_url(&missing).unwrap())
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `sslmode=require` against a server without TLS is refused at once, with
/// a typed `Error::Connect`, not after `connection_timeout` (30 s here) of
/// retries: the server's "no TLS" answer cannot change by trying again.
/// Both at build time (checked) and at the first statement (lazy).
#[tokio::test]
async fn tls_refused_by_the_server_fails_at_once() {
    let cluster = TestCluster::start(ClusterOptions::default()).unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        cluster.port()
    );
    for lazy in [false, true] {
        let (err, took) = first_failure(&url, lazy).await;
        println!("TLS refused (lazy: {lazy}): {took:?}: {err}");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("TLS"), "{err}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}
