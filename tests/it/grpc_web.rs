//! gRPC-Web on the gRPC port: what a browser sends (HTTP/1.1, `application/grpc-web+proto` and
//! `application/grpc-web-text`), answered with the same authentication, errors (ErrorInfo in
//! `grpc-status-details-bin`), limits and metrics as gRPC; server streaming; and CORS.
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jobsvc::pb::{self, JobStatus as S};
use prost::Message;

use crate::harness::{self, TestServer, service_token};

const ORIGIN: &str = "http://dashboard.example:8080";

/// One gRPC-Web frame: flag, big-endian length, payload.
fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The frames of a response body: messages, and the trailers (as `name: value` lines).
fn frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let payload = &body[5..5 + len];
        match body[0] & 0x80 {
            0 => messages.push(payload.to_vec()),
            _ => trailers.push_str(&String::from_utf8_lossy(payload)),
        }
        body = &body[5 + len..];
    }
    (messages, trailers)
}

/// The status of a gRPC-Web answer: from the trailers frame, or from the headers of a
/// trailers-only answer; and its ErrorInfo reason, if any.
fn status_of(headers: &reqwest::header::HeaderMap, trailers: &str) -> (String, Option<String>) {
    let lines: Vec<(String, String)> = trailers
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        lines
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| headers.get(name).map(|v| v.to_str().unwrap().to_string()))
    };
    let reason = get("grpc-status-details-bin").map(|bin| {
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(bin.trim_end_matches('='))
            .unwrap();
        let status = tonic_types::pb::Status::decode(&bytes[..]).unwrap();
        let info = status
            .details
            .iter()
            .find(|d| d.type_url.ends_with("google.rpc.ErrorInfo"))
            .map(|d| tonic_types::pb::ErrorInfo::decode(&d.value[..]).unwrap())
            .unwrap();
        info.reason
    });
    (get("grpc-status").unwrap_or_default(), reason)
}

struct Answer<M> {
    messages: Vec<M>,
    status: String,
    reason: Option<String>,
    headers: reqwest::header::HeaderMap,
}

/// One gRPC-Web call in binary mode, its whole answer read.
async fn call<Req: Message, Resp: Message + Default>(
    server: &TestServer,
    method: &str,
    request: &Req,
    token: Option<&str>,
) -> Answer<Resp> {
    let mut req = reqwest::Client::new()
        .post(format!(
            "http://{}/jobs.v1.JobService/{method}",
            server.addr
        ))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", ORIGIN)
        .body(frame(0, &request.encode_to_vec()));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let response = tokio::time::timeout(Duration::from_secs(20), req.send())
        .await
        .expect("an answer within 20 s")
        .expect("an HTTP answer");
    assert_eq!(response.status(), 200, "{method}");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    let (messages, trailers) = frames(&body);
    let (status, reason) = status_of(&headers, &trailers);
    Answer {
        messages: messages
            .iter()
            .map(|m| Resp::decode(&m[..]).unwrap())
            .collect(),
        status,
        reason,
        headers,
    }
}

async fn ok<Req: Message, Resp: Message + Default>(
    server: &TestServer,
    method: &str,
    request: &Req,
) -> Resp {
    let answer = call::<Req, Resp>(server, method, request, Some(&service_token())).await;
    assert_eq!(answer.status, "0", "{method}: {:?}", answer.reason);
    answer.messages.into_iter().next().expect("a reply message")
}

/// Every unary RPC answers over gRPC-Web (HTTP/1.1, binary), with the same rules as gRPC:
/// a missing token is UNAUTHENTICATED with its ErrorInfo, bad input INVALID_ARGUMENT, and the
/// calls are counted in the same metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unary_rpc_answers_over_grpc_web() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let metrics_port = harness::free_addr().port().to_string();
    let server = TestServer::start_on(
        &url,
        &[
            "--cors-allow-origin",
            ORIGIN,
            "--metrics-listen",
            &metrics_port,
        ],
    )
    .await;
    let made: pb::Job = ok(&server, "CreateJob", &harness::create("web")).await;
    assert_eq!(made.agent_identifier, "web");
    let got: pb::Job = ok(
        &server,
        "GetJob",
        &pb::GetJobRequest {
            id: made.id.clone(),
        },
    )
    .await;
    assert_eq!(got.id, made.id);
    let listed: pb::ListJobsResponse =
        ok(&server, "ListJobs", &pb::ListJobsRequest::default()).await;
    assert_eq!(listed.jobs.len(), 1);
    let claimed: pb::ClaimJobsResponse = ok(
        &server,
        "ClaimJobs",
        &pb::ClaimJobsRequest {
            agent_identifier: "web".into(),
            ..Default::default()
        },
    )
    .await;
    let lease = claimed.jobs[0].lease_id.clone();
    let beat: pb::HeartbeatResponse = ok(
        &server,
        "Heartbeat",
        &pb::HeartbeatRequest {
            id: made.id.clone(),
            lease_id: lease.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(beat.lease_expire_time.is_some());
    let done: pb::Job = ok(
        &server,
        "UpdateStatus",
        &pb::UpdateStatusRequest {
            id: made.id.clone(),
            status: S::Completed as i32,
            lease_id: lease,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(done.status, S::Completed as i32);
    let waited: pb::Job = ok(
        &server,
        "WaitJob",
        &pb::WaitJobRequest {
            id: made.id.clone(),
            timeout: None,
        },
    )
    .await;
    assert_eq!(waited.status, S::Completed as i32);
    let events: pb::ListJobEventsResponse = ok(
        &server,
        "ListJobEvents",
        &pb::ListJobEventsRequest {
            job_id: made.id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.events.len(), 3);
    let other: pb::Job = ok(&server, "CreateJob", &harness::create("web")).await;
    let cancelled: pb::Job = ok(&server, "CancelJob", &pb::CancelJobRequest { id: other.id }).await;
    assert_eq!(cancelled.status, S::Cancelled as i32);
    let stats: pb::JobStats = ok(&server, "GetStats", &pb::GetStatsRequest::default()).await;
    assert_eq!((stats.completed, stats.cancelled), (1, 1));

    // The same refusals as over gRPC, ErrorInfo included, readable by a browser (CORS).
    let refused =
        call::<_, pb::ListJobsResponse>(&server, "ListJobs", &pb::ListJobsRequest::default(), None)
            .await;
    assert_eq!(
        (refused.status.as_str(), refused.reason.as_deref()),
        ("16", Some("TOKEN_MISSING"))
    );
    assert_eq!(
        refused
            .headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some(ORIGIN)
    );
    let exposed = refused
        .headers
        .get("access-control-expose-headers")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default();
    for header in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(header), "{header} not exposed: {exposed}");
    }
    let bad = call::<_, pb::Job>(
        &server,
        "GetJob",
        &pb::GetJobRequest { id: "nope".into() },
        Some(&service_token()),
    )
    .await;
    assert_eq!(
        (bad.status.as_str(), bad.reason.as_deref()),
        ("3", Some("INVALID_UUID"))
    );

    // Counted like any call.
    let text = crate::ops::scrape(metrics_port.parse().unwrap()).await;
    assert!(
        crate::ops::sample(&text, r#"jobsvc_rpc_requests_total{method="CreateJob"}"#) >= Some(2.0),
        "{text}"
    );
    server.stop().await;
}

/// Text mode (`application/grpc-web-text`: base64 both ways), as older browser clients send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_mode_answers_in_base64() {
    let server = TestServer::start().await;
    let body = B64.encode(frame(0, &harness::create("text").encode_to_vec()));
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/jobs.v1.JobService/CreateJob",
            server.addr
        ))
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .header("authorization", format!("Bearer {}", service_token()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web-text")
    );
    let text = response.text().await.unwrap();
    // Each frame is its own base64 run (padded), one after another.
    let mut bytes = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let end = rest
            .find('=')
            .map(|i| i + rest[i..].chars().take_while(|c| *c == '=').count())
            .unwrap_or(rest.len());
        bytes.extend(B64.decode(&rest[..end]).unwrap());
        rest = &rest[end..];
    }
    let (messages, trailers) = frames(&bytes);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert_eq!(
        pb::Job::decode(&messages[0][..]).unwrap().agent_identifier,
        "text"
    );
    server.stop().await;
}

/// StreamJobUpdates over gRPC-Web: the existing jobs, `synced`, then a change made over gRPC
/// arrives on the open HTTP/1.1 response within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_grpc_web_delivers_live_changes() {
    let server = TestServer::start().await;
    let mut svc = server.service().await;
    let first = svc
        .create_job(harness::create("live"))
        .await
        .unwrap()
        .into_inner();
    let request = pb::StreamJobUpdatesRequest {
        include_existing: true,
        ..Default::default()
    };
    let mut response = reqwest::Client::new()
        .post(format!(
            "http://{}/jobs.v1.JobService/StreamJobUpdates",
            server.addr
        ))
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", format!("Bearer {}", service_token()))
        .body(frame(0, &request.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buffer = Vec::new();
    let mut updates: Vec<pb::JobUpdate> = Vec::new();
    let mut next = async |updates: &mut Vec<pb::JobUpdate>| {
        while updates.is_empty() {
            let chunk = tokio::time::timeout(Duration::from_secs(2), response.chunk())
                .await
                .expect("a frame within 2 s")
                .unwrap()
                .expect("the stream stays open");
            buffer.extend_from_slice(&chunk);
            while buffer.len() >= 5 {
                let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
                if buffer.len() < 5 + len {
                    break;
                }
                assert_eq!(buffer[0] & 0x80, 0, "trailers before the end");
                updates.push(pb::JobUpdate::decode(&buffer[5..5 + len]).unwrap());
                buffer.drain(..5 + len);
            }
        }
        updates.remove(0)
    };
    let existing = next(&mut updates).await;
    assert!(matches!(existing.event, Some(pb::job_update::Event::Job(j)) if j.id == first.id));
    let synced = next(&mut updates).await;
    assert!(matches!(
        synced.event,
        Some(pb::job_update::Event::Synced(_))
    ));
    let second = svc
        .create_job(harness::create("live"))
        .await
        .unwrap()
        .into_inner();
    let change = next(&mut updates).await;
    assert!(matches!(change.event, Some(pb::job_update::Event::Job(j)) if j.id == second.id));
    assert!(!change.resume_token.is_empty());
    drop(response);
    server.stop().await;
}

/// CORS: a configured origin's preflight is answered; any other origin gets no CORS grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_admits_only_configured_origins() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--cors-allow-origin", ORIGIN]).await;
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("http://{}/jobs.v1.JobService/ListJobs", server.addr),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization,x-grpc-web,x-user-agent",
            )
            .send()
    };
    let allowed = preflight(ORIGIN).await.unwrap();
    assert!(allowed.status().is_success(), "{:?}", allowed.status());
    let h = allowed.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for needed in ["content-type", "authorization", "x-grpc-web"] {
        assert!(headers.contains(needed), "{needed} not allowed: {headers}");
    }
    let other = preflight("http://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    server.stop().await;
}

/// A browser's call (it carries `Origin`) gets the CORS grant and `Vary`; a call without
/// `Origin` (any client that is not a browser) skips CORS and is answered just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_go_to_browsers_only() {
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--cors-allow-origin", ORIGIN]).await;
    let create = |origin: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(format!(
                "http://{}/jobs.v1.JobService/CreateJob",
                server.addr
            ))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {}", service_token()))
            .body(frame(0, &harness::create("cors").encode_to_vec()));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        tokio::time::timeout(Duration::from_secs(20), req.send())
    };
    let browser = create(Some(ORIGIN)).await.unwrap().unwrap();
    let h = browser.headers().clone();
    let body = browser.bytes().await.unwrap();
    let (messages, trailers) = frames(&body);
    assert_eq!(status_of(&h, &trailers).0, "0");
    assert_eq!(messages.len(), 1);
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("grpc-status"), "{exposed}");
    let vary: Vec<_> = h.get_all("vary").iter().collect();
    assert!(
        vary.iter().any(|v| v.to_str().unwrap().contains("origin")),
        "{vary:?}"
    );

    let plain = create(None).await.unwrap().unwrap();
    let h = plain.headers().clone();
    let body = plain.bytes().await.unwrap();
    let (messages, trailers) = frames(&body);
    assert_eq!(status_of(&h, &trailers).0, "0");
    assert_eq!(messages.len(), 1);
    for name in [
        "vary",
        "access-control-allow-origin",
        "access-control-expose-headers",
    ] {
        assert!(h.get(name).is_none(), "{name}: {:?}", h.get(name));
    }
    server.stop().await;
}
