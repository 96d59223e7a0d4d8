//! The commands besides `serve`: `token`, `api-key`, `export` and `import`.
use super::config::{ApiKeyCommand, DbArgs, ExportArgs, ImportArgs, TokenArgs, TokenRole};
use super::embedded_pg::{EmbeddedPg, PgOptions};
use super::{AppError, EMBEDDED_DB, secret};
use crate::api::auth;
use crate::db;
use crate::domain::{ExportFilter, JobStatus};

/// `jobsvc token`: prints a signed token (or, with --print-jwks, the public set of its key).
pub fn print_token(args: TokenArgs) -> Result<(), AppError> {
    if let Some(path) = &args.signing_key {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --signing-key {}: {e}", path.display()))?;
        let key = auth::sign::SigningKey::parse(&text, args.kid.as_deref())
            .map_err(|e| format!("--signing-key {}: {e}", path.display()))?;
        if args.print_jwks {
            let set = key.public_set()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&set).map_err(|e| e.to_string())?
            );
            return Ok(());
        }
        let (role, sub) = match args.role.ok_or("--role is required")? {
            TokenRole::ServiceRole => ("service_role", args.sub),
            TokenRole::Authenticated => (
                "authenticated",
                Some(args.sub.ok_or("--role authenticated needs --sub UUID")?),
            ),
        };
        println!("{}", key.sign(&auth::claims(role, sub, args.ttl)));
        return Ok(());
    }
    let secret = secret::secret(&args.secret, false)?;
    let token = match args.role.ok_or("--role is required")? {
        TokenRole::ServiceRole => auth::issue(&secret, "service_role", args.sub, args.ttl),
        TokenRole::Authenticated => {
            let sub = args.sub.ok_or("--role authenticated needs --sub UUID")?;
            auth::issue(&secret, "authenticated", Some(sub), args.ttl)
        }
    };
    println!("{token}");
    Ok(())
}

/// `jobsvc api-key create`: a new key on the first line, its line for --api-key-file on the
/// second.
pub fn api_key(command: ApiKeyCommand) -> Result<(), AppError> {
    match command {
        ApiKeyCommand::Create { user } => {
            let (key, line) = auth::api_keys::create(user);
            println!("{key}");
            println!("{line}");
            eprintln!(
                "the first line is the key (give it to the service, for `x-api-key`; it is shown \
                 only now); the second goes into --api-key-file"
            );
        }
    }
    Ok(())
}

/// The database of `export` / `import`: DATABASE_URL, or the private PostgreSQL of the data
/// directory (reached on its socket while `serve` runs, else started for the command and
/// returned so the caller stops it).
async fn command_database(
    db_args: &DbArgs,
    create: bool,
) -> Result<(String, Option<EmbeddedPg>), AppError> {
    if let Some(url) = &db_args.database_url {
        return Ok((url.clone(), None));
    }
    // A backup run from the wrong directory must fail, not back up a new empty database.
    if !create && !db_args.data_dir.join("pg/data/PG_VERSION").exists() {
        return Err(format!(
            "no private PostgreSQL in {}: pass --data-dir (where `jobsvc serve` keeps it) or --database-url",
            db_args.data_dir.display()
        )
        .into());
    }
    let pg = EmbeddedPg::init(&db_args.data_dir, PgOptions::default())?;
    if db::connect(&pg.url("postgres")).await.is_ok() {
        return Ok((pg.service_url(EMBEDDED_DB).await?, None));
    }
    pg.start().await?;
    let url = pg.service_url(EMBEDDED_DB).await?;
    Ok((url, Some(pg)))
}

/// `jobsvc export`.
pub async fn export(args: ExportArgs) -> Result<(), AppError> {
    let filter = ExportFilter {
        statuses: args
            .statuses
            .iter()
            .map(|s| {
                JobStatus::parse(s).ok_or_else(|| {
                    format!(
                        "unknown status {s:?}: pending, running, completed, failed or cancelled"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        agent_identifier: args.agent.clone(),
        user: args.user,
        created_after: args.created_after,
        created_before: args.created_before,
        after_id: args.after_id,
    };
    let (url, pg) = command_database(&args.db, false).await?;
    let result = async {
        // No migrations here: a backup changes nothing, and may run as a read-only role.
        let mut conn = db::connect(&url).await?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout());
        let n = super::transfer::export(&mut conn, &filter, &mut out).await?;
        eprintln!("exported {n} jobs");
        Ok::<_, AppError>(())
    }
    .await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    result
}

/// `jobsvc import`.
pub async fn import(args: ImportArgs) -> Result<(), AppError> {
    let (url, pg) = command_database(&args.db, true).await?;
    let result = async {
        db::migrate(&url).await?;
        let mut conn = db::connect(&url).await?;
        let input = tokio::io::BufReader::new(tokio::io::stdin());
        let done = super::transfer::import(
            &mut conn,
            input,
            args.batch_size.into(),
            args.job_limits.limits(),
        )
        .await?;
        eprintln!(
            "read {} jobs: {} inserted, {} already there",
            done.read, done.inserted, done.skipped
        );
        Ok::<_, AppError>(())
    }
    .await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    result
}
