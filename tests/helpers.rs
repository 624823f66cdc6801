//! Query helpers (`pgassist::Table`) against a real server: what they find,
//! what they refuse, that hostile names stay names, that values are bound
//! parameters (from the server's statement log), and that find_or_create is
//! race-free under 16 concurrent callers.

mod common;

use std::sync::Arc;

use common::Db;
use pgassist::tokio_postgres::error::SqlState;
use pgassist::{Direction, Error, Queryable, RangeQuery, Row, Similar, Table};
#[cfg(feature = "value")]
use pgassist::{Value, columns_as_dict};

/// A table name and a column name an attacker would pick.
const HOSTILE: &str = r#"x"; DROP TABLE y; --"#;

fn names(rows: &[Row], column: &str) -> Vec<String> {
    rows.iter().map(|r| r.get(column)).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn code(e: &Error) -> Option<&SqlState> {
    e.code()
}

async fn seed_items(db: &Db, names: &[&str]) {
    let plain = db.plain().await;
    for name in names {
        plain
            .execute("INSERT INTO items(name) VALUES ($1)", &[name])
            .await
            .unwrap();
    }
}

/// Runs `SELECT <marker>` and returns the statements logged between `from`
/// and it, so "nothing was sent" is checked against a statement that
/// certainly reached the log after the call. pgassist's own
/// `SELECT pg_backend_pid()` on a new connection is left out.
async fn sent_since(db: &Db, session: &impl Queryable, from: u64) -> Vec<String> {
    let marker = format!("end_of_check_{from}");
    session
        .batch_execute(&format!("SELECT '{marker}'"))
        .await
        .unwrap();
    let lines = db.statements_since(from);
    assert!(lines.iter().any(|l| l.contains(&marker)), "{lines:#?}");
    lines
        .into_iter()
        .filter(|l| {
            !l.contains(&marker)
                && !l.contains("SELECT pg_backend_pid()")
                // The transaction-status probe that rides behind every batch.
                && !l.contains("pg_catalog.statement_timestamp()")
        })
        .collect()
}

#[tokio::test]
async fn get_by_id_and_get_by_ids_on_sessions_and_transactions() {
    let db = Db::new().await;
    seed_items(&db, &["a", "b", "c", "d"]).await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let items = Table::new("items");

    let row = items.get_by_id(&session, &2_i32).await.unwrap().unwrap();
    assert_eq!(row.get::<_, String>("name"), "b");
    assert!(items.get_by_id(&session, &99_i32).await.unwrap().is_none());
    // The key's Rust type must match the column (integer is i32).
    let wrong = items.get_by_id(&session, &2_i64).await.unwrap_err();
    assert!(matches!(wrong, Error::Query { .. }), "{wrong:?}");
    // Another key column.
    let by_name = Table::new("items").key("name");
    let row = by_name.get_by_id(&session, &"c").await.unwrap().unwrap();
    assert_eq!(row.get::<_, i32>("id"), 3);

    // Several ids in one statement, ordered by key, missing ones skipped.
    let from = db.log_offset();
    let rows = items
        .get_by_ids(&session, &[4_i32, 1, 99, 3])
        .await
        .unwrap();
    assert_eq!(names(&rows, "name"), ["a", "c", "d"]);
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        assert_eq!(sent.len(), 1, "{sent:#?}");
        assert!(sent[0].contains(r#""id" = ANY($1)"#), "{sent:#?}");
    }
    // No ids: nothing is sent.
    let from = db.log_offset();
    assert!(
        items
            .get_by_ids::<i32>(&session, &[])
            .await
            .unwrap()
            .is_empty()
    );
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        assert!(sent.is_empty(), "{sent:#?}");
    }

    // Inside a transaction (and through a reference to it) the helpers see
    // its uncommitted rows.
    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('e')", &[])
        .await
        .unwrap();
    let tx_ref = &tx;
    let row = items.get_by_id(&tx_ref, &5_i32).await.unwrap().unwrap();
    assert_eq!(row.get::<_, String>("name"), "e");
    let rows = items.get_by_ids(&tx, &[5_i32, 1]).await.unwrap();
    assert_eq!(names(&rows, "name"), ["a", "e"]);
    tx.rollback().await.unwrap();
    assert!(items.get_by_id(&session, &5_i32).await.unwrap().is_none());
}

#[tokio::test]
async fn get_by_column_lower_refuses_several_matches_unless_allowed() {
    let db = Db::new().await;
    seed_items(&db, &["Ann", "bob", "ANN"]).await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let items = Table::new("items");

    let err = items
        .get_by_column_lower(&session, "name", "aNN", false)
        .await
        .unwrap_err();
    match &err {
        Error::MultipleRows { table, column } => {
            assert_eq!((table.as_str(), column.as_str()), ("items", "name"))
        }
        other => panic!("expected MultipleRows, got {other:?}"),
    }
    let rows = items
        .get_by_column_lower(&session, "name", "aNN", true)
        .await
        .unwrap();
    assert_eq!(names(&rows, "name"), ["Ann", "ANN"], "ordered by key");
    let rows = items
        .get_by_column_lower(&session, "name", "BOB", false)
        .await
        .unwrap();
    assert_eq!(names(&rows, "name"), ["bob"]);
    for missing in ["nobody", "%", "_nn"] {
        let rows = items
            .get_by_column_lower(&session, "name", missing, false)
            .await
            .unwrap();
        assert!(rows.is_empty(), "{missing}");
    }
}

#[tokio::test]
async fn get_by_column_similar_matches_wildcards_literally() {
    let db = Db::new().await;
    seed_items(
        &db,
        &[
            "50% off",
            "50 percent",
            "500",
            "a_b",
            "axb",
            r"back\slash",
            "Backpack",
            "xbackx",
        ],
    )
    .await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let items = Table::new("items");
    let similar = |value: &'static str, how: Similar, limit: Option<u64>| {
        let (items, session) = (items.clone(), session.clone());
        async move {
            let rows = items
                .get_by_column_similar(&session, "name", value, how, limit)
                .await
                .unwrap();
            names(&rows, "name")
        }
    };

    // Unescaped, "50%" would match all three; "_" every name; "\" nothing.
    assert_eq!(similar("50%", Similar::Prefix, None).await, ["50% off"]);
    assert_eq!(
        sorted(similar("50", Similar::Prefix, None).await),
        ["50 percent", "50% off", "500"]
    );
    assert_eq!(similar("_", Similar::Contains, None).await, ["a_b"]);
    assert_eq!(
        similar(r"\", Similar::Contains, None).await,
        [r"back\slash"]
    );
    assert_eq!(
        similar(r"k\s", Similar::Contains, None).await,
        [r"back\slash"]
    );
    // Case-insensitive; prefix versus contains; ordered by the column.
    assert_eq!(
        sorted(similar("BACK", Similar::Prefix, None).await),
        ["Backpack", r"back\slash"]
    );
    assert_eq!(
        sorted(similar("BACK", Similar::Contains, None).await),
        ["Backpack", r"back\slash", "xbackx"]
    );
    assert_eq!(
        similar("x", Similar::Contains, None).await,
        ["axb", "xbackx"]
    );
    assert_eq!(similar("x", Similar::Contains, Some(1)).await, ["axb"]);
    assert!(similar("%", Similar::Prefix, None).await.is_empty());
}

#[tokio::test]
async fn get_by_column_exact_then_ilike_prefers_the_exact_match() {
    let db = Db::new().await;
    seed_items(&db, &["Alice", "alice", "BOB", "c%t", "cat"]).await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let items = Table::new("items");
    let find = |value: &'static str| {
        let (items, session) = (items.clone(), session.clone());
        async move {
            items
                .get_by_column_exact_then_ilike(&session, "name", value)
                .await
                .map(|row| row.map(|r| r.get::<_, String>("name")))
        }
    };

    assert_eq!(find("alice").await.unwrap().as_deref(), Some("alice"));
    assert_eq!(find("Alice").await.unwrap().as_deref(), Some("Alice"));
    assert_eq!(find("bob").await.unwrap().as_deref(), Some("BOB"));
    // No exact match and two case-insensitive ones: ambiguous.
    assert!(matches!(
        find("ALICE").await,
        Err(Error::MultipleRows { .. })
    ));
    // The ILIKE step matches the value itself, not a pattern: "C%T" finds
    // "c%t" and not "cat"; "%" finds nothing.
    assert_eq!(find("C%T").await.unwrap().as_deref(), Some("c%t"));
    assert_eq!(find("%").await.unwrap(), None);
    assert_eq!(find("nobody").await.unwrap(), None);
}

#[tokio::test]
async fn get_range_filters_orders_pages_and_enforces_the_whitelist() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            "CREATE TABLE people (id serial PRIMARY KEY, name text, team text, age int);
             INSERT INTO people(name, team, age) VALUES
               ('ann', 'red', 30), ('Bob', 'red', 25), ('carl', 'blue', 30),
               ('Dora', 'red', 41), ('eve', 'blue', 25);",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let people = Table::new("people");
    const ALLOWED: &[&str] = &["name", "age", "id"];
    let range = |q: RangeQuery<'static>| {
        let (people, session) = (people.clone(), session.clone());
        async move {
            let rows = people.get_range(&session, &q, ALLOWED).await.unwrap();
            names(&rows, "name")
        }
    };

    assert_eq!(
        range(RangeQuery::new()).await,
        ["ann", "Bob", "carl", "Dora", "eve"],
        "key order by default"
    );
    assert_eq!(
        range(RangeQuery::new().order_by_case_insensitive("name", Direction::Asc)).await,
        ["ann", "Bob", "carl", "Dora", "eve"]
    );
    assert_eq!(
        range(RangeQuery::new().order_by_case_insensitive("name", Direction::Desc)).await,
        ["eve", "Dora", "carl", "Bob", "ann"]
    );
    // Ties (ann and carl are 30, Bob and eve 25) are broken by the key.
    assert_eq!(
        range(RangeQuery::new().order_by("age", Direction::Desc)).await,
        ["Dora", "ann", "carl", "Bob", "eve"]
    );
    assert_eq!(
        range(RangeQuery::new().order_by("id", Direction::Desc)).await,
        ["eve", "Dora", "carl", "Bob", "ann"],
        "the key can be ordered on explicitly"
    );
    assert_eq!(
        range(
            RangeQuery::new()
                .order_by("age", Direction::Asc)
                .order_by_case_insensitive("name", Direction::Desc)
        )
        .await,
        ["eve", "Bob", "carl", "ann", "Dora"]
    );
    // Filters (bound values, ANDed), then a page.
    static RED: &str = "red";
    static THIRTY: i32 = 30;
    assert_eq!(
        range(
            RangeQuery::new()
                .filter("team", &RED)
                .order_by("age", Direction::Asc)
        )
        .await,
        ["Bob", "ann", "Dora"]
    );
    assert_eq!(
        range(
            RangeQuery::new()
                .filter("team", &RED)
                .filter("age", &THIRTY)
        )
        .await,
        ["ann"]
    );
    assert_eq!(
        range(
            RangeQuery::new()
                .order_by_case_insensitive("name", Direction::Asc)
                .offset(1)
                .limit(2)
        )
        .await,
        ["Bob", "carl"]
    );
    assert_eq!(range(RangeQuery::new().offset(4)).await, ["eve"]);
    assert!(range(RangeQuery::new().limit(0)).await.is_empty());

    // A column outside the whitelist is refused before anything is sent.
    let from = db.log_offset();
    for (q, allowed) in [
        (RangeQuery::new().order_by("team", Direction::Asc), ALLOWED),
        (
            RangeQuery::new().order_by_case_insensitive(HOSTILE, Direction::Asc),
            ALLOWED,
        ),
        (RangeQuery::new().order_by("Name", Direction::Asc), ALLOWED),
        (RangeQuery::new().order_by("name", Direction::Asc), &[][..]),
    ] {
        let err = people.get_range(&session, &q, allowed).await.unwrap_err();
        assert!(matches!(err, Error::ColumnNotAllowed { .. }), "{err:?}");
    }
    let err = people
        .get_range(
            &session,
            &RangeQuery::new().order_by("team", Direction::Asc),
            ALLOWED,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"column "team" is not allowed here (allowed: name, age, id)"#
    );
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        assert!(sent.is_empty(), "{sent:#?}");
    }
    // No ORDER BY column needs no whitelist.
    assert_eq!(
        people
            .get_range(&session, &RangeQuery::new().limit(1), &[])
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn hostile_identifiers_are_names_never_sql() {
    let db = Db::new().await;
    let plain = db.plain().await;
    // A table and a column literally named `x"; DROP TABLE y; --` (quoted by
    // hand here, so the test does not rely on the code it checks).
    plain
        .batch_execute(
            r#"CREATE TABLE y (id int);
               INSERT INTO y VALUES (1);
               CREATE TABLE "x""; DROP TABLE y; --" (
                   id serial PRIMARY KEY,
                   "x""; DROP TABLE y; --" text UNIQUE
               );"#,
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let hostile = Table::new(HOSTILE);

    // Every helper addresses that table and column by name.
    let (row, created) = hostile
        .find_or_create(&session, &[(HOSTILE, &"Value")], &[])
        .await
        .unwrap();
    assert!(created);
    assert_eq!(row.get::<_, String>(HOSTILE), "Value");
    let (again, created) = hostile
        .find_or_create(&session, &[(HOSTILE, &"Value")], &[])
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.get::<_, i32>("id"), row.get::<_, i32>("id"));
    let row = hostile.get_by_id(&session, &1_i32).await.unwrap().unwrap();
    assert_eq!(row.get::<_, String>(HOSTILE), "Value");
    #[cfg(feature = "value")]
    assert_eq!(
        columns_as_dict(&row).get(HOSTILE),
        Some(&Value::Text("Value".into()))
    );
    assert_eq!(
        hostile.get_by_ids(&session, &[1_i32]).await.unwrap().len(),
        1
    );
    assert_eq!(
        hostile
            .get_by_column_lower(&session, HOSTILE, "VALUE", false)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        hostile
            .get_by_column_similar(&session, HOSTILE, "va", Similar::Prefix, None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        hostile
            .get_by_column_exact_then_ilike(&session, HOSTILE, "value")
            .await
            .unwrap()
            .is_some()
    );
    let q = RangeQuery::new()
        .filter(HOSTILE, &"Value")
        .order_by_case_insensitive(HOSTILE, Direction::Desc);
    assert_eq!(
        hostile
            .get_range(&session, &q, &[HOSTILE])
            .await
            .unwrap()
            .len(),
        1
    );
    let by_hostile_key = Table::new(HOSTILE).key(HOSTILE);
    assert!(
        by_hostile_key
            .get_by_id(&session, &"Value")
            .await
            .unwrap()
            .is_some()
    );

    // Where no such object exists the statement fails cleanly.
    let items = Table::new("items");
    let err = items
        .get_by_column_lower(&session, HOSTILE, "v", true)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_COLUMN), "{err:?}");
    let err = Table::new("items")
        .key(HOSTILE)
        .get_by_id(&session, &1_i32)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_COLUMN), "{err:?}");
    let err = Table::new(r#"y"; DROP TABLE y; --"#)
        .get_by_id(&session, &1_i32)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    // A dot splits off a schema, quoted like any name: there is no table
    // `"z"; DROP TABLE y; --` in a schema `y"`.
    let err = Table::new(r#"y"."z"; DROP TABLE y; --"#)
        .get_by_id(&session, &1_i32)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    let err = items
        .find_or_create(&session, &[("name", &"n")], &[(HOSTILE, &"v")])
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_COLUMN), "{err:?}");
    // Names PostgreSQL would mangle are refused before anything is sent.
    let from = db.log_offset();
    let long = "c".repeat(64);
    let usage: Vec<Error> = vec![
        Table::new("")
            .get_by_id(&session, &1_i32)
            .await
            .unwrap_err(),
        Table::new("a.b.c")
            .get_by_id(&session, &1_i32)
            .await
            .unwrap_err(),
        Table::new("public.")
            .get_by_id(&session, &1_i32)
            .await
            .unwrap_err(),
        items
            .get_by_column_lower(&session, "na\0me", "v", true)
            .await
            .unwrap_err(),
        items
            .get_by_column_lower(&session, &long, "v", true)
            .await
            .unwrap_err(),
        // Checked even when there is nothing to send.
        Table::new("")
            .get_by_ids::<i32>(&session, &[])
            .await
            .unwrap_err(),
    ];
    for err in &usage {
        assert!(matches!(err, Error::Usage(_)), "{err:?}");
    }
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        assert!(sent.is_empty(), "{sent:#?}");
    }

    // y is intact, and so is the hostile table.
    assert_eq!(db.plain_count("SELECT count(*) FROM y").await, 1);
    assert_eq!(
        db.plain_count(r#"SELECT count(*) FROM "x""; DROP TABLE y; --""#)
            .await,
        1
    );
}

#[tokio::test]
async fn schema_qualified_tables() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            r#"CREATE SCHEMA app;
               CREATE TABLE app.users (id serial PRIMARY KEY, email text NOT NULL UNIQUE);
               CREATE TABLE app."odd.name" (id int PRIMARY KEY);
               INSERT INTO app."odd.name" VALUES (7);
               CREATE TABLE "Mixed" (id int PRIMARY KEY);
               INSERT INTO "Mixed" VALUES (1);"#,
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();

    let users = Table::new("app.users");
    assert_eq!(users.name(), "app.users");
    assert_eq!(users.sql_name().unwrap(), r#""app"."users""#);
    let (row, created) = users
        .find_or_create(&session, &[("email", &"a@x")], &[])
        .await
        .unwrap();
    assert!(created);
    let id: i32 = row.get("id");
    assert!(users.get_by_id(&session, &id).await.unwrap().is_some());
    // Not the public schema: no `users` there.
    let err = Table::new("users")
        .get_by_id(&session, &id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");

    let odd = Table::with_schema("app", "odd.name");
    assert!(odd.get_by_id(&session, &7_i32).await.unwrap().is_some());
    assert!(matches!(
        Table::new("app.odd.name").get_by_id(&session, &7_i32).await,
        Err(Error::Usage(_))
    ));
    // Names are literal, case included.
    assert!(
        Table::new("Mixed")
            .get_by_id(&session, &1_i32)
            .await
            .unwrap()
            .is_some()
    );
    let err = Table::new("mixed")
        .get_by_id(&session, &1_i32)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
}

#[tokio::test]
async fn values_are_always_bound_parameters() {
    let db = Db::new().await;
    if !db.has_log() {
        return; // needs the server log
    }
    db.plain()
        .await
        .batch_execute("CREATE UNIQUE INDEX ON items(name)")
        .await
        .unwrap();
    seed_items(&db, &["keep"]).await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let items = Table::new("items");
    let by_name = Table::new("items").key("name");
    let evil = "zq'evil\"; DROP TABLE items; --";

    let from = db.log_offset();
    by_name.get_by_id(&session, &evil).await.unwrap();
    by_name.get_by_ids(&session, &[evil]).await.unwrap();
    items
        .get_by_column_lower(&session, "name", evil, true)
        .await
        .unwrap();
    items
        .get_by_column_similar(&session, "name", evil, Similar::Contains, Some(5))
        .await
        .unwrap();
    items
        .get_by_column_exact_then_ilike(&session, "name", evil)
        .await
        .unwrap();
    items
        .get_range(
            &session,
            &RangeQuery::new().filter("name", &evil).offset(1).limit(1),
            &[],
        )
        .await
        .unwrap();
    let (_, created) = items
        .find_or_create(&session, &[("name", &evil)], &[])
        .await
        .unwrap();
    assert!(created);
    items
        .find_or_create(&session, &[("name", &evil)], &[])
        .await
        .unwrap();

    let sent = sent_since(&db, &session, from).await;
    // 1 + 1 + 1 + 1 + 2 (exact, then ilike) + 1 + 1 (insert) + 2 (insert, select).
    assert_eq!(sent.len(), 10, "{sent:#?}");
    for line in &sent {
        assert!(line.contains("$1"), "no placeholder: {line}");
        assert!(
            !line.contains("zq"),
            "a value in the statement text: {line}"
        );
    }
    // The values did reach the server, as parameters.
    let log = db.cluster.log_since(from);
    assert!(
        log.lines()
            .any(|l| l.contains("parameters: $1 = 'zq''evil"))
            || log
                .lines()
                .any(|l| l.contains("parameters:") && l.contains("zq")),
        "{log}"
    );
    assert_eq!(
        db.plain_names().await,
        ["keep", evil],
        "items intact, the value stored as is"
    );
}

#[cfg(feature = "value")]
#[tokio::test]
async fn columns_as_dict_maps_common_types() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN posint AS int CHECK (VALUE > 0);",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let row = session
        .query_one(
            r#"SELECT NULL::int AS null, true AS bool, 2::int2 AS i2, 3::int4 AS i4,
                      4::int8 AS i8, 26::oid AS oid, 1.5::float4 AS f4, 2.25::float8 AS f8,
                      12.340::numeric AS num, 'hé'::text AS text, 'v'::varchar AS vc,
                      'ab'::char(3) AS bp, 'nm'::name AS nm, 'q'::"char" AS ch,
                      'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid AS uuid,
                      '\x0001ff'::bytea AS bytes, '{"a": [1, 2]}'::json AS json,
                      '{"b":true,  "a": 1}'::jsonb AS jsonb,
                      ARRAY[1, NULL, 3] AS arr, ARRAY[['a', 'b'], ['c', 'd']] AS arr2,
                      '{}'::int[] AS empty, 'happy'::mood AS mood, 5::posint AS dom,
                      ARRAY['sad'::mood] AS moods, '2024-02-29'::date AS date,
                      '13:14:15.5'::time AS time,
                      '2024-02-29 13:14:15.123456'::timestamp AS ts,
                      '2024-02-29 13:14:15+02'::timestamptz AS tstz,
                      '1 day'::interval AS interval, 1 AS dup, 2 AS dup"#,
            &[],
        )
        .await
        .unwrap();
    let map = columns_as_dict(&row);
    let text = |s: &str| Value::Text(s.into());
    let expected = [
        ("null", Value::Null),
        ("bool", Value::Bool(true)),
        ("i2", Value::Int(2)),
        ("i4", Value::Int(3)),
        ("i8", Value::Int(4)),
        ("oid", Value::Int(26)),
        ("f4", Value::Float(1.5)),
        ("f8", Value::Float(2.25)),
        ("num", Value::Numeric("12.340".into())),
        ("text", text("hé")),
        ("vc", text("v")),
        ("bp", text("ab ")),
        ("nm", text("nm")),
        ("ch", text("q")),
        ("uuid", text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("bytes", Value::Bytes(vec![0, 1, 255])),
        ("json", Value::Json(r#"{"a": [1, 2]}"#.into())),
        ("jsonb", Value::Json(r#"{"a": 1, "b": true}"#.into())),
        (
            "arr",
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
        ),
        (
            "arr2",
            Value::Array(vec![
                Value::Array(vec![text("a"), text("b")]),
                Value::Array(vec![text("c"), text("d")]),
            ]),
        ),
        ("empty", Value::Array(vec![])),
        ("mood", text("happy")),
        ("dom", Value::Int(5)),
        ("moods", Value::Array(vec![text("sad")])),
        ("date", text("2024-02-29")),
        ("time", text("13:14:15.5")),
        ("ts", text("2024-02-29 13:14:15.123456")),
        ("tstz", text("2024-02-29 11:14:15+00")),
        ("dup", Value::Int(2)),
    ];
    for (name, value) in &expected {
        assert_eq!(map.get(*name), Some(value), "column {name}");
    }
    match map.get("interval") {
        Some(Value::Other { type_name, raw }) => {
            assert_eq!(type_name, "interval");
            assert_eq!(raw.len(), 16);
        }
        other => panic!("interval: {other:?}"),
    }
    assert_eq!(map.len(), expected.len() + 1);
    // Value is FromSql on its own too.
    assert_eq!(row.get::<_, Value>("i8"), Value::Int(4));

    #[cfg(feature = "serde")]
    {
        let json = serde_json::to_value(columns_as_dict(&row)).unwrap();
        assert_eq!(json["null"], serde_json::Value::Null);
        assert_eq!(json["bool"], serde_json::json!(true));
        assert_eq!(json["i8"], serde_json::json!(4));
        assert_eq!(json["f8"], serde_json::json!(2.25));
        assert_eq!(json["text"], serde_json::json!("hé"));
        assert_eq!(json["num"], serde_json::json!("12.340"));
        assert_eq!(json["arr"], serde_json::json!([1, null, 3]));
        assert_eq!(json["json"], serde_json::json!(r#"{"a": [1, 2]}"#));
    }
}

/// Numbers, dates and times print exactly as the server prints them (with
/// `TimeZone = UTC`), edge cases included.
#[cfg(feature = "value")]
#[tokio::test]
async fn value_text_matches_the_servers_own_output() {
    let db = Db::new().await;
    let plain = db.plain().await;
    plain
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
        .await
        .unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "numeric",
            &[
                "0",
                "-0",
                "0.000",
                "1",
                "-1",
                "0.0001",
                "0.5",
                "1.10",
                "10000",
                "100000000",
                "9999.9999",
                "-0.00000001",
                "123456789.123456789",
                "1e30",
                "1e-20",
                "12345678901234567890.000",
                "NaN",
                "Infinity",
                "-Infinity",
            ],
        ),
        (
            "date",
            &[
                "2000-01-01",
                "1999-12-31",
                "1970-01-01",
                "2024-02-29",
                "1600-02-29",
                "1900-03-01",
                "2100-03-01",
                "0001-01-01",
                "0001-12-31 BC",
                "0044-03-15 BC",
                "4713-01-01 BC",
                "5874897-12-31",
                "infinity",
                "-infinity",
            ],
        ),
        (
            "time",
            &["00:00:00", "23:59:59.999999", "24:00:00", "12:30:00.25"],
        ),
        (
            "timestamp",
            &[
                "2000-01-01 00:00:00",
                "1999-12-31 23:59:59.999999",
                "2024-02-29 13:14:15.5",
                "1969-07-20 20:17:40.000001",
                "0044-03-15 12:00:00 BC",
                "4713-01-01 00:00:00 BC",
                "294276-12-31 23:59:59.999999",
                "infinity",
                "-infinity",
            ],
        ),
        (
            "timestamptz",
            &[
                "2000-01-01 00:00:00+00",
                "2024-02-29 13:14:15.5+05:30",
                "1901-12-13 20:45:52+00",
                "0044-03-15 12:00:00+00 BC",
                "infinity",
            ],
        ),
    ];
    for (ty, inputs) in cases {
        let sql = format!("SELECT x::{ty} AS v, x::{ty}::text AS t FROM unnest($1::text[]) AS x");
        let rows = plain.query(&sql, &[inputs]).await.unwrap();
        assert_eq!(rows.len(), inputs.len());
        for (row, input) in rows.iter().zip(inputs.iter()) {
            let server: String = row.get("t");
            let ours = columns_as_dict(row).remove("v").unwrap();
            let ours = match ours {
                Value::Numeric(s) | Value::Text(s) => s,
                other => panic!("{ty} {input}: {other:?}"),
            };
            assert_eq!(ours, server, "{ty} {input}");
        }
    }
}

#[tokio::test]
async fn find_or_create_creates_once_then_finds() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            "CREATE TABLE accounts (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text);
             CREATE TABLE members (id serial PRIMARY KEY, org int NOT NULL, login text NOT NULL,
                                   role text, UNIQUE (org, login));",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let accounts = Table::new("accounts");

    let (row, created) = accounts
        .find_or_create(&session, &[("email", &"ann@x")], &[("name", &"Ann")])
        .await
        .unwrap();
    assert!(created);
    let id: i64 = row.get("id");
    assert_eq!(row.get::<_, String>("name"), "Ann");
    // Found: same row, and `create` values are not applied.
    let from = db.log_offset();
    let (row, created) = accounts
        .find_or_create(&session, &[("email", &"ann@x")], &[("name", &"Other")])
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(row.get::<_, i64>("id"), id);
    assert_eq!(row.get::<_, String>("name"), "Ann");
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        assert_eq!(sent.len(), 2, "{sent:#?}");
        assert!(
            sent[0].contains(
                r#"INSERT INTO "accounts" ("email", "name") VALUES ($1, $2) ON CONFLICT ("email") DO NOTHING RETURNING *"#
            ),
            "{sent:#?}"
        );
        assert!(
            sent[1].contains(r#"SELECT * FROM "accounts" WHERE "email" = $1"#),
            "{sent:#?}"
        );
    }
    assert_eq!(db.plain_count("SELECT count(*) FROM accounts").await, 1);

    // A key of several columns.
    let members = Table::new("members");
    let join = |org: i32, login: &'static str| {
        let (members, session) = (members.clone(), session.clone());
        async move {
            let (row, created) = members
                .find_or_create(
                    &session,
                    &[("org", &org), ("login", &login)],
                    &[("role", &"member")],
                )
                .await
                .unwrap();
            (row.get::<_, i32>("id"), created)
        }
    };
    assert_eq!(join(1, "a").await, (1, true));
    assert_eq!(join(2, "a").await, (2, true));
    assert_eq!(join(1, "b").await, (3, true));
    assert_eq!(join(1, "a").await, (1, false));

    // In a transaction: created there, found there, gone on rollback.
    let tx = session.begin().await.unwrap();
    let (row, created) = accounts
        .find_or_create(&tx, &[("email", &"tx@x")], &[])
        .await
        .unwrap();
    assert!(created);
    let (again, created) = accounts
        .find_or_create(&tx, &[("email", &"tx@x")], &[])
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.get::<_, i64>("id"), row.get::<_, i64>("id"));
    assert_eq!(
        db.plain_count("SELECT count(*) FROM accounts WHERE email = 'tx@x'")
            .await,
        0
    );
    tx.rollback().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM accounts").await, 1);

    // Misuse.
    let err = accounts
        .find_or_create(&session, &[], &[("name", &"x")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    let err = accounts
        .find_or_create(&session, &[("email", &"b@x")], &[("email", &"c@x")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    // No unique index on the find columns: the server refuses the ON CONFLICT.
    let err = accounts
        .find_or_create(&session, &[("name", &"Ann")], &[("email", &"d@x")])
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        Some(&SqlState::INVALID_COLUMN_REFERENCE),
        "{err:?}"
    );
    assert_eq!(db.plain_count("SELECT count(*) FROM accounts").await, 1);
}

/// 16 callers on 16 sessions, released together on a multi-thread runtime,
/// all find-or-create the same key: one row, one creator, one id for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn find_or_create_is_race_free_under_16_concurrent_callers() {
    const CALLERS: usize = 16;
    const ROUNDS: usize = 5;
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            "CREATE TABLE accounts (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text)",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c.max_size(CALLERS as u32)).await;
    let accounts = Table::new("accounts");

    for round in 0..ROUNDS {
        // Odd rounds run each caller in its own READ COMMITTED transaction.
        let in_tx = round % 2 == 1;
        let email = format!("user{round}@example.com");
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for caller in 0..CALLERS {
            let session = registry.session("writer").unwrap();
            let (accounts, email, barrier) = (accounts.clone(), email.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("caller{caller}");
                barrier.wait().await;
                let (row, created) = if in_tx {
                    let tx = session.begin().await.unwrap();
                    let out = accounts
                        .find_or_create(&tx, &[("email", &email)], &[("name", &name)])
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    out
                } else {
                    accounts
                        .find_or_create(&session, &[("email", &email)], &[("name", &name)])
                        .await
                        .unwrap()
                };
                (
                    caller,
                    row.get::<_, i64>("id"),
                    row.get::<_, String>("name"),
                    created,
                )
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }

        let plain = db.plain().await;
        let rows = plain
            .query("SELECT id, name FROM accounts WHERE email = $1", &[&email])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "round {round}: exactly one row");
        let (id, name): (i64, String) = (rows[0].get(0), rows[0].get(1));
        let creators: Vec<usize> = results.iter().filter(|r| r.3).map(|r| r.0).collect();
        assert_eq!(creators.len(), 1, "round {round}: one creator, {results:?}");
        assert_eq!(name, format!("caller{}", creators[0]), "round {round}");
        for (caller, got_id, got_name, _) in &results {
            assert_eq!(*got_id, id, "round {round}, caller {caller}");
            assert_eq!(got_name, &name, "round {round}, caller {caller}");
        }
    }
    assert_eq!(
        db.plain_count("SELECT count(*) FROM accounts").await,
        ROUNDS as i64
    );
    db.wait_no_transactions().await;
}

/// The row is there for the INSERT and gone for the SELECT: find_or_create
/// tries once more, and gives up after a second time. Made deterministic
/// with triggers: a BEFORE ROW trigger plants a conflicting row, which an
/// AFTER STATEMENT trigger deletes, all inside the INSERT statement.
#[tokio::test]
async fn find_or_create_tries_again_when_the_row_vanishes() {
    let db = Db::new().await;
    let plain = db.plain().await;
    plain
        .batch_execute(
            "CREATE TABLE tags (id serial PRIMARY KEY, label text NOT NULL UNIQUE, note text);
             CREATE TABLE plant (times int NOT NULL);
             INSERT INTO plant VALUES (0);
             CREATE FUNCTION plant_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF pg_trigger_depth() = 1 AND (SELECT times FROM plant) > 0 THEN
                 UPDATE plant SET times = times - 1;
                 INSERT INTO tags(label, note) VALUES (NEW.label, 'doomed');
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER plant BEFORE INSERT ON tags
               FOR EACH ROW EXECUTE FUNCTION plant_doomed();
             CREATE FUNCTION remove_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF pg_trigger_depth() = 1 THEN DELETE FROM tags WHERE note = 'doomed'; END IF;
               RETURN NULL;
             END $$;
             CREATE TRIGGER remove AFTER INSERT ON tags
               FOR EACH STATEMENT EXECUTE FUNCTION remove_doomed();",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let tags = Table::new("tags");

    // Once: the first INSERT conflicts with the planted row, the SELECT
    // finds nothing, the second INSERT creates the row.
    plain
        .execute("UPDATE plant SET times = 1", &[])
        .await
        .unwrap();
    let from = db.log_offset();
    let (row, created) = tags
        .find_or_create(&session, &[("label", &"rust")], &[("note", &"fresh")])
        .await
        .unwrap();
    assert!(created);
    assert_eq!(row.get::<_, String>("note"), "fresh");
    if db.has_log() {
        let sent = sent_since(&db, &session, from).await;
        let kinds: Vec<&str> = sent
            .iter()
            .map(|l| {
                if l.contains("INSERT INTO") {
                    "insert"
                } else {
                    "select"
                }
            })
            .collect();
        assert_eq!(kinds, ["insert", "select", "insert"], "{sent:#?}");
    }
    assert_eq!(
        db.plain_count("SELECT count(*) FROM tags WHERE label = 'rust' AND note = 'fresh'")
            .await,
        1
    );

    // Twice: it gives up with RowVanished, and nothing was created.
    plain
        .execute("UPDATE plant SET times = 2", &[])
        .await
        .unwrap();
    let err = tags
        .find_or_create(&session, &[("label", &"go")], &[("note", &"fresh")])
        .await
        .unwrap_err();
    match &err {
        Error::RowVanished { table } => assert_eq!(table, "tags"),
        other => panic!("expected RowVanished, got {other:?}"),
    }
    assert_eq!(
        db.plain_count("SELECT count(*) FROM plant WHERE times = 0")
            .await,
        1,
        "planted twice"
    );
    assert_eq!(
        db.plain_count("SELECT count(*) FROM tags WHERE label = 'go'")
            .await,
        0
    );
}

/// Every helper's future is Send (checked at compile time, for any
/// `Queryable`), so it can run in `tokio::spawn`.
#[test]
fn helper_futures_are_send() {
    fn send<T: Send>(_: T) {}
    fn check<Q: Queryable>(db: &Q, t: &Table, q: &RangeQuery<'_>) {
        send(t.get_by_id(db, &1_i32));
        send(t.get_by_ids(db, &[1_i32]));
        send(t.get_by_column_lower(db, "c", "v", false));
        send(t.get_by_column_similar(db, "c", "v", Similar::Prefix, None));
        send(t.get_by_column_exact_then_ilike(db, "c", "v"));
        send(t.get_range(db, q, &[]));
        send(t.find_or_create(db, &[("c", &"v")], &[]));
    }
    let _ = check::<pgassist::Session>;
    let _ = check::<pgassist::Transaction<'static>>;
}
