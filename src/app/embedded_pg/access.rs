//! Who may reach the private PostgreSQL: the passwords kept in the data directory, the
//! unprivileged role jobsvc serves as, and the upgrade of a cluster an older jobsvc made with
//! `trust`.
use std::fs;

use super::EmbeddedPg;
use super::error::{PgError, io};
use super::files::{
    PG_HBA, SERVICE_PASSWORD_FILE, SERVICE_ROLE, SUPERUSER_PASSWORD_FILE, new_password,
    write_private,
};

impl EmbeddedPg {
    /// The connection string jobsvc serves database `db` with: as role `jobsvc`, which is not
    /// a superuser (it may create the roles the schema needs, nothing more) and owns `db`;
    /// both are made on first use. A database an older jobsvc made is owned by the superuser,
    /// and is served as the superuser, with a warning (export and import it into a new data
    /// directory to change that).
    pub async fn service_url(&self, db: &str) -> Result<String, PgError> {
        use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
        #[derive(diesel::QueryableByName)]
        struct Owner {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            owner: Option<String>,
        }
        let file = self.root.join(SERVICE_PASSWORD_FILE);
        let password = match fs::read_to_string(&file) {
            Ok(p) if !p.trim().is_empty() => p.trim().to_owned(),
            _ => {
                let p = new_password()?;
                write_private(&file, &p)?;
                p
            }
        };
        let failed = |e: diesel::result::Error| PgError::Failed(format!("setting up {db}: {e}"));
        let mut conn =
            <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                &self.url("postgres"),
            )
            .await
            .map_err(|e| PgError::Failed(format!("connecting to the private PostgreSQL: {e}")))?;
        // The role, with the password kept in the data directory (set again each start, so
        // the file is always the truth). It may not create roles: before PostgreSQL 16,
        // CREATEROLE could grant itself pg_execute_server_program. The roles the schema's
        // policies name are made here, by the superuser, and given to it to switch into. The identifiers and password are ours: no quoting
        // needed beyond what format gives.
        conn.batch_execute(&format!(
            "DO $$ DECLARE r text; BEGIN \
               FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role', '{SERVICE_ROLE}'] LOOP \
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN \
                   EXECUTE format('CREATE ROLE %I NOLOGIN', r); \
                 END IF; \
               END LOOP; \
             END $$; \
             ALTER ROLE {SERVICE_ROLE} WITH LOGIN NOCREATEROLE NOSUPERUSER PASSWORD '{password}'; \
             GRANT anon, authenticated, service_role TO {SERVICE_ROLE} WITH ADMIN OPTION"
        ))
        .await
        .map_err(failed)?;
        let owner: Owner = diesel::sql_query(
            "SELECT (SELECT r.rolname::text FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba \
                     WHERE d.datname = $1) AS owner",
        )
        .bind::<diesel::sql_types::Text, _>(db)
        .get_result(&mut conn)
        .await
        .map_err(failed)?;
        match owner.owner.as_deref() {
            None => {
                conn.batch_execute(&format!("CREATE DATABASE \"{db}\" OWNER {SERVICE_ROLE}"))
                    .await
                    .map_err(failed)?;
            }
            Some(SERVICE_ROLE) => {}
            Some(other) => {
                tracing::warn!(
                    database = db,
                    owner = other,
                    "this private database was made by an older jobsvc and belongs to the \
                     superuser, so jobsvc serves it as the superuser; export it and import it \
                     into a new --data-dir to serve it as the unprivileged role {SERVICE_ROLE}"
                );
                return Ok(self.url(db));
            }
        }
        Ok(self.url_as(SERVICE_ROLE, &password, db))
    }

    /// A cluster made by an older jobsvc (`initdb -A trust`): give the superuser its password,
    /// switch every connection to scram-sha-256, and reload.
    pub(super) async fn secure_legacy_cluster(&self) -> Result<(), PgError> {
        use diesel_async::SimpleAsyncConnection;
        let mut conn =
            <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                &self.url("postgres"),
            )
            .await
            .map_err(|e| PgError::Failed(format!("connecting to the private PostgreSQL: {e}")))?;
        // The file first: a crash after the ALTER must not lose the password.
        write_private(&self.root.join(SUPERUSER_PASSWORD_FILE), &self.password)?;
        conn.batch_execute(&format!("ALTER ROLE postgres PASSWORD '{}'", self.password))
            .await
            .map_err(|e| PgError::Failed(format!("setting the superuser's password: {e}")))?;
        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(&hba, PG_HBA).map_err(io("writing pg_hba.conf"))?;
        conn.batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(|e| PgError::Failed(format!("reloading the configuration: {e}")))?;
        tracing::info!("private PostgreSQL: switched from trust to scram-sha-256 passwords");
        Ok(())
    }
}
