//! A single real nats-server: JetStream publish/ack, monitoring, cleanup.

use std::time::Duration;

use async_nats::jetstream;
use tidewatch_testkit::{NatsServer, eventually, http_get};

#[tokio::test]
async fn jetstream_publish_is_acked_and_monitoring_answers() {
    let server = NatsServer::start().await;
    assert!(server.client_url().starts_with("nats://127.0.0.1:"));
    assert_ne!(server.client_port(), server.monitoring_port());

    let js = jetstream::new(server.connect().await);
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".to_string(),
        subjects: vec!["orders.>".to_string()],
        ..Default::default()
    })
    .await
    .expect("create stream ORDERS");
    let ack = js
        .publish("orders.new", "hello".into())
        .await
        .expect("publish orders.new")
        .await
        .expect("JetStream ack");
    assert_eq!(ack.stream, "ORDERS");
    assert_eq!(ack.sequence, 1);

    let (status, body) = http_get(&format!("{}/varz", server.monitoring_url()))
        .await
        .expect("GET /varz");
    assert_eq!(status, 200, "{body}");
    let varz: serde_json::Value = serde_json::from_str(&body).expect("/varz is JSON");
    assert_eq!(varz["port"], u64::from(server.client_port()), "{varz}");
    assert!(varz["jetstream"].is_object(), "JetStream enabled: {varz}");

    let (status, body) = http_get(&format!("{}/jsz", server.monitoring_url()))
        .await
        .expect("GET /jsz");
    assert_eq!(status, 200);
    let jsz: serde_json::Value = serde_json::from_str(&body).expect("/jsz is JSON");
    assert_eq!(jsz["messages"], 1, "{jsz}");
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "JetStream stores under store_dir()"
    );

    let (status, _) = http_get(&format!("{}/no-such-endpoint", server.monitoring_url()))
        .await
        .expect("GET unknown path");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn drop_kills_and_reaps_the_server() {
    let server = NatsServer::start().await;
    let pid = server.pid();
    let port = server.client_port();
    let dir = server.dir().to_path_buf();
    assert!(server.is_running());
    drop(server);

    // Reaped, not a zombie: the /proc entry is gone as soon as drop returns.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "nats-server pid {pid} still exists after drop"
    );
    assert!(!dir.exists(), "temp dir removed on drop");
    eventually(
        "client port to be closed",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn servers_run_side_by_side() {
    let (a, b) = tokio::join!(NatsServer::start(), NatsServer::start());
    assert_ne!(a.client_port(), b.client_port());
    assert_ne!(a.store_dir(), b.store_dir());
    let (ca, cb) = tokio::join!(a.connect(), b.connect());
    ca.flush().await.expect("flush to server a");
    cb.flush().await.expect("flush to server b");
}

#[tokio::test]
#[should_panic(expected = "timed out after")]
async fn eventually_panics_with_what_on_timeout() {
    eventually(
        "a condition that never holds",
        Duration::from_millis(200),
        || async { None::<()> },
    )
    .await;
}
