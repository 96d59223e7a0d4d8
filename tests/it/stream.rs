//! StreamJobUpdates and ListJobEvents: the change feed delivers every committed change, from
//! jobsvc, plain SQL and other replicas, resumes without loss, and isolates users.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use diesel_async::RunQueryDsl;
use jobsvc::pb::{self, JobStatus as S, job_update::Event as U};
use tokio::time::{Instant, timeout};
use tonic::{Code, Streaming};
use uuid::Uuid;

use crate::harness::{
    Client, TestServer, all_jobs, assert_err, create, fresh_database, shared_pg, update,
};

const WAIT: Duration = Duration::from_secs(15);

async fn open(client: &mut Client, req: pb::StreamJobUpdatesRequest) -> Streaming<pb::JobUpdate> {
    client.stream_job_updates(req).await.unwrap().into_inner()
}

/// The next message, failing the test after `WAIT`.
async fn next(stream: &mut Streaming<pb::JobUpdate>) -> pb::JobUpdate {
    timeout(WAIT, stream.message())
        .await
        .expect("a stream message within the wait")
        .expect("the stream stays healthy")
        .expect("the stream stays open")
}

/// Reads up to and including `synced`; returns the jobs before it.
async fn until_synced(stream: &mut Streaming<pb::JobUpdate>) -> Vec<pb::Job> {
    let mut jobs = Vec::new();
    loop {
        match next(stream).await.event.expect("an event") {
            U::Job(job) => jobs.push(job),
            U::Synced(_) => return jobs,
            U::Heartbeat(_) => {}
        }
    }
}

/// Reads job messages (skipping heartbeats) until `done` holds for what was collected;
/// returns the jobs with the resume token of each.
async fn collect_until(
    stream: &mut Streaming<pb::JobUpdate>,
    mut done: impl FnMut(&[(pb::Job, String)]) -> bool,
) -> Vec<(pb::Job, String)> {
    let mut out = Vec::new();
    while !done(&out) {
        let update = next(stream).await;
        match update.event.expect("an event") {
            U::Job(job) => {
                assert!(
                    !update.resume_token.is_empty(),
                    "live jobs carry a resume token"
                );
                out.push((job, update.resume_token));
            }
            U::Heartbeat(_) => {}
            U::Synced(_) => panic!("synced comes once"),
        }
    }
    out
}

/// A plain connection to the server's database, as any SQL client would have.
async fn sql(db_url: &str) -> diesel_async::AsyncPgConnection {
    jobsvc::db::connect(db_url).await.unwrap()
}

#[tokio::test]
async fn create_and_every_transition_arrive_whole_and_in_version_order() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = open(&mut c, Default::default()).await;
    assert!(until_synced(&mut stream).await.is_empty());

    let created = c
        .create_job(pb::CreateJobRequest {
            agent_identifier: "a".into(),
            job_data: Some(prost_types::Struct {
                fields: [("k".to_string(), prost_types::Value::from("v"))].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let running = c
        .update_status(update(&created.id, S::Running))
        .await
        .unwrap()
        .into_inner();
    let completed = c
        .update_status(pb::UpdateStatusRequest {
            result: Some(prost_types::Value::from(42.0)),
            ..update(&created.id, S::Completed)
        })
        .await
        .unwrap()
        .into_inner();

    let got = collect_until(&mut stream, |v| v.len() == 3).await;
    let jobs: Vec<&pb::Job> = got.iter().map(|(j, _)| j).collect();
    // The whole job at each version, exactly as the RPCs returned it.
    assert_eq!(jobs, vec![&created, &running, &completed]);
    assert_eq!(
        jobs.iter().map(|j| j.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // The same history through ListJobEvents, paged.
    let page = c
        .list_job_events(pb::ListJobEventsRequest {
            job_id: created.id.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.events.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(page.events[0].status, S::Pending as i32);
    assert_eq!(page.events[1].status, S::Running as i32);
    assert!(
        page.events
            .iter()
            .all(|e| e.job_id == created.id && e.occurred_at.is_some())
    );
    let rest = c
        .list_job_events(pb::ListJobEventsRequest {
            job_id: created.id.clone(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.events[0].version, 3);
    assert_eq!(rest.events[0].status, S::Completed as i32);
    assert!(rest.next_page_token.is_empty());

    // A page token belongs to its job; an unknown job is NOT_FOUND; bad ids are refused.
    let other = c.create_job(create("a")).await.unwrap().into_inner();
    assert_err(
        c.list_job_events(pb::ListJobEventsRequest {
            job_id: other.id.clone(),
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_err(
        c.list_job_events(pb::ListJobEventsRequest {
            job_id: Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    assert_err(
        c.list_job_events(pb::ListJobEventsRequest {
            job_id: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_UUID",
    );
    server.stop().await;
}

#[tokio::test]
async fn include_existing_while_jobs_are_created_misses_and_repeats_nothing() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    for _ in 0..50 {
        c.create_job(create("snap")).await.unwrap();
    }
    // Writers keep creating while the stream takes its snapshot and attaches.
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut w = server.service().await;
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..60 {
                ids.push(w.create_job(create("snap")).await.unwrap().into_inner().id);
            }
            ids
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut stream = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            include_existing: true,
            agent_identifier: "snap".into(),
            ..Default::default()
        },
    )
    .await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for job in until_synced(&mut stream).await {
        *seen.entry(job.id).or_default() += 1;
    }
    let mut all = HashSet::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    let listed = all_jobs(&mut c).await;
    assert_eq!(listed.len(), 50 + 240);
    let expected: HashSet<String> = listed.into_iter().map(|j| j.id).collect();
    let missing = expected.len() - seen.len();
    let live = collect_until(&mut stream, |v| v.len() >= missing).await;
    for (job, _) in live {
        *seen.entry(job.id).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "every job, once"
    );
    assert!(seen.values().all(|&n| n == 1), "no job twice: {seen:?}");
    // And nothing more follows.
    c.create_job(create("other")).await.unwrap();
    let marker = c.create_job(create("snap")).await.unwrap().into_inner();
    let tail = collect_until(&mut stream, |v| !v.is_empty()).await;
    assert_eq!(tail[0].0.id, marker.id);
    server.stop().await;
}

#[tokio::test]
async fn plain_sql_changes_are_delivered() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let job = c.create_job(create("sql")).await.unwrap().into_inner();
    let mut stream = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            job_ids: vec![job.id.clone()],
            ..Default::default()
        },
    )
    .await;
    until_synced(&mut stream).await;
    let mut conn = sql(&server.db_url).await;
    diesel::sql_query(format!(
        "UPDATE jobs SET status = 'running', started_at = now() WHERE id = '{}'",
        job.id
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let got = collect_until(&mut stream, |v| !v.is_empty()).await;
    assert_eq!(got[0].0.id, job.id);
    assert_eq!(got[0].0.version, 2);
    assert_eq!(got[0].0.status, S::Running as i32);
    assert!(got[0].0.started_at.is_some());
    server.stop().await;
}

#[tokio::test]
async fn a_change_through_one_replica_reaches_a_subscriber_on_another() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let a = TestServer::start_on(&url, &[]).await;
    // B polls the history only every minute: the change must come by NOTIFY.
    let b = TestServer::start_on(&url, &["--feed-poll-interval", "60s"]).await;
    let mut on_b = b.service().await;
    let mut stream = open(&mut on_b, Default::default()).await;
    until_synced(&mut stream).await;
    let mut on_a = a.service().await;
    let job = on_a.create_job(create("x")).await.unwrap().into_inner();
    let started = Instant::now();
    let got = collect_until(&mut stream, |v| !v.is_empty()).await;
    assert_eq!(got[0].0, job);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "delivered by notification, not by B's 60 s poll"
    );
    // WaitJob on B wakes for a change made through A.
    let waiter = tokio::spawn(async move {
        on_b.wait_job(pb::WaitJobRequest {
            id: job.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let id = got[0].0.id.clone();
    on_a.update_status(update(&id, S::Cancelled)).await.unwrap();
    let waited = timeout(WAIT, waiter).await.unwrap().unwrap();
    assert_eq!(waited.status, S::Cancelled as i32);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn resuming_with_the_last_token_delivers_everything_missed() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = open(&mut c, Default::default()).await;
    until_synced(&mut stream).await;
    let first = c.create_job(create("r")).await.unwrap().into_inner();
    let got = collect_until(&mut stream, |v| !v.is_empty()).await;
    assert_eq!(got[0].0.id, first.id);
    let token = got[0].1.clone();
    drop(stream);

    // 100 changes while disconnected: 25 jobs created, each moved three times.
    let mut expected = Vec::new();
    for _ in 0..25 {
        let j = c.create_job(create("r")).await.unwrap().into_inner();
        expected.push((j.id.clone(), 1));
        for (v, s) in [(2, S::Running), (3, S::Completed)] {
            c.update_status(update(&j.id, s)).await.unwrap();
            expected.push((j.id.clone(), v));
        }
    }
    c.update_status(update(&first.id, S::Running))
        .await
        .unwrap();
    expected.push((first.id.clone(), 2));
    // 25 * 3 + 1 = 76 changes so far; 24 new jobs make 100.
    for _ in 0..24 {
        let j = c.create_job(create("r")).await.unwrap().into_inner();
        expected.push((j.id, 1));
    }
    assert_eq!(expected.len(), 100);

    let mut resumed = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            resume_token: token,
            ..Default::default()
        },
    )
    .await;
    // The missed changes come first (caught up from the history), then `synced`.
    let mut got: Vec<(String, i64)> = until_synced(&mut resumed)
        .await
        .into_iter()
        .map(|j| (j.id, j.version))
        .collect();
    let rest = collect_until(&mut resumed, |v| got.len() + v.len() >= 100).await;
    got.extend(rest.into_iter().map(|(j, _)| (j.id, j.version)));
    assert_eq!(
        got.iter().cloned().collect::<HashSet<_>>(),
        expected.iter().cloned().collect::<HashSet<_>>()
    );
    assert_eq!(got.len(), 100, "nothing twice");
    // Per job, in version order.
    let mut last: HashMap<&str, i64> = HashMap::from([(first.id.as_str(), 1)]);
    for (id, v) in &got {
        let prev = last.insert(id, *v).unwrap_or(0);
        assert_eq!(*v, prev + 1, "job {id} out of order");
    }
    server.stop().await;
}

#[tokio::test]
async fn resume_tokens_are_checked() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = open(&mut c, Default::default()).await;
    let synced = next(&mut stream).await;
    assert!(matches!(synced.event, Some(U::Synced(_))));
    let token = synced.resume_token;
    assert!(!token.is_empty());
    drop(stream);
    for bogus in ["junk", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        let err = c
            .stream_job_updates(pb::StreamJobUpdatesRequest {
                resume_token: bogus.into(),
                ..Default::default()
            })
            .await;
        assert_err(err, Code::InvalidArgument, "INVALID_RESUME_TOKEN");
    }
    // History pruned past the token: OUT_OF_RANGE, and the client knows to re-list.
    c.create_job(create("p")).await.unwrap();
    // Pruning never passes the horizon, which other tests' open transactions on the shared
    // cluster may hold back for a moment: prune until the new job's event is gone.
    crate::harness::eventually(WAIT, "the history to be pruned", || async {
        #[derive(diesel::QueryableByName)]
        struct Pruned {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = sql(&server.db_url).await;
        diesel::sql_query("SELECT job_events_prune('0 seconds', 100000) AS n")
            .get_result::<Pruned>(&mut conn)
            .await
            .unwrap()
            .n
            > 0
    })
    .await;
    let err = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            resume_token: token,
            ..Default::default()
        })
        .await;
    assert_err(err, Code::OutOfRange, "RESUME_TOKEN_EXPIRED");
    // A well-signed position this database never reached (a token from before a restore,
    // or from another database) is out of range too, not silently waited for.
    let future = jobsvc::api::tokens::TokenKey::derive(crate::harness::SECRET.as_bytes())
        .resume_token(
            &jobsvc::domain::Caller::new(jobsvc::domain::Role::Service, i64::MAX),
            jobsvc::domain::Position {
                xid: 1 << 40,
                seq: 1,
            },
        );
    let err = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            resume_token: future,
            ..Default::default()
        })
        .await;
    assert_err(err, Code::OutOfRange, "RESUME_TOKEN_EXPIRED");
    server.stop().await;
}

/// jsonb holds values JSON libraries cannot (a number beyond f64, written by plain SQL): such
/// a row is delivered with a marker and does not stop the feed for the changes after it.
#[tokio::test]
async fn an_unrepresentable_value_does_not_stop_the_feed() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = open(&mut c, Default::default()).await;
    until_synced(&mut stream).await;
    let mut conn = sql(&server.db_url).await;
    diesel::sql_query(
        "INSERT INTO jobs (agent_identifier, job_data) VALUES ('huge', '{\"x\": 1e400}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let after = c.create_job(create("after")).await.unwrap().into_inner();
    let got = collect_until(&mut stream, |v| v.len() == 2).await;
    assert_eq!(got[0].0.agent_identifier, "huge");
    let marker = &got[0].0.job_data.as_ref().unwrap().fields;
    assert!(marker.contains_key("jobsvc_error"), "{marker:?}");
    assert_eq!(got[1].0, after);
    server.stop().await;
}

/// Streams whose clients do not read never hold pooled connections: with more such
/// `include_existing` streams than the pool has connections, other calls still answer.
#[tokio::test]
async fn streams_that_are_not_read_do_not_starve_other_calls() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut conn = sql(&server.db_url).await;
    diesel::sql_query(
        "INSERT INTO jobs (agent_identifier, job_data) \
         SELECT 'big', jsonb_build_object('pad', repeat('x', 4000)) FROM generate_series(1, 1500)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut idle = Vec::new();
    for _ in 0..12 {
        // 12 streams (the pool has 8 connections), each with 6 MB to send, none read.
        let mut s = server.service().await;
        idle.push(
            s.stream_job_updates(pb::StreamJobUpdatesRequest {
                include_existing: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    let job = c.create_job(create("probe")).await.unwrap().into_inner();
    for _ in 0..20 {
        let got = timeout(
            Duration::from_secs(5),
            c.get_job(pb::GetJobRequest { id: job.id.clone() }),
        )
        .await
        .expect("answered while the streams stall")
        .unwrap();
        assert_eq!(got.into_inner().id, job.id);
    }
    drop(idle);
    server.stop().await;
}

#[tokio::test]
async fn history_follows_the_jobs_current_owner_and_existence() {
    let server = TestServer::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a = server.user(alice).await;
    let job = a.create_job(create("h")).await.unwrap().into_inner();
    let req = || pb::ListJobEventsRequest {
        job_id: job.id.clone(),
        ..Default::default()
    };
    assert_eq!(
        a.list_job_events(req())
            .await
            .unwrap()
            .into_inner()
            .events
            .len(),
        1
    );
    // Given to Bob by plain SQL: Alice no longer reads its history.
    let mut conn = sql(&server.db_url).await;
    diesel::sql_query(format!(
        "UPDATE jobs SET user_id = '{bob}' WHERE id = '{}'",
        job.id
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_err(
        a.list_job_events(req()).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    // Deleted: nobody does.
    diesel::sql_query(format!("DELETE FROM jobs WHERE id = '{}'", job.id))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut svc = server.service().await;
    assert_err(
        svc.list_job_events(req()).await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_move_the_resume_point_and_expired_tokens_end_the_stream() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let server =
        TestServer::start_on(&url, &["--stream-heartbeat", "200ms", "--jwt-leeway", "0s"]).await;
    let mut c = server.service().await;
    let mut stream = open(&mut c, Default::default()).await;
    until_synced(&mut stream).await;
    let job = c.create_job(create("h")).await.unwrap().into_inner();
    collect_until(&mut stream, |v| !v.is_empty()).await;
    // Idle: a heartbeat with a token at or after the job's event.
    let beat = loop {
        let u = next(&mut stream).await;
        if matches!(u.event, Some(U::Heartbeat(_))) {
            break u;
        }
    };
    assert!(!beat.resume_token.is_empty());
    drop(stream);
    let later = c
        .update_status(update(&job.id, S::Running))
        .await
        .unwrap()
        .into_inner();
    let mut resumed = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            resume_token: beat.resume_token,
            ..Default::default()
        },
    )
    .await;
    // Caught up before `synced`, or live after it if an older transaction elsewhere in the
    // cluster still held the horizon back: either way once, and without the creation.
    let mut got = until_synced(&mut resumed).await;
    if got.is_empty() {
        got.push(
            collect_until(&mut resumed, |v| !v.is_empty())
                .await
                .remove(0)
                .0,
        );
    }
    assert_eq!(
        got,
        vec![later],
        "resumes after the heartbeat: the creation is not repeated"
    );

    // A token that expires in 2 s ends its stream with UNAUTHENTICATED.
    let short = jobsvc::api::auth::issue(
        crate::harness::SECRET.as_bytes(),
        "service_role",
        None,
        Duration::from_secs(2),
    );
    let mut sc = server.client(Some(&short)).await;
    let mut stream = open(&mut sc, Default::default()).await;
    let end = timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends soon after its token expires");
    assert_eq!(end.code(), Code::Unauthenticated);
    assert_eq!(crate::harness::reason(&end), "TOKEN_EXPIRED");
    server.stop().await;
}

#[tokio::test]
async fn a_user_never_sees_another_users_jobs() {
    let server = TestServer::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a = server.user(alice).await;
    let mut b = server.user(bob).await;
    let mut svc = server.service().await;
    b.create_job(create("old")).await.unwrap();
    let mine_before = a.create_job(create("old")).await.unwrap().into_inner();
    let mut stream = open(
        &mut a,
        pb::StreamJobUpdatesRequest {
            include_existing: true,
            ..Default::default()
        },
    )
    .await;
    let existing = until_synced(&mut stream).await;
    assert_eq!(existing, vec![mine_before]);
    for i in 0..10 {
        b.create_job(create("b")).await.unwrap();
        svc.create_job(create("nobody")).await.unwrap();
        if i % 2 == 0 {
            a.create_job(create("a")).await.unwrap();
        }
    }
    let marker = a.create_job(create("marker")).await.unwrap().into_inner();
    let got = collect_until(&mut stream, |v| {
        v.last().is_some_and(|(j, _)| j.id == marker.id)
    })
    .await;
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|(j, _)| j.user_id == alice.to_string()));
    // Asking for Bob's jobs is refused; so is reading their history.
    assert_err(
        a.stream_job_updates(pb::StreamJobUpdatesRequest {
            user_id: bob.to_string(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "USER_MISMATCH",
    );
    let bobs = b.create_job(create("b")).await.unwrap().into_inner();
    assert_err(
        a.list_job_events(pb::ListJobEventsRequest {
            job_id: bobs.id,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_stream_requests_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let cases = [
        (
            pb::StreamJobUpdatesRequest {
                job_ids: vec!["x".into()],
                ..Default::default()
            },
            "INVALID_UUID",
        ),
        (
            pb::StreamJobUpdatesRequest {
                statuses: vec![0],
                ..Default::default()
            },
            "INVALID_STATUS",
        ),
        (
            pb::StreamJobUpdatesRequest {
                statuses: vec![99],
                ..Default::default()
            },
            "INVALID_STATUS",
        ),
        (
            pb::StreamJobUpdatesRequest {
                job_ids: vec![Uuid::new_v4().to_string(); 1001],
                ..Default::default()
            },
            "TOO_MANY_JOB_IDS",
        ),
        (
            pb::StreamJobUpdatesRequest {
                user_id: "bob".into(),
                ..Default::default()
            },
            "INVALID_UUID",
        ),
    ];
    for (req, want) in cases {
        assert_err(c.stream_job_updates(req).await, Code::InvalidArgument, want);
    }
    let mut anon = server.client(None).await;
    assert_err(
        anon.stream_job_updates(pb::StreamJobUpdatesRequest::default())
            .await,
        Code::Unauthenticated,
        "TOKEN_MISSING",
    );
    server.stop().await;
}

/// A stream's tokens carry the snapshot its initial jobs came from while it matters: with a
/// transaction open elsewhere holding the horizon below changes the snapshot already shows,
/// resuming from `synced` repeats none of them.
#[tokio::test]
async fn resuming_from_synced_repeats_nothing_the_snapshot_showed() {
    use diesel_async::SimpleAsyncConnection;
    let server = TestServer::start().await;
    let mut c = server.service().await;
    // An open transaction that wrote: the horizon stays below everything after it.
    let mut holder = sql(&server.db_url).await;
    holder
        .batch_execute("BEGIN; INSERT INTO jobs (agent_identifier) VALUES ('holder')")
        .await
        .unwrap();
    let job = c.create_job(create("snap2")).await.unwrap().into_inner();
    let running = c
        .update_status(update(&job.id, S::Running))
        .await
        .unwrap()
        .into_inner();
    let mut stream = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            include_existing: true,
            agent_identifier: "snap2".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next(&mut stream).await.event, Some(U::Job(running.clone())));
    let synced = next(&mut stream).await;
    assert!(matches!(synced.event, Some(U::Synced(_))));
    drop(stream);
    let mut resumed = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            resume_token: synced.resume_token,
            agent_identifier: "snap2".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        until_synced(&mut resumed).await.is_empty(),
        "nothing before synced"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let done = c
        .update_status(update(&job.id, S::Completed))
        .await
        .unwrap()
        .into_inner();
    let got = collect_until(&mut resumed, |v| !v.is_empty()).await;
    assert_eq!(
        got[0].0, done,
        "the next change, not a replay of versions 1 and 2"
    );
    server.stop().await;
}

/// A user's stream that resumes reads only the user's own history: its catch-up statement is
/// served by the user's index, however much other tenants wrote in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_catch_up_reads_only_its_own_history() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let user = Uuid::new_v4();
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    // 20,000 events of other tenants, 3 of this user, as plain SQL writes them.
    diesel::sql_query(
        "INSERT INTO jobs (user_id, agent_identifier) \
         SELECT gen_random_uuid(), 'noise' FROM generate_series(1, 20000)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(format!(
        "INSERT INTO jobs (user_id, agent_identifier) SELECT '{user}', 'mine' FROM generate_series(1, 3)"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query("ANALYZE job_events")
        .execute(&mut conn)
        .await
        .unwrap();
    let plan = jobsvc::db::events::explain_read(&conn, jobsvc::domain::Position::default(), user)
        .await
        .unwrap();
    assert!(
        plan.contains("job_events_user_position"),
        "the catch-up read walks other tenants' history:\n{plan}"
    );
    server.stop().await;
}

/// A job without job_data (plain SQL may write NULL) weighs nothing in the feed's byte
/// budget, and neither a live stream nor a snapshot of existing jobs skips anything around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_without_job_data_are_neither_lost_nor_lose_others() {
    use diesel_async::RunQueryDsl;
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut live = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            agent_identifier: "n".into(),
            ..Default::default()
        },
    )
    .await;
    let mut conn = jobsvc::db::connect(&server.db_url).await.unwrap();
    // 1,500 creations in one transaction, more than one read of the history holds, with a
    // NULL job_data early in it.
    diesel::sql_query(
        "INSERT INTO jobs (agent_identifier, job_data) \
         SELECT 'n', CASE WHEN g = 10 THEN NULL ELSE '{}'::jsonb END FROM generate_series(1, 1500) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut seen = std::collections::HashSet::new();
    timeout(WAIT, async {
        while seen.len() < 1500 {
            if let Some(U::Job(j)) = live.message().await.unwrap().unwrap().event {
                seen.insert(j.id);
            }
        }
    })
    .await
    .expect("every creation reaches the live stream");
    // And a snapshot of the existing jobs holds all of them.
    let mut existing = open(
        &mut c,
        pb::StreamJobUpdatesRequest {
            agent_identifier: "n".into(),
            include_existing: true,
            ..Default::default()
        },
    )
    .await;
    let mut snapshot = std::collections::HashSet::new();
    timeout(WAIT, async {
        loop {
            match existing.message().await.unwrap().unwrap().event {
                Some(U::Job(j)) => {
                    snapshot.insert(j.id);
                }
                Some(U::Synced(_)) => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(snapshot.len(), 1500);
    server.stop().await;
}
