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
    jobsvc::convert::json_to_struct(serde_json::json!({ "a": v }))
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
        }
    };
    let big =
        jobsvc::convert::json_to_struct(serde_json::json!({ "s": "x".repeat((1 << 20) + 10) }));
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
                Some(jobsvc::convert::json_to_struct(
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
                Some(jobsvc::convert::json_to_struct(
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
