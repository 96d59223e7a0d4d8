//! The one place where proto messages are built and read: requests to validated domain values
//! ([`request`]), domain values to messages ([`reply`]), and JSON to and from protobuf's
//! `Struct`/`Value` ([`json`]). A new proto field has its home here.
pub(crate) mod json;
pub(crate) mod reply;
pub(crate) mod request;
pub(crate) mod size;

pub(crate) use json::check_json;
pub use json::{JsonLimits, json_to_struct, json_to_value, struct_to_json, value_to_json};
pub use reply::timestamp;
pub(crate) use reply::{
    claimed_to_pb, delivery_to_pb, fill_page, history_to_pb, job_to_pb, stats_to_pb,
};
pub(crate) use request::*;
