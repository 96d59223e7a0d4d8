// @generated automatically by Diesel CLI.

pub mod sql_types {
    #[derive(diesel::query_builder::QueryId, Clone, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "job_status"))]
    pub struct JobStatus;
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::JobStatus;

    jobs (id) {
        id -> Uuid,
        user_id -> Nullable<Uuid>,
        agent_identifier -> Text,
        status -> JobStatus,
        job_data -> Nullable<Jsonb>,
        result -> Nullable<Jsonb>,
        error_message -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        completed_at -> Nullable<Timestamptz>,
        version -> Int8,
        request_id -> Nullable<Text>,
        job_data_bytes -> Nullable<Int4>,
        priority -> Int4,
        run_after -> Nullable<Timestamptz>,
        attempt -> Int4,
        max_attempts -> Int4,
        initial_backoff -> Nullable<Interval>,
        lease_id -> Nullable<Uuid>,
        lease_expires_at -> Nullable<Timestamptz>,
        lease_duration -> Nullable<Interval>,
        worker_id -> Nullable<Text>,
        progress -> Nullable<Jsonb>,
    }
}
