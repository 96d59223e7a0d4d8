//! The change feed under stress: writers committing out of order, a subscriber that stops
//! reading, and the database restarting under an open stream.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use jobsvc::pb::{self, job_update::Event as U};
use tokio::time::{Instant, timeout};
use tonic::Streaming;

use crate::harness::{TestServer, create, fresh_database, new_cluster, shared_pg};

/// Job ids read from `stream` until `want` distinct ones arrived or `limit` passed; counts
/// every delivery, so duplicates show.
async fn gather(
    stream: &mut Streaming<pb::JobUpdate>,
    want: usize,
    limit: Duration,
) -> (
    HashMap<String, usize>,
    Option<String>,
    Option<tonic::Status>,
) {
    let deadline = Instant::now() + limit;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last_token = None;
    while seen.len() < want {
        let Ok(msg) = timeout(
            deadline.saturating_duration_since(Instant::now()),
            stream.message(),
        )
        .await
        else {
            break;
        };
        match msg {
            Ok(Some(u)) => {
                if !u.resume_token.is_empty() {
                    last_token = Some(u.resume_token.clone());
                }
                if let Some(U::Job(j)) = u.event {
                    *seen.entry(j.id).or_default() += 1;
                }
            }
            Ok(None) => break,
            Err(status) => return (seen, last_token, Some(status)),
        }
    }
    (seen, last_token, None)
}

async fn synced(stream: &mut Streaming<pb::JobUpdate>) {
    loop {
        let u = timeout(Duration::from_secs(15), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(u.event, Some(U::Synced(_))) {
            return;
        }
    }
}

async fn ids_of(db_url: &str, agent: &str) -> HashSet<String> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    let mut conn = jobsvc::db::connect(db_url).await.unwrap();
    let rows: Vec<Id> = diesel::sql_query(format!(
        "SELECT id::text AS id FROM jobs WHERE agent_identifier = '{agent}'"
    ))
    .load(&mut conn)
    .await
    .unwrap();
    rows.into_iter().map(|r| r.id).collect()
}

/// Transactions take their ids in one order and commit in another. Plain SQL writers hold
/// theirs open (some for 300 ms) while jobsvc commits keep the feed moving; a reader that
/// advanced past a still-open transaction would lose its job. Every job must arrive, once.
#[tokio::test]
async fn concurrent_writers_committing_out_of_order_lose_nothing() {
    let server = TestServer::start().await;
    let mut c = server.service().await;
    let mut stream = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            agent_identifier: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    synced(&mut stream).await;

    let mut tasks = Vec::new();
    for writer in 0..8 {
        let url = server.db_url.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = jobsvc::db::connect(&url).await.unwrap();
            for i in 0..12 {
                let hold = if (writer + i) % 5 == 0 { 0.3 } else { 0.01 * (i % 4) as f64 };
                conn.batch_execute(&format!(
                    "BEGIN; \
                     INSERT INTO jobs (agent_identifier, job_data) VALUES ('w', '{{\"w\": {writer}, \"i\": {i}}}'); \
                     SELECT pg_sleep({hold}); \
                     COMMIT"
                ))
                .await
                .unwrap();
            }
        }));
    }
    for _ in 0..2 {
        let mut w = server.service().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..60 {
                w.create_job(create("w")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected = ids_of(&server.db_url, "w").await;
    assert_eq!(expected.len(), 8 * 12 + 2 * 60);
    let (seen, _, err) = gather(&mut stream, expected.len(), Duration::from_secs(15)).await;
    assert!(err.is_none(), "{err:?}");
    let got: HashSet<String> = seen.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{} jobs never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert!(seen.values().all(|&n| n == 1), "a job delivered twice");
    server.stop().await;
}

/// A subscriber that stops reading while 5,000 changes happen delays nobody: a second one
/// gets every change within 2 s of its commit, and the stalled one, once it reads again,
/// gets every change too (from the history: its small queue overflowed long ago).
#[tokio::test]
async fn a_stalled_subscriber_slows_no_one_and_still_gets_everything() {
    let pg = shared_pg().await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--stream-queue-events", "16"]).await;
    let mut slow_client = server.service().await;
    let mut slow = slow_client
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            agent_identifier: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    synced(&mut slow).await;

    let mut fast_client = server.service().await;
    let mut fast = fast_client
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            agent_identifier: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    synced(&mut fast).await;
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let reader = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Ok(Some(u)) = fast.message().await {
                if let Some(U::Job(j)) = u.event {
                    arrivals.lock().unwrap().insert(j.id, Instant::now());
                }
            }
        })
    };

    // 5,000 changes: 100 commits of 50 jobs, from plain SQL, and their commit times. Each job
    // carries 2 kB, so the stalled stream's 10 MB overflow every buffer on the way (HTTP/2
    // windows, the server's queue) and the server has to drop its events.
    let mut conn = jobsvc::db::connect(&url).await.unwrap();
    let mut committed: Vec<(Instant, Vec<String>)> = Vec::new();
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    for _ in 0..100 {
        let rows: Vec<Id> = diesel::sql_query(
            "INSERT INTO jobs (agent_identifier, job_data) \
             SELECT 's', jsonb_build_object('pad', repeat('x', 2000)) FROM generate_series(1, 50) \
             RETURNING id::text AS id",
        )
        .load(&mut conn)
        .await
        .unwrap();
        committed.push((Instant::now(), rows.into_iter().map(|r| r.id).collect()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all: HashSet<String> = committed.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(all.len(), 5000);
    crate::harness::eventually(
        Duration::from_secs(20),
        "the fast subscriber has all 5,000",
        || {
            let n = arrivals.lock().unwrap().len();
            async move { n == 5000 }
        },
    )
    .await;
    let arrivals = arrivals.lock().unwrap().clone();
    let arrivals = &arrivals;
    let worst = committed
        .iter()
        .flat_map(|(at, ids)| {
            ids.iter()
                .map(move |id| arrivals[id].saturating_duration_since(*at))
        })
        .max()
        .unwrap();
    assert!(
        worst < Duration::from_secs(2),
        "a change reached the fast subscriber after {worst:?}"
    );
    reader.abort();

    // The stalled subscriber reads again: every change, in order of commit batches.
    let (seen, _, err) = gather(&mut slow, 5000, Duration::from_secs(30)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), all);
    assert!(seen.values().all(|&n| n == 1));
    server.stop().await;
}

/// The database restarts under an open stream: every committed change is still delivered,
/// on the same stream or, if it ended, by resuming from its last token.
#[tokio::test]
async fn a_database_restart_loses_no_committed_change() {
    let pg = new_cluster("restart").await;
    let url = fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &[]).await;
    let mut c = server.service().await;
    let mut stream = c
        .stream_job_updates(pb::StreamJobUpdatesRequest {
            agent_identifier: "d".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    synced(&mut stream).await;
    let mut token = None;
    let mut expected = HashSet::new();
    for _ in 0..10 {
        expected.insert(c.create_job(create("d")).await.unwrap().into_inner().id);
    }
    // Straight into a restart, before the stream had time to deliver.
    pg.stop().await;
    pg.start().await.unwrap();
    let mut made = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while made < 10 {
        assert!(
            Instant::now() < deadline,
            "jobsvc did not recover from the restart"
        );
        match c.create_job(create("d")).await {
            Ok(job) => {
                expected.insert(job.into_inner().id);
                made += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut seen = HashMap::new();
    for _attempt in 0..5 {
        let (got, last, err) = gather(
            &mut stream,
            expected.len() - seen.len(),
            Duration::from_secs(20),
        )
        .await;
        for (id, n) in got {
            *seen.entry(id).or_insert(0) += n;
        }
        token = last.or(token);
        if seen.len() >= expected.len() {
            break;
        }
        let err = err.expect("the stream either delivers everything or ends");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        stream = c
            .stream_job_updates(pb::StreamJobUpdatesRequest {
                agent_identifier: "d".into(),
                resume_token: token.clone().expect("a token to resume from"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), expected);
    server.stop().await;
    pg.stop().await;
}
