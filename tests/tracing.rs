//! Spans (feature `tracing`): OpenTelemetry database fields, the engine and
//! the outcome — never parameter values or passwords.
#![cfg(feature = "tracing")]

mod common;

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Collects every span as "name field=value …", updated by later records.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(u64, String)>>>);

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={}", field.name(), value));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut line = attrs.metadata().name().to_owned();
        attrs.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push((id.into_u64(), line));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, line)) = spans.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
            values.record(&mut Fields(line));
        }
    }
}

#[tokio::test]
async fn spans_carry_database_fields_and_no_values() {
    let db = common::Db::new().await;
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    s.execute("INSERT INTO items(name) VALUES ($1)", &[&"p4ssw0rd-param"])
        .await
        .unwrap();
    s.query("SELEC broken", &[]).await.unwrap_err();
    let tx = s.begin().await.unwrap();
    tx.execute("UPDATE items SET name = $1", &[&"another-secret"])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let spans: Vec<String> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect();
    let all = spans.join("\n");
    let insert = spans
        .iter()
        .find(|l| l.contains("db.operation.name=INSERT"))
        .expect(&all);
    for field in [
        "pgassist.statement",
        "db.system=postgresql",
        &format!("db.namespace={}", db.db.name),
        "server.address=127.0.0.1",
        "pgassist.engine=writer",
        "pgassist.outcome=ok",
    ] {
        assert!(insert.contains(field), "{field} missing in {insert}");
    }
    let failed = spans
        .iter()
        .find(|l| l.contains("db.operation.name=SELEC"))
        .expect(&all);
    assert!(
        failed.contains("pgassist.outcome=error") && failed.contains("error.type=42601"),
        "{failed}"
    );
    let tx_span = spans
        .iter()
        .find(|l| l.starts_with("pgassist.transaction"))
        .expect(&all);
    assert!(tx_span.contains("pgassist.outcome=Committed"), "{tx_span}");
    assert!(
        !all.contains("p4ssw0rd-param") && !all.contains("another-secret"),
        "{all}"
    );
}
