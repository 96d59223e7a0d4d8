//! Tokens signed with asymmetric keys (ES256, RS256, EdDSA) and verified against a JWK set from
//! a file or a URL (served by a small HTTP server inside the test), key rotation through the
//! set, and static API keys.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobsvc::api::auth::sign::SigningKey;
use jobsvc::pb::{self, job_service_client::JobServiceClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

use crate::harness::{self, TestServer, assert_err, eventually, health};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A new private key of `alg` (PKCS#8 PEM), ready to sign under `kid`.
fn new_key(alg: &'static rcgen::SignatureAlgorithm, kid: &str) -> (SigningKey, String) {
    let pair = rcgen::KeyPair::generate_for(alg).expect("generating a test key");
    let pem = pair.serialize_pem();
    (
        SigningKey::parse(&pem, Some(kid)).expect("a generated key signs"),
        pem,
    )
}

/// The public JWK set of `keys`, as a server loads it.
fn jwk_set(keys: &[&SigningKey]) -> String {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .flat_map(|k| {
            let set = serde_json::to_value(k.public_set().unwrap()).unwrap();
            set["keys"].as_array().unwrap().clone()
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

fn service_claims() -> serde_json::Value {
    // As Supabase's legacy service key says it: iss "supabase", no aud, no sub.
    serde_json::json!({"iss": "supabase", "role": "service_role", "iat": now(), "exp": now() + 600})
}

/// The claims of a Supabase user token, every one of them.
fn supabase_user_claims(user: Uuid, issuer: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": issuer, "aud": "authenticated", "sub": user.to_string(),
        "role": "authenticated", "exp": now() + 600, "iat": now(), "aal": "aal1",
        "session_id": Uuid::new_v4().to_string(), "is_anonymous": false,
        "email": "someone@example.com", "phone": "", "app_metadata": {"provider": "email"},
    })
}

async fn list(server: &TestServer, token: &str) -> Result<usize, tonic::Status> {
    server
        .client(Some(token))
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs.len())
}

#[track_caller]
fn refused(answer: Result<usize, tonic::Status>, code: Code, reason: &str) {
    assert_err(answer.map(tonic::Response::new), code, reason);
}

/// A JWK set served over HTTP: its body (None: answer 503), its Cache-Control max-age, and
/// how many times it was fetched.
#[derive(Clone)]
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<Option<String>>>,
    max_age: Arc<AtomicUsize>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start_on(listener: tokio::net::TcpListener, body: String, max_age: usize) -> Self {
        let server = JwksServer {
            addr: listener.local_addr().unwrap(),
            body: Arc::new(Mutex::new(Some(body))),
            max_age: Arc::new(AtomicUsize::new(max_age)),
            fetches: Arc::default(),
        };
        let shared = server.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    shared.fetches.fetch_add(1, Ordering::SeqCst);
                    let body = shared.body.lock().unwrap().clone();
                    let response = match body {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             cache-control: public, max-age={}\r\ncontent-length: {}\r\n\
                             connection: close\r\n\r\n{body}",
                            shared.max_age.load(Ordering::SeqCst),
                            body.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
                                 connection: close\r\n\r\n"
                            .to_string(),
                    };
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        server
    }

    async fn start(body: String, max_age: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, body, max_age).await
    }

    fn url(&self) -> String {
        format!("http://{}/auth/v1/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, body: Option<String>) {
        *self.body.lock().unwrap() = body;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// ES256, RS256 and EdDSA tokens verify by their kid; every kind of forgery and mismatch is
/// refused with UNAUTHENTICATED and its reason; a Supabase user token works end to end; a
/// file's new key is taken without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asymmetric_tokens_verify_by_kid_and_forgeries_are_refused() {
    const ISSUER: &str = "https://abcdefghijklmnop.supabase.co/auth/v1";
    let (es, es_pem) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "es-1");
    let (rs, _) = new_key(&rcgen::PKCS_RSA_SHA256, "rs-1");
    let (ed, _) = new_key(&rcgen::PKCS_ED25519, "ed-1");
    assert_eq!(
        (es.alg, rs.alg, ed.alg),
        (Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwk_set(&[&es, &rs, &ed])).unwrap();
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(
        &url,
        &[
            "--jwks-file",
            file.to_str().unwrap(),
            "--jwt-audience",
            "authenticated",
            "--jwt-issuer",
            ISSUER,
            "--jwt-issuer",
            "supabase",
        ],
    )
    .await;

    // Each algorithm, as the service role.
    for key in [&es, &rs, &ed] {
        let token = key.sign(
            &serde_json::json!({"iss": "supabase", "role": "service_role", "exp": now() + 600}),
        );
        assert_eq!(list(&server, &token).await.unwrap(), 0, "{:?}", key.alg);
    }

    // A Supabase user token (ES256, every claim): create, list, stream.
    let user = Uuid::new_v4();
    let token = es.sign(&supabase_user_claims(user, ISSUER));
    let mut client = server.client(Some(&token)).await;
    let made = client
        .create_job(harness::create("jwks"))
        .await
        .expect("an ES256 user token creates")
        .into_inner();
    assert_eq!(made.user_id, user.to_string());
    assert_eq!(list(&server, &token).await.unwrap(), 1);
    assert_eq!(harness::first_existing(&mut client).await.id, made.id);

    // Forgeries and mismatches.
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let es_encoding = EncodingKey::from_ec_pem(es_pem.as_bytes()).unwrap();
    let with_header = |alg: Algorithm, kid: Option<&str>, key: &EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &service_claims(), key).unwrap()
    };
    let (other_es, _) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "es-1");
    let public_bytes = jwk_set(&[&rs]);
    let hs_with_public = EncodingKey::from_secret(public_bytes.as_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "signed by another key under a known kid",
            other_es.sign(&service_claims()),
            "TOKEN_BAD_SIGNATURE",
        ),
        (
            "a kid the set does not hold",
            with_header(Algorithm::ES256, Some("es-9"), &es_encoding),
            "TOKEN_UNKNOWN_KEY",
        ),
        (
            "an asymmetric token without kid",
            with_header(Algorithm::ES256, None, &es_encoding),
            "TOKEN_INVALID",
        ),
        (
            "ES256 naming the RSA key",
            with_header(Algorithm::ES256, Some("rs-1"), &es_encoding),
            "TOKEN_INVALID",
        ),
        (
            "alg none naming a key",
            format!(
                "{}.{}.",
                b64(serde_json::json!({"alg": "none", "kid": "es-1"})),
                b64(service_claims())
            ),
            "TOKEN_INVALID",
        ),
        (
            "HS256 keyed with the published key, naming it",
            with_header(Algorithm::HS256, Some("rs-1"), &hs_with_public),
            "TOKEN_INVALID",
        ),
        (
            "HS256 keyed with the published key, no kid",
            with_header(Algorithm::HS256, None, &hs_with_public),
            "TOKEN_BAD_SIGNATURE",
        ),
        (
            "expired",
            es.sign(&serde_json::json!({"role": "service_role", "exp": now() - 3600})),
            "TOKEN_EXPIRED",
        ),
        (
            "wrong audience",
            es.sign(&{
                let mut c = supabase_user_claims(user, ISSUER);
                c["aud"] = "anon".into();
                c
            }),
            "TOKEN_WRONG_AUDIENCE",
        ),
        (
            "wrong issuer",
            es.sign(&supabase_user_claims(
                user,
                "https://other.supabase.co/auth/v1",
            )),
            "TOKEN_WRONG_ISSUER",
        ),
    ];
    for (what, token, reason) in cases {
        let answer = list(&server, &token).await;
        assert!(answer.is_err(), "{what}: accepted");
        refused(answer, Code::Unauthenticated, reason);
    }

    // A key added to the file is used within a second or two of the write.
    let (es2, _) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "es-2");
    let token2 = es2.sign(&service_claims());
    refused(
        list(&server, &token2).await,
        Code::Unauthenticated,
        "TOKEN_UNKNOWN_KEY",
    );
    std::fs::write(&file, jwk_set(&[&es2, &rs, &ed])).unwrap();
    eventually(Duration::from_secs(10), "the file's new key", || async {
        list(&server, &token2).await.is_ok()
    })
    .await;
    // ... and a key removed from it stops working, verified token or not.
    refused(
        list(&server, &es.sign(&service_claims())).await,
        Code::Unauthenticated,
        "TOKEN_UNKNOWN_KEY",
    );
    refused(
        list(&server, &token).await,
        Code::Unauthenticated,
        "TOKEN_UNKNOWN_KEY",
    );
    server.stop().await;
}

/// Rotation through a JWK set URL, as Supabase does it: a standby key is published and its
/// first token is accepted after one refetch; the old key is revoked and its tokens are
/// refused once the cache turns over; a JWKS server that goes down keeps the last good set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_rotation_standby_current_revoked_and_an_outage() {
    let (old, _) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "old");
    let (new, _) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "new");
    let jwks = JwksServer::start(jwk_set(&[&old]), 2).await;
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let metrics_port = harness::free_addr().port().to_string();
    let server = TestServer::start_on(
        &url,
        &[
            "--jwks-url",
            &jwks.url(),
            "--jwks-refetch-interval",
            "1s",
            "--metrics-listen",
            &metrics_port,
        ],
    )
    .await;
    let old_token = old.sign(&service_claims());
    eventually(Duration::from_secs(10), "the first fetch", || async {
        list(&server, &old_token).await.is_ok()
    })
    .await;

    // Standby: published beside the current key. The first token naming it asks for the
    // set again and is accepted on that same call.
    jwks.serve(Some(jwk_set(&[&old, &new])));
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the refetch interval
    let before = jwks.fetches();
    let new_token = new.sign(&service_claims());
    assert_eq!(list(&server, &new_token).await.unwrap(), 0);
    assert!(jwks.fetches() > before, "the unknown kid caused a fetch");

    // Revoked: the old key leaves the set; once the cached set turns over (max-age 2 s), its
    // tokens are refused, including one verified before.
    jwks.serve(Some(jwk_set(&[&new])));
    eventually(
        Duration::from_secs(15),
        "the old key's tokens refused",
        || async { list(&server, &old_token).await.is_err() },
    )
    .await;
    refused(
        list(&server, &old_token).await,
        Code::Unauthenticated,
        "TOKEN_UNKNOWN_KEY",
    );

    // An outage: every fetch fails, the last good set stays in use.
    jwks.serve(None);
    let port: u16 = metrics_port.parse().unwrap();
    eventually(
        Duration::from_secs(15),
        "a failed fetch counted",
        || async {
            let text = crate::ops::scrape(port).await;
            crate::ops::sample(&text, r#"jobsvc_jwks_fetches_total{outcome="failed"}"#) >= Some(1.0)
        },
    )
    .await;
    assert_eq!(list(&server, &new_token).await.unwrap(), 0);
    assert_eq!(
        list(&server, &new.sign(&service_claims())).await.unwrap(),
        0
    );
    assert_eq!(health(server.addr).await, Some(ServingStatus::Serving));
    server.stop().await;
}

/// A server whose JWK set cannot be fetched at start is NOT_SERVING, and refuses asymmetric
/// tokens with UNAVAILABLE rather than accepting anything; it serves once the set arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_jwks_at_start_is_not_serving() {
    let (key, _) = new_key(&rcgen::PKCS_ED25519, "ed");
    let addr = harness::free_addr();
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let jwks_url = format!("http://{addr}/jwks.json");
    let server = TestServer::start_on(
        &url,
        &["--jwks-url", &jwks_url, "--jwks-refetch-interval", "1s"],
    )
    .await;
    let token = key.sign(&service_claims());
    eventually(Duration::from_secs(10), "health answers", || async {
        health(server.addr).await.is_some()
    })
    .await;
    assert_eq!(health(server.addr).await, Some(ServingStatus::NotServing));
    refused(
        list(&server, &token).await,
        Code::Unavailable,
        "SIGNING_KEYS_UNAVAILABLE",
    );
    // The JWKS server comes up where the URL points.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _jwks = JwksServer::start_on(listener, jwk_set(&[&key]), 600).await;
    eventually(
        Duration::from_secs(15),
        "SERVING after the first fetch",
        || async { health(server.addr).await == Some(ServingStatus::Serving) },
    )
    .await;
    assert_eq!(list(&server, &token).await.unwrap(), 0);
    server.stop().await;
}

/// A flood of tokens naming random kids fetches the set at most once per refetch interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_at_most_once_per_interval() {
    let (key, pem) = new_key(&rcgen::PKCS_ECDSA_P256_SHA256, "real");
    let jwks = JwksServer::start(jwk_set(&[&key]), 600).await;
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(
        &url,
        &["--jwks-url", &jwks.url(), "--jwks-refetch-interval", "2s"],
    )
    .await;
    let good = key.sign(&service_claims());
    eventually(Duration::from_secs(10), "the first fetch", || async {
        list(&server, &good).await.is_ok()
    })
    .await;
    let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let started = tokio::time::Instant::now();
    let before = jwks.fetches();
    let mut flood = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let calls = (0..20).map(|_| {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(Uuid::new_v4().to_string());
            let token = jsonwebtoken::encode(&header, &service_claims(), &encoding).unwrap();
            let server = &server;
            async move { list(server, &token).await }
        });
        for answer in futures_util::future::join_all(calls).await {
            refused(answer, Code::Unauthenticated, "TOKEN_UNKNOWN_KEY");
            flood += 1;
        }
    }
    let fetched = jwks.fetches() - before;
    let elapsed = started.elapsed().as_secs_f64();
    // One fetch per 2 s interval at most, plus the one an interval already due allows.
    let allowed = (elapsed / 2.0).floor() as usize + 1;
    assert!(flood >= 100, "the flood was {flood} calls");
    assert!(
        fetched <= allowed,
        "{flood} unknown kids in {elapsed:.1}s caused {fetched} fetches (at most {allowed})"
    );
    assert!(
        fetched >= 1,
        "an unknown kid asks for a fetch once the interval has passed"
    );
    server.stop().await;
}

/// Sends `x-api-key`.
#[derive(Clone)]
struct ApiKey(MetadataValue<Ascii>);

impl Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("x-api-key", self.0.clone());
        Ok(req)
    }
}

/// Static API keys: a service key sees everything, a user key acts as its user, a wrong key
/// or a removed one is refused, and a key never reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_admit_services_until_removed() {
    use jobsvc::api::auth::api_keys::create;
    let user = Uuid::new_v4();
    let (service_key, service_line) = create(None);
    let (user_key, user_line) = create(Some(user));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys");
    std::fs::write(&file, format!("# test keys\n{service_line}\n{user_line}\n")).unwrap();
    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--api-key-file", file.to_str().unwrap()]).await;
    let with_key = |key: &str| {
        let key = ApiKey(key.parse().unwrap());
        let server = &server;
        async move { JobServiceClient::with_interceptor(server.channel().await, key) }
    };
    let mut as_user = with_key(&user_key).await;
    let mine = as_user
        .create_job(harness::create("keyed"))
        .await
        .expect("a user key creates")
        .into_inner();
    assert_eq!(mine.user_id, user.to_string());
    let mut as_service = with_key(&service_key).await;
    let other = as_service
        .create_job(harness::create("keyed"))
        .await
        .unwrap()
        .into_inner();
    let seen = |jobs: Vec<pb::Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let all = as_service
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 2);
    let own = as_user
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(seen(own), vec![mine.id.clone()]);
    assert_err(
        as_user
            .get_job(pb::GetJobRequest {
                id: other.id.clone(),
            })
            .await,
        Code::NotFound,
        "JOB_NOT_FOUND",
    );

    // A wrong key, a key with one character changed, and the hash itself are refused.
    let mut changed = service_key.clone();
    let end = changed.pop().unwrap();
    changed.push(if end == 'x' { 'y' } else { 'x' });
    for wrong in [changed.as_str(), &service_line[..64], "jobsvc_sk_nope"] {
        assert_err(
            with_key(wrong)
                .await
                .list_jobs(pb::ListJobsRequest::default())
                .await,
            Code::Unauthenticated,
            "API_KEY_INVALID",
        );
    }
    // A key and a token together are ambiguous.
    let mut both = JobServiceClient::with_interceptor(
        server.channel().await,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("x-api-key", user_key.parse().unwrap());
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", harness::service_token())
                    .parse()
                    .unwrap(),
            );
            Ok(req)
        },
    );
    assert_err(
        both.list_jobs(pb::ListJobsRequest::default()).await,
        Code::Unauthenticated,
        "CREDENTIALS_AMBIGUOUS",
    );

    // Removed from the file: refused within a second or two, without a restart.
    std::fs::write(&file, format!("{service_line}\n")).unwrap();
    eventually(
        Duration::from_secs(10),
        "the removed key refused",
        || async {
            as_user
                .clone()
                .list_jobs(pb::ListJobsRequest::default())
                .await
                .is_err()
        },
    )
    .await;
    assert_err(
        as_user.list_jobs(pb::ListJobsRequest::default()).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    assert!(
        as_service
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .is_ok()
    );
    server.stop().await;
}

/// A P-256 key pair as a private JWK: `d` from its PKCS#8 encoding, `x` and `y` from its
/// public key.
fn private_jwk(pair: &rcgen::KeyPair, kid: &str) -> serde_json::Value {
    use base64::Engine;
    let der = pair.serialize_der();
    let prefix = "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420";
    let hex: String = der[..36].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, prefix, "a PKCS#8 P-256 key as rcgen writes it");
    let public = pair.public_key_raw(); // 0x04 || x || y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid,
        "d": b64(&der[36..68]), "x": b64(&public[1..33]), "y": b64(&public[33..65]),
    })
}

/// `jobsvc token --signing-key` signs with a private key (PEM or JWK) and prints the public
/// set with --print-jwks; a server loading that set accepts the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobsvc_token_signs_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem_path = dir.path().join("signing.pem");
    std::fs::write(&pem_path, pair.serialize_pem()).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobsvc"))
            .args(args)
            .output()
            .expect("running jobsvc");
        assert!(
            out.status.success(),
            "jobsvc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let pem = pem_path.to_str().unwrap();
    let set = run(&[
        "token",
        "--signing-key",
        pem,
        "--kid",
        "cli-1",
        "--print-jwks",
    ]);
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, &set).unwrap();
    let token = run(&[
        "token",
        "--role",
        "service_role",
        "--signing-key",
        pem,
        "--kid",
        "cli-1",
    ]);
    let header = jsonwebtoken::decode_header(token.trim()).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (Algorithm::ES256, Some("cli-1"))
    );

    // The same key as a private JWK, with its kid inside.
    let jwk = private_jwk(&pair, "cli-jwk");
    let jwk_path = dir.path().join("signing.jwk");
    std::fs::write(&jwk_path, jwk.to_string()).unwrap();
    let from_jwk = run(&[
        "token",
        "--role",
        "service_role",
        "--signing-key",
        jwk_path.to_str().unwrap(),
    ]);
    let header = jsonwebtoken::decode_header(from_jwk.trim()).unwrap();
    assert_eq!(header.kid.as_deref(), Some("cli-jwk"));
    let mut both = serde_json::from_str::<serde_json::Value>(&set).unwrap();
    let jwk_public = serde_json::from_str::<serde_json::Value>(&run(&[
        "token",
        "--signing-key",
        jwk_path.to_str().unwrap(),
        "--print-jwks",
    ]))
    .unwrap();
    both["keys"]
        .as_array_mut()
        .unwrap()
        .push(jwk_public["keys"][0].clone());
    std::fs::write(&jwks_path, both.to_string()).unwrap();

    let pg = harness::shared_pg().await;
    let url = harness::fresh_database(&pg).await;
    let server = TestServer::start_on(&url, &["--jwks-file", jwks_path.to_str().unwrap()]).await;
    assert_eq!(list(&server, token.trim()).await.unwrap(), 0);
    assert_eq!(list(&server, from_jwk.trim()).await.unwrap(), 0);
    server.stop().await;
}
