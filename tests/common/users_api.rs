//! The users API both web examples serve (examples/axum_app.rs and
//! examples/actix_app.rs), exercised over real HTTP and checked from the
//! server's side. Included by tests/web.rs and tests/web_actix.rs.

use serde_json::Value;

use super::Db;

/// POST /users (201, then 409 for a duplicate and 422 for an empty name,
/// neither writing anything), GET /users through the reader, and the
/// request report as JSON and HTML: every engine touched once, by a backend
/// the server knows.
pub async fn exercise(base: &str, db: &Db) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |name: &str| {
        http.post(format!("{base}/users"))
            .json(&serde_json::json!({ "name": name }))
            .send()
    };

    // The user (writer) and its audit row (logger), committed together.
    let res = post("ann").await.unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let ann: Value = res.json().await.unwrap();
    assert_eq!(ann["name"], "ann");
    assert_eq!(db.plain_count("SELECT count(*) FROM users").await, 1);
    assert_eq!(db.plain_count("SELECT count(*) FROM audit").await, 1);

    let dup = post("ann").await.unwrap();
    assert_eq!(dup.status().as_u16(), 409);
    let body: Value = dup.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("duplicate key"), "{body}");
    assert_eq!(message.matches("db error").count(), 1, "{message}");
    for empty in ["", " "] {
        let res = post(empty).await.unwrap();
        assert_eq!(res.status().as_u16(), 422, "{empty:?}");
    }
    assert_eq!(db.plain_count("SELECT count(*) FROM users").await, 1);
    assert_eq!(db.plain_count("SELECT count(*) FROM audit").await, 1);

    let users = get_json(&http, &format!("{base}/users")).await;
    assert_eq!(users, Value::Array(vec![ann]));

    // This request's report: every engine touched once.
    let report = get_json(&http, &format!("{base}/debug/db")).await;
    let engines = report["engines"].as_array().unwrap();
    let names: Vec<&str> = engines
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["writer", "reader", "logger"]);
    let server_pids: Vec<i64> = db.backends().await.iter().map(|b| b.0 as i64).collect();
    for e in engines {
        assert_eq!(e["state"], "Start", "{e}");
        assert_eq!(e["statements"], 1, "{e}");
        assert_eq!(e["pool_size"], 8, "{e}");
        let pids = e["backend_pids"].as_array().unwrap();
        assert_eq!(pids.len(), 1, "{e}");
        assert!(
            server_pids.contains(&pids[0].as_i64().unwrap()),
            "{e} not among {server_pids:?}"
        );
    }
    assert_eq!(engines[0]["is_default"], true);
    assert_eq!(engines[1]["read_only"], true);

    // The same as a page.
    let page = http
        .get(format!("{base}/debug/db.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    for needle in [
        "<table>",
        "<td>writer</td>",
        "<td>reader</td>",
        "<td>logger</td>",
        "START",
    ] {
        assert!(html.contains(needle), "{needle} missing from {html}");
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let res = http.get(url).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200, "GET {url}");
    res.json().await.unwrap()
}
