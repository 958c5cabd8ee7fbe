//! High-volume producers: many `StreamEvents` calls at once on one HTTP/2 connection, each
//! sending one small event per DATA frame, as grpcio's `aio` client does (issue 8, defect 6).
//!
//! The client is the `h2` crate itself, so that the framing is exactly what such a producer
//! sends (tonic's client would pack many messages into each frame).

use bytes::Bytes;
use campaign_stats::grpc::proto::{EventType, RecordEventRequest, RecordEventsResponse};
use prost::Message;

use crate::common::{TestDb, campaign_metrics, event};

crate::on_both_backends!(many_streams_of_small_frames_on_one_connection);

const STREAMS: usize = 64;
const EVENTS_PER_STREAM: usize = 2_000;

/// One gRPC message as it travels: uncompressed flag, length, the encoded message.
fn grpc_frame(message: &impl Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&encoded);
    frame.into()
}

/// Sends `EVENTS_PER_STREAM` events of campaign `campaign` on a new stream of `client`, one
/// DATA frame each, and returns the call's grpc-status and response.
async fn stream_events(
    mut client: h2::client::SendRequest<Bytes>,
    authority: String,
    campaign: String,
) -> (String, Option<RecordEventsResponse>) {
    client = client.ready().await.expect("a stream may open");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{authority}/stats.v1.StatsService/StreamEvents"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = client.send_request(request, false).expect("send");
    for i in 0..EVENTS_PER_STREAM {
        let mut one = event("u1", &campaign, EventType::Sent, 1, "2026-03-01");
        one.idempotency_key = format!("{campaign}-{i}");
        let frame = grpc_frame(&RecordEventRequest { event: Some(one) });
        if let Err(error) = body.send_data(frame, false) {
            return (format!("sending failed: {error}"), None);
        }
        if i % 50 == 0 {
            // Let the other streams interleave their frames, as concurrent writers do.
            tokio::task::yield_now().await;
        }
    }
    if let Err(error) = body.send_data(Bytes::new(), true) {
        return (format!("ending failed: {error}"), None);
    }
    let response = match response.await {
        Ok(response) => response,
        Err(error) => return (format!("no response: {error}"), None),
    };
    // A call that fails before answering sends its status in the headers ("trailers-only").
    if let Some(status) = response.headers().get("grpc-status") {
        let message = response
            .headers()
            .get("grpc-message")
            .map(|m| m.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        return (
            format!("{} {message}", status.to_str().unwrap_or_default()),
            None,
        );
    }
    let mut received = response.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = received.data().await {
        let Ok(chunk) = chunk else {
            return ("the response broke off".to_owned(), None);
        };
        let _ = received.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let Ok(trailers) = received.trailers().await else {
        return ("no trailers".to_owned(), None);
    };
    let trailers = trailers.unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let status = match field("grpc-status").as_str() {
        "0" => "0".to_owned(),
        other => format!("{other} {}", field("grpc-message")),
    };
    let decoded = (message.len() > 5)
        .then(|| RecordEventsResponse::decode(&message[5..]).expect("response message"));
    (status, decoded)
}

async fn many_streams_of_small_frames_on_one_connection(db: TestDb) {
    // The pool a deployed server has (16 connections, 5 s to get one): the harness's smaller
    // pool would turn 64 producers' queueing for connections into UNAVAILABLE on a loaded
    // machine, which is not what this test is about.
    let server = db
        .start_server_with(&db.url, &campaign_stats::storage::PoolOptions::default())
        .await;
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
    let connection = tokio::spawn(connection);
    let calls: Vec<_> = (0..STREAMS)
        .map(|s| {
            tokio::spawn(stream_events(
                client.clone(),
                server.addr.to_string(),
                format!("c{s}"),
            ))
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.expect("stream task"));
    }
    drop(client);
    // The connection's own end says why calls failed (e.g. a GOAWAY from the server).
    let connection_end = connection.await.expect("connection task");
    for (s, (status, response)) in results.into_iter().enumerate() {
        assert_eq!(
            status, "0",
            "stream {s} failed; connection: {connection_end:?}"
        );
        let response = response.expect("a response");
        assert_eq!(
            (response.stored, response.duplicates),
            (EVENTS_PER_STREAM as u64, 0),
            "stream {s}"
        );
    }
    // Every event counted once.
    let mut stats = server.stats().await;
    for s in [0, STREAMS / 2, STREAMS - 1] {
        let metrics = campaign_metrics(
            &mut stats,
            "u1",
            &format!("c{s}"),
            "2026-03-01",
            "2026-03-01",
        )
        .await;
        assert_eq!(metrics.sent, EVENTS_PER_STREAM as u64, "campaign c{s}");
    }
    assert_eq!(
        db.scalar("SELECT SUM(sent) FROM campaign_daily_stat_entries")
            .await,
        (STREAMS * EVENTS_PER_STREAM) as i64
    );
    server.stop().await;
}
