DROP TRIGGER jobs_forget_job_data_bytes ON jobs;
DROP FUNCTION jobs_forget_job_data_bytes();
DROP FUNCTION job_data_field_len(jsonb);
DROP FUNCTION jsonb_pb_len(jsonb, boolean);
DROP FUNCTION pb_varint_len(bigint);
ALTER TABLE jobs DROP COLUMN job_data_bytes;
