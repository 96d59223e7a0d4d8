-- What a job may hold is limited in protobuf bytes (`--max-job-bytes`): job_data, result and
-- error_message together, as fields of the encoded Job. A move that stores a result or an
-- error message checks, in its compare-and-set, that the job stays under the limit; for that
-- it needs job_data's size, which jobsvc records at insert. Rows written by plain SQL have it
-- NULL, and the check computes it (jsonb_pb_len); plain SQL that changes job_data makes it
-- NULL again (a trigger below).
ALTER TABLE jobs ADD COLUMN job_data_bytes integer;
COMMENT ON COLUMN jobs.job_data_bytes IS
    'Protobuf-encoded size of job_data as the job_data field of a jobs.v1.Job (tag, length and Struct), recorded by jobsvc at insert; NULL when unknown (plain SQL), then computed by jsonb_pb_len when needed.';

-- Bytes of a protobuf varint.
CREATE FUNCTION pb_varint_len(n bigint) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN n < 128 THEN 1 WHEN n < 16384 THEN 2 WHEN n < 2097152 THEN 3
                WHEN n < 268435456 THEN 4 WHEN n < 34359738368 THEN 5 ELSE 6 END
$$;

-- Bytes of google.protobuf.Value holding v, or (as_struct) of google.protobuf.Struct holding
-- the object v, encoded as prost encodes them (src/api/convert/size.rs, which a test holds to
-- prost, computes the same).
CREATE FUNCTION jsonb_pb_len(v jsonb, as_struct boolean) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    total bigint := 0;
    k text;
    e jsonb;
    inner_len bigint;
    entry bigint;
BEGIN
    IF as_struct THEN
        IF jsonb_typeof(v) <> 'object' THEN
            RETURN 0;
        END IF;
        FOR k, e IN SELECT key, value FROM jsonb_each(v) LOOP
            inner_len := jsonb_pb_len(e, false);
            entry := (CASE WHEN k = '' THEN 0
                           ELSE 1 + pb_varint_len(octet_length(k)) + octet_length(k) END)
                     + 1 + pb_varint_len(inner_len) + inner_len;
            total := total + 1 + pb_varint_len(entry) + entry;
        END LOOP;
        RETURN total;
    END IF;
    CASE jsonb_typeof(v)
        WHEN 'null', 'boolean' THEN RETURN 2;
        WHEN 'number' THEN RETURN 9;
        WHEN 'string' THEN
            inner_len := octet_length(v #>> '{}');
        WHEN 'object' THEN
            inner_len := jsonb_pb_len(v, true);
        ELSE
            FOR e IN SELECT value FROM jsonb_array_elements(v) LOOP
                entry := jsonb_pb_len(e, false);
                total := total + 1 + pb_varint_len(entry) + entry;
            END LOOP;
            inner_len := total;
    END CASE;
    RETURN 1 + pb_varint_len(inner_len) + inner_len;
END
$$;
COMMENT ON FUNCTION jsonb_pb_len(jsonb, boolean) IS
    'Protobuf-encoded size of google.protobuf.Value holding v, or with as_struct of google.protobuf.Struct holding the object v (prost''s encoding).';

-- A write that changes job_data without saying its size (plain SQL) forgets the recorded
-- one, so the size check computes it afresh. jobsvc never updates job_data, so its moves
-- never fire this trigger (it is for UPDATE OF job_data only).
CREATE FUNCTION jobs_forget_job_data_bytes() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.job_data_bytes IS NOT DISTINCT FROM OLD.job_data_bytes THEN
        NEW.job_data_bytes := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_forget_job_data_bytes
    BEFORE UPDATE OF job_data ON jobs
    FOR EACH ROW WHEN (NEW.job_data IS DISTINCT FROM OLD.job_data)
    EXECUTE FUNCTION jobs_forget_job_data_bytes();

-- job_data's size as the job_data field of a Job: what job_data_bytes records.
CREATE FUNCTION job_data_field_len(job_data jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT 1 + pb_varint_len(s) + s FROM (SELECT jsonb_pb_len(coalesce(job_data, '{}'), true) AS s) x
$$;
COMMENT ON FUNCTION job_data_field_len(jsonb) IS
    'Protobuf-encoded size of job_data as the job_data field of a jobs.v1.Job (tag, length, Struct): what jobs.job_data_bytes records.';
