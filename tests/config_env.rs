//! Configuration from the environment. One test in its own binary: it sets
//! process-wide environment variables.

use pgassist::{Error, Registry, RegistryBuilder};

#[tokio::test]
async fn registry_from_env_builds_every_engine_and_names_bad_keys() {
    // SAFETY: this is the only test in this binary that touches the
    // environment, and no other thread reads it meanwhile.
    let set = |k: &str, v: &str| unsafe { std::env::set_var(k, v) };
    set(
        "PGASSIST_WRITER_URL",
        "postgres://app:hunter2@127.0.0.1:1/app",
    );
    set("PGASSIST_WRITER_MAX_SIZE", "12");
    set("PGASSIST_READER_URL", "postgres://app@127.0.0.1:1/app");
    set("PGASSIST_READER_READ_ONLY", "on");
    set("PGASSIST_READER_CONNECTION_TIMEOUT", "1500ms");
    // Nothing listens there: a lazy registry starts anyway.
    let registry = RegistryBuilder::from_env()
        .unwrap()
        .lazy()
        .build()
        .await
        .unwrap();
    assert_eq!(
        registry.engine_names().collect::<Vec<_>>(),
        ["reader", "writer"]
    );
    assert_eq!(registry.default_engine_name(), "writer");
    assert!(registry.engine("reader").unwrap().config().is_read_only());
    assert_eq!(registry.stats().engine("writer").unwrap().max_size, 12);
    assert!(!format!("{registry:?}").contains("hunter2"));

    set("PGASSIST_WRITER_MAX_SIZE", "twelve");
    let err = Registry::from_env().await.unwrap_err();
    assert!(matches!(err, Error::Config(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("PGASSIST_WRITER_MAX_SIZE")
            && msg.contains("twelve")
            && !msg.contains("hunter2"),
        "{msg}"
    );

    set("PGASSIST_WRITER_MAX_SIZE", "0");
    assert!(matches!(Registry::from_env().await, Err(Error::Config(_))));
    set("PGASSIST_WRITER_MAX_SIZE", "4");
    set("PGASSIST_DEFAULT_ENGINE", "nope");
    assert!(matches!(
        Registry::from_env().await,
        Err(Error::UnknownEngine { .. })
    ));
}

#[cfg(feature = "serde")]
#[test]
fn engine_config_deserializes_from_json() {
    let cfg: pgassist::EngineConfig = serde_json::from_str(
        r#"{"url": "postgres://app:pw@db/app", "max_size": 8, "read_only": true, "idle_timeout": "none"}"#,
    )
    .unwrap();
    assert!(cfg.is_read_only());
    let err = serde_json::from_str::<pgassist::EngineConfig>(
        r#"{"url": "postgres://app:pw@db/app", "max_sise": 8}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_sise"), "{err}");
}
