//! The admin HTTP example's routes, served on a loopback port and asked
//! over plain HTTP/1.1.

mod common;

#[path = "../examples/admin_http.rs"]
#[allow(dead_code)]
mod example;

use common::{Fixture, TTL, TestResult, id};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request; the status code and the JSON body.
async fn ask(address: std::net::SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("receive");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

#[tokio::test]
async fn stats_list_and_release_over_http() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    for n in 0..6 {
        store.try_claim(&id(n), TTL).await?;
        if n % 2 == 0 {
            store.mark_done(&id(n)).await?;
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(axum::serve(listener, example::router(store.clone())).into_future());

    let (status, stats) = ask(address, "GET", "/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["namespaces"][0]["live_pending"], 3);
    assert_eq!(stats["namespaces"][0]["live_done"], 3);

    let (_, pending) = ask(address, "GET", "/namespaces/default/records?state=pending").await;
    let ids: Vec<&str> = pending["records"]
        .as_array()
        .ok_or("records")?
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    let expected: Vec<String> = [1, 3, 5].iter().map(|n| id(*n).to_string()).collect();
    assert_eq!(ids, expected);

    let (status, released) = ask(
        address,
        "POST",
        &format!("/namespaces/default/records/{}/release", id(3)),
    )
    .await;
    assert_eq!((status, &released["released"]), (200, &Value::Bool(true)));
    assert!(store.get(&id(3)).await?.is_none());
    let (_, kept) = ask(
        address,
        "POST",
        &format!("/namespaces/default/records/{}/release", id(2)),
    )
    .await;
    assert_eq!(kept["released"], false, "a done record is never erased");
    assert_eq!(kept["record"]["state"], "done");

    let (status, _) = ask(address, "GET", "/namespaces/nope/records").await;
    assert_eq!(status, 404);
    let (status, _) = ask(address, "GET", "/namespaces/default/records?state=odd").await;
    assert_eq!(status, 400);
    server.abort();
    store.close().await?;
    Ok(())
}
