//! Typed rows (`query_as` and friends, `#[derive(FromRow)]`) and the errors
//! they compose into, against a real server: every shape of struct the
//! derive supports, decode errors that name the column and both types, and
//! the connection still serving statements after each failure.
//! Needs the features `derive` and `json`.

mod common;

use common::Db;
use pgassist::postgres_from_row;
use pgassist::{Error, FromRow, Json, Queryable};

#[derive(Debug, PartialEq, FromRow)]
struct User {
    id: i64,
    name: String,
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Prefs {
    theme: String,
    tags: Vec<String>,
}

#[derive(Debug, PartialEq, FromRow)]
struct Address {
    city: String,
    zip: Option<String>,
}

/// Every feature of the derive at once: a rename, an `Option`, a nested
/// struct flattened from the same row, a JSONB column through serde.
#[derive(Debug, PartialEq, FromRow)]
struct Profile {
    #[from_row(rename = "user_id")]
    id: i64,
    nickname: Option<String>,
    #[from_row(flatten)]
    address: Address,
    prefs: Json<Prefs>,
}

async fn setup(db: &Db) {
    db.plain()
        .await
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
             INSERT INTO users VALUES (1, 'ann'), (2, 'bo');
             CREATE TABLE profiles (user_id bigint PRIMARY KEY, nickname text,
                                    city text NOT NULL, zip text, prefs jsonb NOT NULL);
             INSERT INTO profiles VALUES
               (1, 'annie', 'Oslo', '0150', '{\"theme\": \"dark\", \"tags\": [\"a\", \"b\"]}'),
               (2, NULL, 'Bergen', NULL, '{\"theme\": \"light\", \"tags\": []}');",
        )
        .await
        .unwrap();
}

/// What a new crate writes: generic over sessions and transactions.
async fn users(db: &impl Queryable) -> pgassist::Result<Vec<User>> {
    db.query_as("SELECT id, name FROM users ORDER BY id", &[])
        .await
}

#[tokio::test]
async fn structs_decode_from_sessions_and_transactions() {
    let db = Db::new().await;
    setup(&db).await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();

    let expected = vec![
        User {
            id: 1,
            name: "ann".into(),
        },
        User {
            id: 2,
            name: "bo".into(),
        },
    ];
    assert_eq!(users(&s).await.unwrap(), expected);
    assert_eq!(users(&&s).await.unwrap(), expected);
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO users VALUES (3, 'cy')", &[])
        .await
        .unwrap();
    assert_eq!(users(&tx).await.unwrap().len(), 3);
    tx.rollback().await.unwrap();

    let profiles: Vec<Profile> = s
        .query_as(
            "SELECT user_id, nickname, city, zip, prefs FROM profiles ORDER BY user_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        profiles,
        vec![
            Profile {
                id: 1,
                nickname: Some("annie".into()),
                address: Address {
                    city: "Oslo".into(),
                    zip: Some("0150".into())
                },
                prefs: Json(Prefs {
                    theme: "dark".into(),
                    tags: vec!["a".into(), "b".into()]
                }),
            },
            Profile {
                id: 2,
                nickname: None,
                address: Address {
                    city: "Bergen".into(),
                    zip: None
                },
                prefs: Json(Prefs {
                    theme: "light".into(),
                    tags: vec![]
                }),
            },
        ]
    );

    // JSON goes in as a parameter too.
    let prefs = Json(Prefs {
        theme: "x".into(),
        tags: vec!["'; DROP TABLE users; --".into()],
    });
    s.execute(
        "INSERT INTO profiles VALUES (3, NULL, 'Tromsø', NULL, $1)",
        &[&prefs],
    )
    .await
    .unwrap();
    let back: Profile = s
        .query_one_as("SELECT * FROM profiles WHERE user_id = $1", &[&3_i64])
        .await
        .unwrap();
    assert_eq!(back.prefs, prefs);

    // One and at most one.
    let ann: User = s
        .query_one_as("SELECT id, name FROM users WHERE id = $1", &[&1_i64])
        .await
        .unwrap();
    assert_eq!(ann.name, "ann");
    let none: Option<User> = s
        .query_opt_as("SELECT id, name FROM users WHERE id = $1", &[&99_i64])
        .await
        .unwrap();
    assert!(none.is_none());
}

#[tokio::test]
async fn row_counts_are_typed_errors() {
    let db = Db::new().await;
    setup(&db).await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let s = registry.session("writer").unwrap();

    let e = s
        .query_one_as::<User>("SELECT id, name FROM users WHERE id = 99", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { engine } if engine == "writer"),
        "{e:?}"
    );
    let e = s.query_one("SELECT 1 WHERE false", &[]).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    for e in [
        s.query_one("SELECT id FROM users", &[]).await.unwrap_err(),
        s.query_opt("SELECT id FROM users", &[]).await.unwrap_err(),
        s.query_one_as::<User>("SELECT id, name FROM users", &[])
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::TooManyRows { .. }), "{e:?}");
        assert!(!e.is_connection_error());
    }
    // Inside a transaction: the server saw nothing wrong, so the
    // transaction goes on.
    let tx = s.begin().await.unwrap();
    let e = tx.query_one("SELECT id FROM users", &[]).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRows { .. }), "{e:?}");
    let e = tx.query_one("SELECT 1 WHERE false", &[]).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    tx.execute("INSERT INTO users VALUES (5, 'eve')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM users").await, 3);
    // A many-row result abandoned after its second row leaves the single
    // connection usable.
    s.execute(
        "INSERT INTO users SELECT g, 'n' || g FROM generate_series(10, 5000) g",
        &[],
    )
    .await
    .unwrap();
    assert!(matches!(
        s.query_opt("SELECT id FROM users", &[]).await,
        Err(Error::TooManyRows { .. })
    ));
    assert_eq!(users(&s).await.unwrap().len(), 4994);
}

#[tokio::test]
async fn decode_errors_name_the_column_and_both_types() {
    let db = Db::new().await;
    setup(&db).await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let s = registry.session("writer").unwrap();

    #[derive(Debug, FromRow)]
    #[allow(dead_code)]
    struct Narrow {
        id: i32,
    }
    let e = s
        .query_as::<Narrow>("SELECT id FROM users", &[])
        .await
        .unwrap_err();
    match &e {
        Error::Decode {
            column,
            rust_type,
            sql_type,
            ..
        } => {
            assert_eq!(column, "`id`");
            assert_eq!(rust_type, "i32");
            assert_eq!(sql_type, "INT8");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "column `id`: mismatched types; Rust type `i32` is not compatible with SQL type INT8"
    );

    // NULL into a non-Option field.
    let e = s
        .query_one_as::<User>("SELECT 1::int8 AS id, NULL::text AS name", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decode { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "column `name` (SQL type TEXT) is NULL; decode it into an Option<_>"
    );

    // A column the query did not return; a hostile alias is quoted as given.
    let e = s
        .query_one_as::<User>(r#"SELECT 1::int8 AS id, 'x' AS "na`me""#, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Decode { column, .. } if column == "`name`"),
        "{e:?}"
    );
    assert!(e.to_string().contains("it returned: id, na`me"), "{e}");

    // `?` on the driver's own error inside a function returning pgassist's.
    async fn first_id(s: &pgassist::Session) -> pgassist::Result<i32> {
        let row = s
            .query_one("SELECT id FROM users WHERE id = 1", &[])
            .await?;
        Ok(row.try_get::<_, i32>("id")?)
    }
    let e = first_id(&s).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "column #0: mismatched types; Rust type `i32` is not compatible with SQL type INT8"
    );

    // The one connection served every failure and still works.
    assert_eq!(users(&s).await.unwrap().len(), 2);
    assert_eq!(registry.stats().engines[0].connections, 1);
}
