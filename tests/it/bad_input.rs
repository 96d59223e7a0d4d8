//! Bad input gets INVALID_ARGUMENT with an ErrorInfo reason, writes nothing, and the server
//! keeps serving.
use jobsvc::pb::{self, JobStatus as S};
use tonic::Code;

use crate::harness::{TestServer, assert_err};

fn deep(levels: usize) -> prost_types::Struct {
    let mut v = serde_json::json!(1);
    for _ in 0..levels - 1 {
        v = serde_json::json!({ "a": v });
    }
    jobsvc::api::convert::json_to_struct(serde_json::json!({ "a": v }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_table() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "ok".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let create = |agent: &str, data: Option<prost_types::Struct>, user: &str, rid: &str| {
        pb::CreateJobRequest {
            agent_identifier: agent.into(),
            job_data: data,
            user_id: user.into(),
            request_id: rid.into(),
            ..Default::default()
        }
    };
    let big = jobsvc::api::convert::json_to_struct(
        serde_json::json!({ "s": "x".repeat((1 << 20) + 10) }),
    );
    let creates: Vec<(&str, pb::CreateJobRequest, &str)> = vec![
        (
            "empty agent",
            create("", None, "", ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "256-char agent",
            create(&"a".repeat(256), None, "", ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "newline in agent",
            create("a\nb", None, "", ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "NUL in agent",
            create("a\0b", None, "", ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "DEL in agent",
            create("a\u{7f}", None, "", ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "job_data over the size limit",
            create("a", Some(big), "", ""),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "job_data over the depth",
            create("a", Some(deep(33)), "", ""),
            "PAYLOAD_TOO_DEEP",
        ),
        (
            "U+0000 in a job_data string",
            create(
                "a",
                Some(jobsvc::api::convert::json_to_struct(
                    serde_json::json!({"k": "a\u{0}"}),
                )),
                "",
                "",
            ),
            "NUL_CHARACTER",
        ),
        (
            "U+0000 in a job_data key",
            create(
                "a",
                Some(jobsvc::api::convert::json_to_struct(
                    serde_json::json!({"\u{0}": 1}),
                )),
                "",
                "",
            ),
            "NUL_CHARACTER",
        ),
        (
            "invalid user_id",
            create("a", None, "not-a-uuid", ""),
            "INVALID_UUID",
        ),
        (
            "request_id too long",
            create("a", None, "", &"r".repeat(129)),
            "INVALID_REQUEST_ID",
        ),
        (
            "request_id with a control char",
            create("a", None, "", "r\u{1}"),
            "INVALID_REQUEST_ID",
        ),
    ];
    for (name, req, reason) in creates {
        let status = assert_err(c.create_job(req).await, Code::InvalidArgument, reason);
        // No SQL text or internals reach the client.
        assert!(
            !status.message().contains("INSERT"),
            "{name}: {}",
            status.message()
        );
    }
    // 255 characters (multi-byte ones too) are fine; 32 levels are fine.
    c.create_job(create(&"é".repeat(255), Some(deep(32)), "", ""))
        .await
        .unwrap();

    let upd = |id: &str, status: i32| pb::UpdateStatusRequest {
        id: id.into(),
        status,
        ..Default::default()
    };
    let mut nul_msg = upd(&job.id, S::Failed as i32);
    nul_msg.error_message = "bad\0".into();
    let mut nan = upd(&job.id, S::Completed as i32);
    nan.result = Some(prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
    });
    let updates: Vec<(&str, pb::UpdateStatusRequest, &str)> = vec![
        ("invalid id", upd("123", S::Running as i32), "INVALID_UUID"),
        ("empty id", upd("", S::Running as i32), "MISSING_FIELD"),
        (
            "unspecified status",
            upd(&job.id, S::Unspecified as i32),
            "INVALID_STATUS",
        ),
        ("unknown status", upd(&job.id, 99), "INVALID_STATUS"),
        ("negative status", upd(&job.id, -1), "INVALID_STATUS"),
        ("NUL in error_message", nul_msg, "NUL_CHARACTER"),
        ("NaN result", nan, "INVALID_NUMBER"),
    ];
    for (_name, req, reason) in updates {
        assert_err(c.update_status(req).await, Code::InvalidArgument, reason);
    }
    for id in [
        "",
        "zzz",
        "00000000-0000-0000-0000-00000000000",
        "'; DROP TABLE jobs; --",
    ] {
        let r = c.get_job(pb::GetJobRequest { id: id.into() }).await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
        let r = c.cancel_job(pb::CancelJobRequest { id: id.into() }).await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    }
    // A well-formed id that matches nothing.
    assert_err(
        c.get_job(pb::GetJobRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );

    // Nothing was written by the refused calls, and the server still serves.
    let again = c
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, job);
    server.stop().await;
}

/// One request of the corpus.
enum Req {
    Create(pb::CreateJobRequest),
    Get(pb::GetJobRequest),
    Update(pb::UpdateStatusRequest),
    Cancel(pb::CancelJobRequest),
    Wait(pb::WaitJobRequest),
    List(pb::ListJobsRequest),
    Events(pb::ListJobEventsRequest),
    Stats(pb::GetStatsRequest),
    Stream(pb::StreamJobUpdatesRequest),
    Claim(pb::ClaimJobsRequest),
    Beat(pb::HeartbeatRequest),
}

async fn send(c: &mut crate::harness::Client, req: Req) -> Result<(), tonic::Status> {
    match req {
        Req::Create(r) => c.create_job(r).await.map(drop),
        Req::Get(r) => c.get_job(r).await.map(drop),
        Req::Update(r) => c.update_status(r).await.map(drop),
        Req::Cancel(r) => c.cancel_job(r).await.map(drop),
        Req::Wait(r) => c.wait_job(r).await.map(drop),
        Req::List(r) => c.list_jobs(r).await.map(drop),
        Req::Events(r) => c.list_job_events(r).await.map(drop),
        Req::Stats(r) => c.get_stats(r).await.map(drop),
        Req::Stream(r) => c.stream_job_updates(r).await.map(drop),
        Req::Claim(r) => c.claim_jobs(r).await.map(drop),
        Req::Beat(r) => c.heartbeat(r).await.map(drop),
    }
}

/// A corpus of more than 300 malformed requests over every RPC and field: each gets exactly
/// INVALID_ARGUMENT with its documented ErrorInfo reason (never INTERNAL), nothing is
/// written, and the server keeps answering.
#[tokio::test]
async fn corpus_of_malformed_requests_gets_exact_codes_and_reasons() {
    use prost_types::value::Kind;
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "ok".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ok_id = job.id.clone();
    let mut cases: Vec<(String, Req, &str)> = Vec::new();

    // UUIDs: every field that takes one, with 20 malformed values (the braced, URN and
    // hyphen-less forms are valid UUIDs and so not here).
    let bad_uuids: Vec<String> = vec![
        "nope".into(),
        "123".into(),
        "x".repeat(36),
        "00000000-0000-0000-0000-00000000000g".into(),
        "00000000-0000-0000-0000-0000000000001".into(),
        "00000000-0000-0000-0000-00000000000".into(),
        " 00000000-0000-0000-0000-000000000001".into(),
        "00000000-0000-0000-0000-000000000001 ".into(),
        "00000000_0000_0000_0000_000000000001".into(),
        "'; DROP TABLE jobs; --".into(),
        "' OR '1'='1".into(),
        "%".into(),
        "\u{0}".into(),
        "ü".into(),
        "😀😀😀".into(),
        "null".into(),
        "undefined".into(),
        "-1".into(),
        "0x1234".into(),
        format!("{}\u{0}", &ok_id[..35]),
    ];
    for u in &bad_uuids {
        let u = u.clone();
        let n = |f: &str| format!("{f} = {u:?}");
        cases.push((
            n("GetJob.id"),
            Req::Get(pb::GetJobRequest { id: u.clone() }),
            "INVALID_UUID",
        ));
        cases.push((
            n("UpdateStatus.id"),
            Req::Update(pb::UpdateStatusRequest {
                id: u.clone(),
                status: S::Running as i32,
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("CancelJob.id"),
            Req::Cancel(pb::CancelJobRequest { id: u.clone() }),
            "INVALID_UUID",
        ));
        cases.push((
            n("WaitJob.id"),
            Req::Wait(pb::WaitJobRequest {
                id: u.clone(),
                timeout: None,
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("ListJobEvents.job_id"),
            Req::Events(pb::ListJobEventsRequest {
                job_id: u.clone(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("CreateJob.user_id"),
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "a".into(),
                user_id: u.clone(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("ListJobs.user_id"),
            Req::List(pb::ListJobsRequest {
                user_id: u.clone(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("GetStats.user_id"),
            Req::Stats(pb::GetStatsRequest {
                user_id: u.clone(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("StreamJobUpdates.user_id"),
            Req::Stream(pb::StreamJobUpdatesRequest {
                user_id: u.clone(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
        cases.push((
            n("StreamJobUpdates.job_ids"),
            Req::Stream(pb::StreamJobUpdatesRequest {
                job_ids: vec![ok_id.clone(), u.clone()],
                ..Default::default()
            }),
            "INVALID_UUID",
        ));
    }
    // Required ids left empty.
    cases.push((
        "GetJob.id empty".into(),
        Req::Get(pb::GetJobRequest::default()),
        "MISSING_FIELD",
    ));
    cases.push((
        "UpdateStatus.id empty".into(),
        Req::Update(pb::UpdateStatusRequest {
            status: S::Running as i32,
            ..Default::default()
        }),
        "MISSING_FIELD",
    ));
    cases.push((
        "CancelJob.id empty".into(),
        Req::Cancel(pb::CancelJobRequest::default()),
        "MISSING_FIELD",
    ));
    cases.push((
        "WaitJob.id empty".into(),
        Req::Wait(pb::WaitJobRequest::default()),
        "MISSING_FIELD",
    ));
    cases.push((
        "ListJobEvents.job_id empty".into(),
        Req::Events(pb::ListJobEventsRequest::default()),
        "MISSING_FIELD",
    ));

    // Statuses: unspecified and values outside the enum.
    for s in [0, 6, 7, 99, -1, i32::MAX, i32::MIN] {
        cases.push((
            format!("UpdateStatus.status = {s}"),
            Req::Update(pb::UpdateStatusRequest {
                id: ok_id.clone(),
                status: s,
                ..Default::default()
            }),
            "INVALID_STATUS",
        ));
        cases.push((
            format!("ListJobs.statuses = [PENDING, {s}]"),
            Req::List(pb::ListJobsRequest {
                statuses: vec![S::Pending as i32, s],
                ..Default::default()
            }),
            "INVALID_STATUS",
        ));
        cases.push((
            format!("StreamJobUpdates.statuses = [{s}]"),
            Req::Stream(pb::StreamJobUpdatesRequest {
                statuses: vec![s],
                ..Default::default()
            }),
            "INVALID_STATUS",
        ));
    }

    // Agent identifiers: control characters (C0, DEL, C1) and over 255 characters.
    let bad_agents: Vec<String> = vec![
        "a\nb".into(),
        "a\rb".into(),
        "a\tb".into(),
        "a\u{0}b".into(),
        "a\u{7f}".into(),
        "a\u{1b}[31m".into(),
        "a\u{85}".into(),
        // Invisible and bidirectional-control characters: different names that look the same.
        "a\u{202E}b".into(),
        "a\u{200B}".into(),
        "\u{FEFF}a".into(),
        "a\u{2066}b\u{2069}".into(),
        "a\u{200D}b".into(),
        "a\u{061C}".into(),
        "a\u{200E}".into(),
        "x".repeat(256),
        "ü".repeat(256),
    ];
    for a in &bad_agents {
        let short: String = a.chars().take(12).collect();
        cases.push((
            format!("CreateJob.agent_identifier = {short:?}…"),
            Req::Create(pb::CreateJobRequest {
                agent_identifier: a.clone(),
                ..Default::default()
            }),
            "INVALID_AGENT_IDENTIFIER",
        ));
        cases.push((
            format!("ListJobs.agent_identifier = {short:?}…"),
            Req::List(pb::ListJobsRequest {
                agent_identifier: a.clone(),
                ..Default::default()
            }),
            "INVALID_AGENT_IDENTIFIER",
        ));
        cases.push((
            format!("GetStats.agent_identifier = {short:?}…"),
            Req::Stats(pb::GetStatsRequest {
                agent_identifier: a.clone(),
                ..Default::default()
            }),
            "INVALID_AGENT_IDENTIFIER",
        ));
        cases.push((
            format!("StreamJobUpdates.agent_identifier = {short:?}…"),
            Req::Stream(pb::StreamJobUpdatesRequest {
                agent_identifier: a.clone(),
                ..Default::default()
            }),
            "INVALID_AGENT_IDENTIFIER",
        ));
    }
    cases.push((
        "CreateJob.agent_identifier empty".into(),
        Req::Create(pb::CreateJobRequest::default()),
        "INVALID_AGENT_IDENTIFIER",
    ));

    // Page sizes and page / resume tokens.
    for n in [-1, -50, i32::MIN] {
        cases.push((
            format!("ListJobs.page_size = {n}"),
            Req::List(pb::ListJobsRequest {
                page_size: n,
                ..Default::default()
            }),
            "INVALID_PAGE_SIZE",
        ));
        cases.push((
            format!("ListJobEvents.page_size = {n}"),
            Req::Events(pb::ListJobEventsRequest {
                job_id: ok_id.clone(),
                page_size: n,
                ..Default::default()
            }),
            "INVALID_PAGE_SIZE",
        ));
    }
    let bad_tokens: Vec<String> = vec![
        "x".into(),
        "AAAA".into(),
        "====".into(),
        "A".repeat(2000),
        "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8w".into(),
        "eyJhbGciOiJub25lIn0".into(),
        "%%%".into(),
    ];
    for t in &bad_tokens {
        let short: String = t.chars().take(12).collect();
        cases.push((
            format!("ListJobs.page_token = {short:?}"),
            Req::List(pb::ListJobsRequest {
                page_token: t.clone(),
                ..Default::default()
            }),
            "INVALID_PAGE_TOKEN",
        ));
        cases.push((
            format!("ListJobEvents.page_token = {short:?}"),
            Req::Events(pb::ListJobEventsRequest {
                job_id: ok_id.clone(),
                page_token: t.clone(),
                ..Default::default()
            }),
            "INVALID_PAGE_TOKEN",
        ));
        cases.push((
            format!("StreamJobUpdates.resume_token = {short:?}"),
            Req::Stream(pb::StreamJobUpdatesRequest {
                resume_token: t.clone(),
                ..Default::default()
            }),
            "INVALID_RESUME_TOKEN",
        ));
    }

    // request_id and error_message.
    for r in [
        "r".repeat(129),
        "a\nb".into(),
        "a\u{0}".into(),
        "a\u{7f}".into(),
    ] {
        let short: String = r.chars().take(12).collect();
        cases.push((
            format!("CreateJob.request_id = {short:?}"),
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "a".into(),
                request_id: r,
                ..Default::default()
            }),
            "INVALID_REQUEST_ID",
        ));
    }
    for (what, m, reason) in [
        ("with U+0000", "boom\u{0}".to_string(), "NUL_CHARACTER"),
        (
            "over 64 KiB",
            "e".repeat(64 * 1024 + 1),
            "PAYLOAD_TOO_LARGE",
        ),
    ] {
        cases.push((
            format!("UpdateStatus.error_message {what}"),
            Req::Update(pb::UpdateStatusRequest {
                id: ok_id.clone(),
                status: S::Failed as i32,
                error_message: m,
                ..Default::default()
            }),
            reason,
        ));
    }

    // JSON: numbers JSON cannot hold, U+0000 in keys and values at any depth, too deep, too big.
    let num = |f: f64| prost_types::Value {
        kind: Some(Kind::NumberValue(f)),
    };
    let text = |s: &str| prost_types::Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let strukt = |k: &str, v: prost_types::Value| prost_types::Struct {
        fields: [(k.to_string(), v)].into(),
    };
    let list = |v: prost_types::Value| prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue {
            values: vec![num(1.0), v],
        })),
    };
    let nested = |v: prost_types::Value| prost_types::Value {
        kind: Some(Kind::StructValue(strukt("inner", v))),
    };
    let json_cases: Vec<(&str, prost_types::Struct, &str)> = vec![
        ("NaN", strukt("n", num(f64::NAN)), "INVALID_NUMBER"),
        ("+inf", strukt("n", num(f64::INFINITY)), "INVALID_NUMBER"),
        (
            "-inf",
            strukt("n", num(f64::NEG_INFINITY)),
            "INVALID_NUMBER",
        ),
        (
            "NaN in a list",
            strukt("n", list(num(f64::NAN))),
            "INVALID_NUMBER",
        ),
        (
            "U+0000 in a value",
            strukt("k", text("a\u{0}")),
            "NUL_CHARACTER",
        ),
        (
            "U+0000 in a key",
            strukt("k\u{0}", text("a")),
            "NUL_CHARACTER",
        ),
        (
            "U+0000 nested",
            strukt("k", nested(text("\u{0}"))),
            "NUL_CHARACTER",
        ),
        (
            "U+0000 in a list",
            strukt("k", list(text("\u{0}"))),
            "NUL_CHARACTER",
        ),
        ("33 levels", deep(33), "PAYLOAD_TOO_DEEP"),
        (
            "200 levels (beyond the decoder's limit)",
            deep(200),
            "MALFORMED_MESSAGE",
        ),
        (
            "over 1 MiB",
            strukt("s", text(&"x".repeat((1 << 20) + 1))),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "of 300,000 zeros (600 KB of JSON, 3.3 MB encoded: past the job's limit)",
            strukt(
                "z",
                prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue {
                        values: vec![num(0.0); 300_000],
                    })),
                },
            ),
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (what, s, reason) in json_cases {
        cases.push((
            format!("CreateJob.job_data {what}"),
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "a".into(),
                job_data: Some(s.clone()),
                ..Default::default()
            }),
            reason,
        ));
        cases.push((
            format!("UpdateStatus.result {what}"),
            Req::Update(pb::UpdateStatusRequest {
                id: ok_id.clone(),
                status: S::Completed as i32,
                result: Some(prost_types::Value {
                    kind: Some(Kind::StructValue(s.clone())),
                }),
                ..Default::default()
            }),
            reason,
        ));
        cases.push((
            format!("ListJobs.job_data_contains {what}"),
            Req::List(pb::ListJobsRequest {
                job_data_contains: Some(s),
                ..Default::default()
            }),
            reason,
        ));
    }

    // Durations and timestamps.
    for (s, n) in [(-1i64, 0i32), (0, -1), (-100, 0)] {
        let d = prost_types::Duration {
            seconds: s,
            nanos: n,
        };
        cases.push((
            format!("WaitJob.timeout = {s}s {n}ns"),
            Req::Wait(pb::WaitJobRequest {
                id: ok_id.clone(),
                timeout: Some(d),
            }),
            "INVALID_DURATION",
        ));
        cases.push((
            format!("ListJobs.running_longer_than = {s}s {n}ns"),
            Req::List(pb::ListJobsRequest {
                running_longer_than: Some(d),
                ..Default::default()
            }),
            "INVALID_DURATION",
        ));
    }
    // Longer than the database can subtract from now (protobuf's own limit, and i64::MAX).
    for (s, n) in [
        (315_576_000_000i64, 0i32),
        (i64::MAX, 999_999_999),
        (3_155_760_001, 0),
    ] {
        cases.push((
            format!("ListJobs.running_longer_than = {s}s {n}ns"),
            Req::List(pb::ListJobsRequest {
                running_longer_than: Some(prost_types::Duration {
                    seconds: s,
                    nanos: n,
                }),
                ..Default::default()
            }),
            "INVALID_DURATION",
        ));
    }
    for (s, n) in [
        (0i64, -1i32),
        (0, 1_000_000_000),
        (i64::MAX, 0),
        (i64::MIN, 0),
        // Outside protobuf's range (years 1 to 9999), though chrono holds them.
        (-62_135_596_801, 0),
        (253_402_300_800, 0),
        (-8_210_266_876_800, 0),
        (8_210_266_876_799, 0),
    ] {
        let t = prost_types::Timestamp {
            seconds: s,
            nanos: n,
        };
        cases.push((
            format!("ListJobs.created_after = {s}s {n}ns"),
            Req::List(pb::ListJobsRequest {
                created_after: Some(t),
                ..Default::default()
            }),
            "INVALID_TIMESTAMP",
        ));
        cases.push((
            format!("ListJobs.created_before = {s}s {n}ns"),
            Req::List(pb::ListJobsRequest {
                created_before: Some(t),
                ..Default::default()
            }),
            "INVALID_TIMESTAMP",
        ));
    }

    // Workers: ClaimJobs, Heartbeat, and the workers' fields of CreateJob, UpdateStatus and
    // StreamJobUpdates.
    let secs = |s: f64| prost_types::Duration {
        seconds: s.trunc() as i64,
        nanos: (s.fract() * 1e9) as i32,
    };
    let claim = |agent: &str, max_jobs: i32, lease: f64, wait: f64, worker: &str| {
        Req::Claim(pb::ClaimJobsRequest {
            agent_identifier: agent.into(),
            max_jobs,
            lease_duration: Some(secs(lease)),
            wait: Some(secs(wait)),
            worker_id: worker.into(),
            user_id: String::new(),
        })
    };
    let worker_cases: Vec<(&str, Req, &str)> = vec![
        (
            "ClaimJobs.max_jobs = -1",
            claim("bad", -1, 30.0, 0.0, ""),
            "INVALID_MAX_JOBS",
        ),
        (
            "ClaimJobs.max_jobs = 101",
            claim("bad", 101, 30.0, 0.0, ""),
            "INVALID_MAX_JOBS",
        ),
        (
            "ClaimJobs.lease_duration = -1s",
            claim("bad", 1, -1.0, 0.0, ""),
            "INVALID_DURATION",
        ),
        (
            "ClaimJobs.lease_duration = 0.5s",
            claim("bad", 1, 0.5, 0.0, ""),
            "INVALID_DURATION",
        ),
        (
            "ClaimJobs.lease_duration = 2h",
            claim("bad", 1, 7200.0, 0.0, ""),
            "INVALID_DURATION",
        ),
        (
            "ClaimJobs.wait = 61s",
            claim("bad", 1, 30.0, 61.0, ""),
            "INVALID_DURATION",
        ),
        (
            "ClaimJobs.agent_identifier empty",
            claim("", 1, 30.0, 0.0, ""),
            "INVALID_AGENT_IDENTIFIER",
        ),
        (
            "ClaimJobs.worker_id with a control character",
            claim("bad", 1, 30.0, 0.0, "w\u{7}"),
            "INVALID_WORKER_ID",
        ),
        (
            "StreamJobUpdates.worker_id with a control character",
            Req::Stream(pb::StreamJobUpdatesRequest {
                worker_id: "w\u{7}".into(),
                ..Default::default()
            }),
            "INVALID_WORKER_ID",
        ),
        (
            "CreateJob.priority = 1001",
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "bad".into(),
                priority: 1001,
                ..Default::default()
            }),
            "INVALID_PRIORITY",
        ),
        (
            "CreateJob.max_attempts = 101",
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "bad".into(),
                max_attempts: 101,
                ..Default::default()
            }),
            "INVALID_MAX_ATTEMPTS",
        ),
        (
            "CreateJob.max_attempts = -1",
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "bad".into(),
                max_attempts: -1,
                ..Default::default()
            }),
            "INVALID_MAX_ATTEMPTS",
        ),
        (
            "CreateJob.initial_backoff = 2h",
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "bad".into(),
                max_attempts: 2,
                initial_backoff: Some(secs(7200.0)),
                ..Default::default()
            }),
            "INVALID_DURATION",
        ),
        (
            "CreateJob.run_after in the year 10000",
            Req::Create(pb::CreateJobRequest {
                agent_identifier: "bad".into(),
                run_after: Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            "INVALID_TIMESTAMP",
        ),
        (
            "UpdateStatus.no_retry without lease_id",
            Req::Update(pb::UpdateStatusRequest {
                id: ok_id.clone(),
                status: S::Failed as i32,
                no_retry: true,
                ..Default::default()
            }),
            "MISSING_FIELD",
        ),
        (
            "Heartbeat.lease_id empty",
            Req::Beat(pb::HeartbeatRequest {
                id: ok_id.clone(),
                ..Default::default()
            }),
            "MISSING_FIELD",
        ),
        (
            "Heartbeat.id = \"nope\"",
            Req::Beat(pb::HeartbeatRequest {
                id: "nope".into(),
                lease_id: "x".into(),
                ..Default::default()
            }),
            "INVALID_UUID",
        ),
    ];
    for (name, req, reason) in worker_cases {
        cases.push((name.to_string(), req, reason));
    }

    let total = cases.len();
    assert!(total >= 300, "the corpus has {total} cases");
    let mut wrong = Vec::new();
    for (name, req, want) in cases {
        match send(&mut c, req).await {
            Ok(()) => wrong.push(format!("{name}: accepted")),
            Err(status) => {
                let got = crate::harness::reason(&status);
                if status.code() != Code::InvalidArgument || got != want {
                    wrong.push(format!(
                        "{name}: {:?} {got}, want InvalidArgument {want}",
                        status.code()
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} cases wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Nothing was written: still the one job, untouched.
    let listed = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed, vec![job]);
    server.stop().await;
}

/// Sends bytes as they are, whatever the RPC expects.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Bytes that are not protobuf at all, or not the RPC's request type, to every RPC: INVALID_ARGUMENT
/// MALFORMED_MESSAGE. A request over the message size limit (4 MiB): RESOURCE_EXHAUSTED
/// MESSAGE_TOO_LARGE. Nothing is written and the server keeps serving.
#[tokio::test]
async fn raw_malformed_and_oversized_messages_get_exact_codes_and_reasons() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let token: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", crate::harness::service_token())
            .parse()
            .unwrap();
    let methods = [
        ("CreateJob", false),
        ("GetJob", false),
        ("UpdateStatus", false),
        ("CancelJob", false),
        ("WaitJob", false),
        ("ListJobs", false),
        ("ListJobEvents", false),
        ("GetStats", false),
        ("StreamJobUpdates", true),
    ];
    let oversized = {
        // Field 1 as a 4 MiB string: the size alone must refuse it.
        let mut b = vec![0x0a, 0x80, 0x80, 0x80, 0x02];
        b.resize(b.len() + (4 << 20), b'a');
        b
    };
    let payloads: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "wire type 7",
            vec![0xff],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "field 0",
            vec![0x00, 0x01],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "truncated varint",
            vec![0x08, 0x80],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "length past the end",
            vec![0x0a, 0x05, b'a'],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "field 1 with invalid UTF-8",
            vec![0x0a, 0x02, 0xc3, 0x28],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "overlong varint tag",
            vec![0x80; 11],
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
        ),
        (
            "over the size limit",
            oversized,
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
        ),
    ];
    let mut grpc =
        tonic::client::Grpc::new(server.channel().await).max_encoding_message_size(usize::MAX);
    let mut wrong = Vec::new();
    let mut total = 0;
    for (method, streaming) in methods {
        for (what, bytes, code, want) in &payloads {
            total += 1;
            let path =
                http::uri::PathAndQuery::try_from(format!("/jobs.v1.JobService/{method}")).unwrap();
            let mut req = tonic::Request::new(bytes.clone());
            req.metadata_mut().insert("authorization", token.clone());
            grpc.ready().await.unwrap();
            let result = if streaming {
                grpc.server_streaming(req, path, Raw).await.map(drop)
            } else {
                grpc.unary(req, path, Raw).await.map(drop)
            };
            match result {
                Ok(()) => wrong.push(format!("{method} {what}: accepted")),
                Err(status) => {
                    let got = crate::harness::reason(&status);
                    if status.code() != *code || got != *want {
                        wrong.push(format!("{method} {what}: {status:?}"));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Nothing was written, and the server still answers.
    assert!(crate::harness::all_jobs(&mut c).await.is_empty());
    server.stop().await;
}
