//! What a job's JSON costs on the wire: the protobuf-encoded size of `job_data`, `result` and
//! `error_message` as fields of a `Job`, computed from the JSON without building the
//! messages. The service's one limit on what a job may hold (`--max-job-bytes`) is measured in
//! these bytes, because a `Struct` can be five times larger than its JSON (`[0,0,…]` is two
//! bytes a number in JSON, eleven in protobuf), and a job must never grow past what a
//! response can carry.
//!
//! Hand-written because prost only measures messages it has built, and building a 1 MiB
//! document twice to measure it once would double a create's work. It mirrors prost's
//! encoding of `google.protobuf.Struct`/`Value` exactly (a test holds it to `encoded_len`),
//! and `jsonb_pb_len` (migration 2026-12-02-000010) computes the same in SQL.
use serde_json::Value as Json;

/// Bytes of a varint.
fn varint_len(n: usize) -> usize {
    (64 - (n as u64 | 1).leading_zeros() as usize).div_ceil(7)
}

/// A length-delimited field with a one-byte tag around `inner` bytes.
pub fn field_len(inner: usize) -> usize {
    1 + varint_len(inner) + inner
}

/// `google.protobuf.Value` holding `v` (the message itself, no field around it).
pub fn value_len(v: &Json) -> usize {
    match v {
        // null_value, bool_value: a tag and a one-byte varint; number_value: a tag and 8 bytes.
        Json::Null | Json::Bool(_) => 2,
        Json::Number(_) => 9,
        Json::String(s) => field_len(s.len()),
        Json::Array(items) => field_len(items.iter().map(|i| field_len(value_len(i))).sum()),
        Json::Object(_) => field_len(struct_len(v)),
    }
}

/// `google.protobuf.Struct` holding the object `o` (anything else: an empty Struct).
pub fn struct_len(o: &Json) -> usize {
    let Json::Object(map) = o else { return 0 };
    map.iter()
        .map(|(k, v)| {
            // prost leaves a map entry's key out when it is the default (empty) string.
            let key = if k.is_empty() { 0 } else { field_len(k.len()) };
            field_len(key + field_len(value_len(v)))
        })
        .sum()
}

/// A job's `job_data` field (always present, `{}` at least).
pub fn job_data_field_len(job_data: &Json) -> usize {
    field_len(struct_len(job_data))
}

/// A job's `result` and `error_message` fields, when set.
pub fn outcome_fields_len(result: Option<&Json>, error_message: Option<&str>) -> usize {
    result.map_or(0, |r| field_len(value_len(r)))
        + error_message.map_or(0, |m| if m.is_empty() { 0 } else { field_len(m.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::convert::json::{json_to_struct, json_to_value};
    use crate::pb;
    use proptest::prelude::*;
    use prost::Message;

    fn json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i32>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::json!(f)),
            ".{0,200}".prop_map(Json::String),
        ];
        leaf.prop_recursive(5, 200, 20, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..20).prop_map(Json::Array),
                prop::collection::btree_map(".{0,10}", inner, 0..20)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The computed sizes are prost's, for every document, as a Job's fields.
        #[test]
        fn sizes_match_prost(data in json(), result in json(), message in ".{0,300}") {
            let data = match data {
                Json::Object(_) => data,
                other => serde_json::json!({ "v": other }),
            };
            let job = pb::Job {
                job_data: Some(json_to_struct(data.clone())),
                result: Some(json_to_value(result.clone())),
                error_message: message.clone(),
                ..Default::default()
            };
            prop_assert_eq!(
                job.encoded_len(),
                job_data_field_len(&data) + outcome_fields_len(Some(&result), Some(&message))
            );
        }
    }

    #[test]
    fn a_list_of_zeros_is_eleven_bytes_a_number() {
        let zeros = Json::Array(vec![serde_json::json!(0); 1000]);
        assert_eq!(value_len(&zeros), field_len(11 * 1000));
        assert_eq!(serde_json::to_vec(&zeros).unwrap().len(), 2001);
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(16_384), 3);
    }
}
