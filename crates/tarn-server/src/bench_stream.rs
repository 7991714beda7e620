//! The stream part of the benchmark: tarn with its stream on NATS JetStream, beside a raw
//! JetStream publish of the same request bodies from as many concurrent clients, each waiting
//! for JetStream's acknowledgement as tarn's collector does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream;

/// The namespace of the benchmark's streams on the NATS server.
pub const NAMESPACE: &str = "tarnbench";

/// Deletes the streams a namespace holds (a previous run's).
pub async fn reset(url: &str, ns: &str) -> Result<()> {
    tarn_log::delete_namespace(url, ns).await?;
    Ok(())
}

/// Publishes every body (cut into messages of at most the server's payload limit) to a fresh
/// file-backed stream from `clients` concurrent tasks, each waiting for every acknowledgement.
/// Returns the seconds it took.
pub async fn raw_publish(url: &str, bodies: Arc<Vec<(usize, bytes::Bytes)>>, clients: usize) -> Result<f64> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let max = client.server_info().max_payload.saturating_sub(4 << 10).max(1);
    let js = jetstream::new(client);
    let name = format!("{NAMESPACE}-raw");
    let _ = js.delete_stream(&name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{NAMESPACE}.raw")],
        storage: jetstream::stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .context("creating the reference stream")?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (js, bodies, next) = (js.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((_, body)) = bodies.get(i) else { break };
                let mut at = 0;
                while at < body.len() {
                    let end = (at + max).min(body.len());
                    let ack = js.publish(format!("{NAMESPACE}.raw"), body.slice(at..end)).await?;
                    tokio::time::timeout(Duration::from_secs(30), ack).await??;
                    at = end;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(secs)
}
