//! Function binaries as real processes against a real nats-server: killed
//! mid-batch, terminated during a steady stream, and serving HTTP.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsServer, eventually, free_port};
use tokio::process::{Child, Command};

fn start_enrich(server: &NatsServer) -> Child {
    Command::new(binary("tidewatch-enrich"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .args(["--concurrency", "16", "--batch", "64"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("enrich starts")
}

async fn setup(server: &NatsServer) -> (async_nats::Client, jetstream::Context, Publisher) {
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let options = ProvisionOptions::default().ack_wait(Duration::from_secs(2));
    provision(&js, &common::consumers(), &options)
        .await
        .expect("provisioned");
    let publisher = Publisher::new(
        client.clone(),
        PublisherConfig::default(),
        Metrics::new("test"),
    );
    (client, js, publisher)
}

async fn publish_many(publisher: &Publisher, count: u64) {
    let subject = subjects::raw("k8s", "node-1");
    let mut confirmations = Vec::new();
    for i in 0..count {
        confirmations.push(
            publisher
                .send(
                    subject.as_str(),
                    &restart_event(i, &format!("web-{}", i % 20)),
                )
                .await
                .expect("sent"),
        );
    }
    for result in futures::future::join_all(
        confirmations
            .into_iter()
            .map(std::future::IntoFuture::into_future),
    )
    .await
    {
        result.expect("stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing_and_reprocessing_is_deduplicated() {
    let server = NatsServer::start().await;
    let (_client, js, publisher) = setup(&server).await;
    const N: u64 = 20_000;
    publish_many(&publisher, N).await;

    let mut enrich = start_enrich(&server);
    eventually(
        "enrich to be part-way through",
        Duration::from_secs(60),
        || async {
            let (_, _, _, floor) = consumer_state(&js, "enrich").await;
            (floor > N / 20).then_some(())
        },
    )
    .await;
    signal(&enrich, Signal::SIGKILL);
    wait_exit(&mut enrich, Duration::from_secs(10)).await;
    let (pending, ack_pending, _, floor) = consumer_state(&js, "enrich").await;
    assert!(floor < N, "killed before finishing (ack floor {floor})");
    assert!(ack_pending > 0 || pending > 0, "work was left when it died");

    let mut enrich = start_enrich(&server);
    eventually(
        "the restarted enrich to process everything",
        Duration::from_secs(120),
        || async {
            let (pending, ack_pending, _, _) = consumer_state(&js, "enrich").await;
            (pending == 0 && ack_pending == 0).then_some(())
        },
    )
    .await;
    // Every input has exactly one output: nothing lost, re-processed inputs
    // produced the same ids and the stream dropped the duplicates.
    assert_eq!(stream_messages(&js, topology::ENRICHED.name).await, N);
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
    signal(&enrich, Signal::SIGTERM);
    assert!(
        wait_exit(&mut enrich, Duration::from_secs(30))
            .await
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_steady_stream_drains_and_acks_everything() {
    let server = NatsServer::start().await;
    let (_client, js, publisher) = setup(&server).await;
    let mut enrich = start_enrich(&server);

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let subject = subjects::raw("k8s", "node-1");
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                publisher
                    .publish(subject.as_str(), &restart_event(i, "steady"))
                    .await
                    .expect("stored");
                i += 1;
                if i.is_multiple_of(50) {
                    tokio::task::yield_now().await;
                }
            }
            i
        })
    };
    eventually("enrich to be busy", Duration::from_secs(30), || async {
        let (_, _, _, floor) = consumer_state(&js, "enrich").await;
        (floor > 500).then_some(())
    })
    .await;
    signal(&enrich, Signal::SIGTERM);
    // Kubernetes' default grace period: it must drain well within it.
    let status = wait_exit(&mut enrich, Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit: {status}");
    let (_, ack_pending, _, floor) = consumer_state(&js, "enrich").await;
    assert_eq!(ack_pending, 0, "nothing delivered was left un-acked");
    stop.store(true, Ordering::SeqCst);
    let published = producer.await.expect("producer");
    // Everything acked has its output; nothing more was emitted.
    assert_eq!(stream_messages(&js, topology::ENRICHED.name).await, floor);
    assert!(
        floor < published,
        "the stream was still flowing when enrich stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_serves_cloudevents_over_http_in_knative_mode() {
    let port = free_port();
    let mut export = Command::new(binary("tidewatch-export"))
        .env("PORT", port.to_string())
        .env("K_SERVICE", "tidewatch-export")
        .env_remove("NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("export starts");
    let base = format!("http://127.0.0.1:{port}");
    eventually("export to be ready", Duration::from_secs(20), || async {
        matches!(
            tidewatch_testkit::http_get(&format!("{base}/readyz")).await,
            Ok((200, _))
        )
        .then_some(())
    })
    .await;
    let insight = restart_event(7, "web-http");
    let (headers, body) = tidewatch_runtime::binding::http::to_http(&insight);
    let mut request = format!(
        "POST / HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in &headers {
        request.push_str(&format!("{name}: {}\r\n", value.to_str().expect("ascii")));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.write_all(&body).await.expect("write body");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    let stdout = export.stdout.take().expect("stdout");
    let mut lines = tokio_util_lines(stdout);
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next())
        .await
        .expect("a line in time")
        .expect("a line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(json["id"], "restart-7");
    assert_eq!(json["data"]["pod"], "web-http");
    signal(&export, Signal::SIGTERM);
    assert!(
        wait_exit(&mut export, Duration::from_secs(30))
            .await
            .success()
    );
}

fn tokio_util_lines(
    stdout: tokio::process::ChildStdout,
) -> impl futures::Stream<Item = String> + Unpin {
    use tokio::io::AsyncBufReadExt;
    let lines = tokio::io::BufReader::new(stdout).lines();
    Box::pin(futures::stream::unfold(lines, |mut lines| async move {
        match lines.next_line().await {
            Ok(Some(line)) => Some((line, lines)),
            _ => None,
        }
    }))
}
