//! JSON on the wire: protobuf's `Struct` and `Value` to JSON with the service's limits (size,
//! depth, U+0000, finite numbers), and JSON back to them, from `serde_json` values or straight
//! from the database's JSON text.
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::{Map, Number, Value as Json};

use crate::db::models::JsonText;
use crate::error::{Error, Result};

/// Size and depth limits for client-supplied JSON (`job_data`, `result`).
#[derive(Debug, Clone, Copy)]
pub struct JsonLimits {
    pub max_bytes: usize,
    pub max_depth: usize,
    /// The most a job may hold: job_data, result and error_message together, as the
    /// protobuf-encoded fields of a `Job` (see [`super::size`]).
    pub max_job_bytes: usize,
}

pub(super) fn nul_error(field: &'static str) -> Error {
    Error::invalid(
        field,
        "NUL_CHARACTER",
        format!("{field} must not contain U+0000 (PostgreSQL cannot store it)"),
    )
}

/// `google.protobuf.Struct` to a JSON object, enforcing depth, U+0000, finite numbers and size.
pub fn struct_to_json(field: &'static str, s: Struct, limits: JsonLimits) -> Result<Json> {
    let json = struct_inner(field, s, 1, limits)?;
    check_size(field, &json, limits)?;
    Ok(json)
}

/// `google.protobuf.Value` to JSON, with the same checks as [`struct_to_json`].
pub fn value_to_json(field: &'static str, v: Value, limits: JsonLimits) -> Result<Json> {
    let json = value_inner(field, v, 0, limits)?;
    check_size(field, &json, limits)?;
    Ok(json)
}

/// JSON that did not come through protobuf (an imported line): the same checks as
/// [`struct_to_json`] and [`value_to_json`] apply, depth, U+0000 and size.
pub fn check_json(field: &'static str, json: &Json, limits: JsonLimits) -> Result<()> {
    fn walk(field: &'static str, json: &Json, depth: usize, limits: JsonLimits) -> Result<()> {
        let nested = |items: &mut dyn Iterator<Item = &Json>| -> Result<()> {
            if depth + 1 > limits.max_depth {
                return Err(Error::invalid(
                    field,
                    "PAYLOAD_TOO_DEEP",
                    format!("{field} nests deeper than {} levels", limits.max_depth),
                ));
            }
            for v in items {
                walk(field, v, depth + 1, limits)?;
            }
            Ok(())
        };
        match json {
            Json::String(s) if s.contains('\0') => Err(nul_error(field)),
            Json::Array(items) => nested(&mut items.iter()),
            Json::Object(map) => {
                if map.keys().any(|k| k.contains('\0')) {
                    return Err(nul_error(field));
                }
                nested(&mut map.values())
            }
            _ => Ok(()),
        }
    }
    walk(field, json, 0, limits)?;
    check_size(field, json, limits)
}

fn check_size(field: &'static str, json: &Json, limits: JsonLimits) -> Result<()> {
    let size = serde_json::to_vec(json)
        .map_err(|e| Error::Internal(Box::new(e)))?
        .len();
    if size > limits.max_bytes {
        return Err(Error::invalid(
            field,
            "PAYLOAD_TOO_LARGE",
            format!(
                "{field} is {size} bytes of JSON; the limit is {}",
                limits.max_bytes
            ),
        ));
    }
    Ok(())
}

fn struct_inner(field: &'static str, s: Struct, depth: usize, limits: JsonLimits) -> Result<Json> {
    if depth > limits.max_depth {
        return Err(Error::invalid(
            field,
            "PAYLOAD_TOO_DEEP",
            format!("{field} nests deeper than {} levels", limits.max_depth),
        ));
    }
    let mut map = Map::with_capacity(s.fields.len());
    for (k, v) in s.fields {
        if k.contains('\0') {
            return Err(nul_error(field));
        }
        let v = value_inner(field, v, depth, limits)?;
        map.insert(k, v);
    }
    Ok(Json::Object(map))
}

/// `depth` is the nesting of the container holding this value.
fn value_inner(field: &'static str, v: Value, depth: usize, limits: JsonLimits) -> Result<Json> {
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(b),
        Some(Kind::NumberValue(n)) => number_to_json(field, n)?,
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                return Err(nul_error(field));
            }
            Json::String(s)
        }
        Some(Kind::StructValue(s)) => struct_inner(field, s, depth + 1, limits)?,
        Some(Kind::ListValue(l)) => {
            if depth + 1 > limits.max_depth {
                return Err(Error::invalid(
                    field,
                    "PAYLOAD_TOO_DEEP",
                    format!("{field} nests deeper than {} levels", limits.max_depth),
                ));
            }
            let items = l
                .values
                .into_iter()
                .map(|v| value_inner(field, v, depth + 1, limits))
                .collect::<Result<Vec<_>>>()?;
            Json::Array(items)
        }
    })
}

/// Integral doubles that a double represents exactly become JSON integers (so `3` stays `3`,
/// not `3.0`); other finite doubles stay doubles. NaN and infinities have no JSON form.
fn number_to_json(field: &'static str, n: f64) -> Result<Json> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if !n.is_finite() {
        return Err(Error::invalid(
            field,
            "INVALID_NUMBER",
            format!("{field} holds NaN or an infinity, which JSON cannot represent"),
        ));
    }
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return Ok(Json::Number(Number::from(n as i64)));
    }
    Number::from_f64(n).map(Json::Number).ok_or_else(|| {
        Error::invalid(
            field,
            "INVALID_NUMBER",
            format!("{field} holds an invalid number"),
        )
    })
}

/// A JSON object to `google.protobuf.Struct` (anything else becomes an empty Struct).
pub fn json_to_struct(json: Json) -> Struct {
    match json {
        Json::Object(map) => Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        },
        _ => Struct::default(),
    }
}

pub fn json_to_value(json: Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(json_to_struct(json)),
    };
    Value { kind: Some(kind) }
}

/// A JSON document read straight into protobuf's `Value`, without a `serde_json::Value` in
/// between: for rows whose JSON only goes out on the wire (the jobs of a ListJobs page), where
/// building that tree and then converting it was a tenth of the server's CPU. Numbers become
/// doubles, as in [`json_to_value`]. Hand-written because no crate reads JSON into
/// `prost_types`; it is serde's visitor, nothing more.
#[derive(Debug, Clone, PartialEq, diesel::deserialize::FromSqlRow)]
pub struct PbJson(pub Value);

impl<'de> serde::Deserialize<'de> for PbJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(PbJsonVisitor)
    }
}

struct PbJsonVisitor;

fn pb_json(kind: Kind) -> PbJson {
    PbJson(Value { kind: Some(kind) })
}

impl<'de> serde::de::Visitor<'de> for PbJsonVisitor {
    type Value = PbJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::BoolValue(b)))
    }

    fn visit_i64<E>(self, n: i64) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::NumberValue(n as f64)))
    }

    fn visit_u64<E>(self, n: u64) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::NumberValue(n as f64)))
    }

    fn visit_f64<E>(self, n: f64) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::NumberValue(n)))
    }

    fn visit_str<E>(self, s: &str) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::StringValue(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::StringValue(s)))
    }

    fn visit_unit<E>(self) -> std::result::Result<PbJson, E> {
        Ok(pb_json(Kind::NullValue(0)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<PbJson, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(PbJson(v)) = seq.next_element()? {
            values.push(v);
        }
        Ok(pb_json(Kind::ListValue(ListValue { values })))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<PbJson, A::Error> {
        let mut fields = std::collections::BTreeMap::new();
        while let Some((k, PbJson(v))) = map.next_entry::<String, PbJson>()? {
            fields.insert(k, v);
        }
        Ok(pb_json(Kind::StructValue(Struct { fields })))
    }
}

/// The JSON columns of a [`crate::domain::Job`] as protobuf values, however they were read.
pub trait JsonColumn {
    fn into_value(self) -> Value;
    /// `job_data`: an object; anything else (never stored) becomes an empty `Struct`.
    fn into_struct(self) -> Struct;
}

impl JsonColumn for Json {
    fn into_value(self) -> Value {
        json_to_value(self)
    }

    fn into_struct(self) -> Struct {
        json_to_struct(self)
    }
}

impl JsonColumn for JsonText {
    fn into_value(self) -> Value {
        read_json_text(&self.0).0
    }

    fn into_struct(self) -> Struct {
        read_json_text(&self.0).into_struct()
    }
}

impl PbJson {
    fn into_struct(self) -> Struct {
        match self.0.kind {
            Some(Kind::StructValue(s)) => s,
            _ => Struct::default(),
        }
    }
}

/// The database's JSON text as a protobuf value. jsonb holds what serde_json cannot read
/// (nesting deeper than 128, writable by plain SQL); such a value is sent as a marker, and
/// logged, rather than fail every page that holds its job (as the change feed does).
fn read_json_text(text: &[u8]) -> PbJson {
    serde_json::from_slice(text).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a stored value cannot be represented as JSON");
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "jobsvc_error".to_owned(),
            pb_json(Kind::StringValue(
                "the stored value cannot be represented as JSON".into(),
            ))
            .0,
        );
        pb_json(Kind::StructValue(Struct { fields }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: JsonLimits = JsonLimits {
        max_bytes: 1 << 20,
        max_depth: 32,
        max_job_bytes: 3 << 20,
    };

    #[test]
    fn json_round_trips_through_struct() {
        let original = json!({
            "int": 42, "neg": -7, "float": 1.5, "big": 9007199254740992i64,
            "bool": true, "null": null, "str": "héllo ✓ 日本",
            "ключ": {"nested": [1, "two", {"three": [false, null]}]},
            "empty_obj": {}, "empty_list": []
        });
        let s = json_to_struct(original.clone());
        let back = struct_to_json("job_data", s, LIMITS).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn depth_limit_counts_objects_and_lists() {
        let mut v = json!(1);
        for _ in 0..32 {
            v = json!({ "a": v });
        }
        // 32 nested objects: allowed.
        assert!(struct_to_json("job_data", json_to_struct(v.clone()), LIMITS).is_ok());
        let v = json!({ "a": v });
        let err = struct_to_json("job_data", json_to_struct(v), LIMITS).unwrap_err();
        assert_eq!(err.reason(), "PAYLOAD_TOO_DEEP");
        let lists = json!({ "a": [[[[1]]]] });
        let small = JsonLimits {
            max_depth: 4,
            ..LIMITS
        };
        assert_eq!(
            struct_to_json("job_data", json_to_struct(lists), small)
                .unwrap_err()
                .reason(),
            "PAYLOAD_TOO_DEEP"
        );
    }

    #[test]
    fn refuses_nul_nan_and_oversize() {
        for bad in [json!({"k": "a\u{0}b"}), json!({"a\u{0}": 1})] {
            let e = struct_to_json("job_data", json_to_struct(bad), LIMITS).unwrap_err();
            assert_eq!(e.reason(), "NUL_CHARACTER");
        }
        let nan = Struct {
            fields: [(
                "n".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(
            struct_to_json("job_data", nan, LIMITS)
                .unwrap_err()
                .reason(),
            "INVALID_NUMBER"
        );
        let big = json!({ "s": "x".repeat(100) });
        let tiny = JsonLimits {
            max_bytes: 50,
            ..LIMITS
        };
        assert_eq!(
            struct_to_json("job_data", json_to_struct(big), tiny)
                .unwrap_err()
                .reason(),
            "PAYLOAD_TOO_LARGE"
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Any protobuf Value tree, numbers and strings included (NaN, infinities, U+0000).
        fn value() -> impl Strategy<Value = Value> {
            use prost_types::value::Kind;
            let leaf = prop_oneof![
                Just(Value { kind: None }),
                Just(Value {
                    kind: Some(Kind::NullValue(0))
                }),
                any::<bool>().prop_map(|b| Value {
                    kind: Some(Kind::BoolValue(b))
                }),
                any::<f64>().prop_map(|f| Value {
                    kind: Some(Kind::NumberValue(f))
                }),
                ".{0,12}".prop_map(|s| Value {
                    kind: Some(Kind::StringValue(s))
                }),
            ];
            leaf.prop_recursive(6, 64, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(|values| Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue { values }))
                    }),
                    prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value {
                        kind: Some(Kind::StructValue(Struct {
                            fields: m.into_iter().collect()
                        }))
                    }),
                ]
            })
        }

        proptest! {
            /// Conversion never panics; what it accepts survives the trip back unchanged,
            /// and what it refuses carries one of the documented reasons.
            #[test]
            fn any_value_converts_or_is_refused_with_a_reason(v in value()) {
                match value_to_json("result", v, LIMITS) {
                    Ok(json) => {
                        let again = value_to_json("result", json_to_value(json.clone()), LIMITS);
                        prop_assert_eq!(again.unwrap(), json);
                    }
                    Err(e) => prop_assert!(
                        ["INVALID_NUMBER", "NUL_CHARACTER", "PAYLOAD_TOO_DEEP", "PAYLOAD_TOO_LARGE", "MISSING_FIELD", "INVALID_VALUE"]
                            .contains(&e.reason()),
                        "unexpected reason {}", e.reason()
                    ),
                }
            }

        }
    }

    /// Reading JSON straight into protobuf values gives what reading it into `serde_json` and
    /// converting does, for every kind of value, the number edge cases and escapes included.
    #[test]
    fn json_read_straight_into_protobuf_matches_the_conversion() {
        let docs = [
            r#"{}"#,
            r#"{"kind": "k1", "priority": 3, "payload": "xxx"}"#,
            r#"{"a": null, "b": true, "c": false, "d": [], "e": {}, "f": [1, "two", null, [3.5]]}"#,
            r#"{"int": -7, "big": 18446744073709551615, "min": -9223372036854775808, "f": 1e-300, "g": 6.02e23}"#,
            r#"{"s": "tab\there \"quoted\" \u00e9\ud83d\ude00 \\ /", "nested": {"x": {"y": {"z": [{"w": 0}]}}}}"#,
            r#"{"dup": 1, "dup": 2}"#,
            r#"[1, {"a": "b"}]"#,
            r#""a string""#,
            r#"12.5"#,
            r#"null"#,
        ];
        for doc in docs {
            let direct: PbJson = serde_json::from_str(doc).unwrap();
            let via_serde = json_to_value(serde_json::from_str::<Json>(doc).unwrap());
            assert_eq!(direct.0, via_serde, "{doc}");
            let via_serde_struct = json_to_struct(serde_json::from_str::<Json>(doc).unwrap());
            assert_eq!(direct.into_struct(), via_serde_struct, "{doc}");
            let text = JsonText(doc.as_bytes().to_vec());
            assert_eq!(text.into_value(), via_serde, "{doc}");
        }
    }
}
