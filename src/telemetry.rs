//! Tracing spans (feature `tracing`): one per statement and one per
//! transaction, with OpenTelemetry's database fields — `db.system`,
//! `db.namespace`, `db.operation.name`, `server.address` — plus the engine
//! name and the outcome. Never parameter values, never the password, never
//! the statement text (it may carry literals).
//!
//! Without the feature everything here compiles to nothing.

#[cfg(feature = "tracing")]
mod enabled {
    use std::future::Future;

    use tracing::Instrument;

    use crate::error::Result;

    /// What every span of one engine repeats, computed once.
    #[derive(Debug)]
    pub(crate) struct Fields {
        engine: String,
        namespace: String,
        address: String,
    }

    impl Fields {
        pub(crate) fn new(engine: &str, pg: &tokio_postgres::Config) -> Fields {
            use tokio_postgres::config::Host;
            let address = match pg.get_hosts().first() {
                Some(Host::Tcp(h)) => h.clone(),
                Some(Host::Unix(p)) => p.display().to_string(),
                None => String::new(),
            };
            Fields {
                engine: engine.to_owned(),
                namespace: pg.get_dbname().unwrap_or_default().to_owned(),
                address,
            }
        }
    }

    /// A transaction's span.
    pub(crate) type TxSpan = tracing::Span;

    /// A checkout that had to wait: how long (the distribution is in the
    /// engine's stats).
    pub(crate) fn checkout_waited(f: &Fields, waited: std::time::Duration) {
        tracing::debug!(
            pgassist.engine = %f.engine,
            pgassist.wait_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            "pgassist.checkout_waited"
        );
    }

    /// The span of one transaction, ended when the transaction ends.
    pub(crate) fn transaction_span(f: &Fields, id: u64) -> tracing::Span {
        tracing::info_span!(
            "pgassist.transaction",
            db.system = "postgresql",
            db.namespace = %f.namespace,
            server.address = %f.address,
            pgassist.engine = %f.engine,
            pgassist.transaction_id = id,
            pgassist.outcome = tracing::field::Empty,
        )
    }

    /// Records how a transaction ended on its span.
    pub(crate) fn record_outcome(span: &tracing::Span, outcome: impl std::fmt::Debug) {
        span.record("pgassist.outcome", tracing::field::debug(outcome));
    }

    /// Runs `fut` inside a statement span (a child of `parent`, if given).
    pub(crate) async fn statement<T>(
        f: &Fields,
        parent: Option<&tracing::Span>,
        sql: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let operation = crate::sql::control::first_keyword(sql).to_ascii_uppercase();
        let span = tracing::info_span!(
            parent: parent.cloned().unwrap_or_else(tracing::Span::current),
            "pgassist.statement",
            db.system = "postgresql",
            db.namespace = %f.namespace,
            db.operation.name = %operation,
            server.address = %f.address,
            pgassist.engine = %f.engine,
            pgassist.outcome = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let out = fut.instrument(span.clone()).await;
        match &out {
            Ok(_) => span.record("pgassist.outcome", "ok"),
            Err(e) => {
                span.record("pgassist.outcome", "error");
                span.record("error.type", e.code().map_or("pgassist", |c| c.code()))
            }
        };
        out
    }
}

#[cfg(feature = "tracing")]
pub(crate) use enabled::*;

/// One operational log line: through `tracing` with the feature, else on
/// standard error (rare events only: a replica going down or coming back).
pub(crate) fn warn(message: &str) {
    #[cfg(feature = "tracing")]
    tracing::warn!("{message}");
    #[cfg(not(feature = "tracing"))]
    eprintln!("{message}");
}

#[cfg(not(feature = "tracing"))]
mod disabled {
    /// Nothing to remember without the feature.
    #[derive(Debug)]
    pub(crate) struct Fields;

    impl Fields {
        pub(crate) fn new(_: &str, _: &tokio_postgres::Config) -> Fields {
            Fields
        }
    }

    /// No span without the feature.
    pub(crate) type TxSpan = ();

    pub(crate) fn transaction_span(_: &Fields, _: u64) -> TxSpan {}

    pub(crate) fn record_outcome(_: &TxSpan, _: impl std::fmt::Debug) {}

    pub(crate) fn checkout_waited(_: &Fields, _: std::time::Duration) {}
}

#[cfg(not(feature = "tracing"))]
pub(crate) use disabled::*;
