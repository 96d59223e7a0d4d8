//! What a job may hold is bounded so that every answer can be sent: the protobuf size of
//! job_data, result and error_message together, checked before anything is written; pages
//! that would pass the message limit end early instead.
use jobsvc::pb::{self, JobStatus as S};
use prost::Message;
use tonic::Code;

use crate::harness::{TestServer, assert_err};

fn zeros(n: usize) -> serde_json::Value {
    serde_json::Value::Array(vec![serde_json::json!(0); n])
}

fn data(v: serde_json::Value) -> Option<prost_types::Struct> {
    Some(jobsvc::api::convert::json_to_struct(
        serde_json::json!({ "v": v }),
    ))
}

/// Six jobs of 0.9 MB each would make a 5.4 MB page, past the 4 MiB message limit: the page
/// ends early with a token, and paging brings back all six, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_end_early_rather_than_pass_the_message_limit() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut made = Vec::new();
    for i in 0..6 {
        let job = c
            .create_job(pb::CreateJobRequest {
                agent_identifier: "big".into(),
                job_data: data(serde_json::json!(format!("{i}").repeat(900_000))),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        made.push(job.id);
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("every page can be sent")
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() < 4 << 20);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "one page held {} bytes of jobs", 6 * 900_000);
    seen.sort();
    made.sort();
    assert_eq!(seen, made);
    server.stop().await;
}

/// A create or a move that would take a job past the limit is refused with
/// PAYLOAD_TOO_LARGE and writes nothing, though its JSON is well under the JSON limit: a
/// Struct of zeros is eleven bytes a number, two in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_grows_past_what_can_be_sent() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    // 300,000 zeros: 600 KB of JSON, 3.3 MB of protobuf.
    let refused = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "big".into(),
            job_data: data(zeros(300_000)),
            ..Default::default()
        })
        .await;
    let status = assert_err(refused, Code::InvalidArgument, "PAYLOAD_TOO_LARGE");
    assert!(
        status.message().contains("job_data"),
        "{}",
        status.message()
    );
    assert!(crate::harness::all_jobs(&mut c).await.is_empty());

    // 2.75 MB of job_data is allowed; a 0.55 MB result on top of it is not.
    let job = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "big".into(),
            job_data: data(zeros(250_000)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = c
        .update_status(pb::UpdateStatusRequest {
            id: job.id.clone(),
            status: S::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let refused = c
        .update_status(pb::UpdateStatusRequest {
            id: job.id.clone(),
            status: S::Completed as i32,
            result: Some(jobsvc::api::convert::json_to_value(zeros(50_000))),
            ..Default::default()
        })
        .await;
    let status = assert_err(refused, Code::InvalidArgument, "PAYLOAD_TOO_LARGE");
    assert!(status.message().contains("result"), "{}", status.message());
    // Nothing was written: the job is as it was, and can still be read and listed.
    let now = c
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now, job);
    assert_eq!(crate::harness::all_jobs(&mut c).await.len(), 1);
    // A result that fits completes it.
    let done = c
        .update_status(pb::UpdateStatusRequest {
            id: job.id.clone(),
            status: S::Completed as i32,
            result: Some(jobsvc::api::convert::json_to_value(zeros(1_000))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, S::Completed as i32);
    server.stop().await;
}

/// Rows written by plain SQL carry no recorded size; the database computes it the way prost
/// encodes it, so the limit holds for them too.
#[tokio::test]
async fn the_database_measures_job_data_as_prost_does() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: uuid::Uuid,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        len: i64,
    }
    let docs = [
        r#"{}"#,
        r#"{"": 1, "a": null, "b": true, "c": [], "d": {}, "e": ""}"#,
        r#"{"k": [1, 2.5, "three", [null, {"x": false}]], "long": "ééééé", "n": -1e300}"#,
        &format!(
            r#"{{"pad": "{}", "list": [{}]}}"#,
            "x".repeat(300),
            vec!["0"; 200].join(",")
        ),
    ];
    let mut c = server.service().await;
    for doc in docs {
        let row: Row = diesel::sql_query(
            "INSERT INTO jobs (agent_identifier, job_data) VALUES ('sql', $1::jsonb) \
             RETURNING id, job_data_field_len(job_data) AS len",
        )
        .bind::<diesel::sql_types::Text, _>(doc)
        .get_result(&mut conn)
        .await
        .unwrap();
        let job = c
            .get_job(pb::GetJobRequest {
                id: row.id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        let prost = pb::Job {
            job_data: job.job_data,
            ..Default::default()
        }
        .encoded_len();
        assert_eq!(row.len as usize, prost, "{doc}");
    }
    server.stop().await;
}

/// Plain SQL that rewrites job_data makes the recorded size unknown again, so the size
/// check measures the new job_data: a result that no longer fits is refused, not applied.
#[tokio::test]
async fn a_job_data_rewritten_by_plain_sql_is_measured_again() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "sql".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.update_status(pb::UpdateStatusRequest {
        id: job.id.clone(),
        status: S::Running as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    diesel::sql_query(format!(
        "UPDATE jobs SET job_data = jsonb_build_object('v', (SELECT jsonb_agg(0) FROM generate_series(1, 250000))) WHERE id = '{}'",
        job.id
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let refused = c
        .update_status(pb::UpdateStatusRequest {
            id: job.id.clone(),
            status: S::Completed as i32,
            result: Some(jobsvc::api::convert::json_to_value(zeros(50_000))),
            ..Default::default()
        })
        .await;
    assert_err(refused, Code::InvalidArgument, "PAYLOAD_TOO_LARGE");
    server.stop().await;
}
