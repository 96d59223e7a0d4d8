// The plumbing a service would keep to call jobsvc from Node.js (@grpc/grpc-js), shared by
// example.js and worker.js: the stubs loaded from generated/jobs.json, a client that sends the
// bearer token on every call, a unary call as a promise with a deadline, the google.rpc.ErrorInfo
// of a failed call, and google.protobuf.Duration / Struct / Value from and to plain JavaScript.
//
//   const { connect, call, errorInfo } = require("./jobsvc");
//   const jobs = connect("127.0.0.1:50051", token);
//   const job = await call(jobs, "GetJob", { id });
"use strict";
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const CALL_TIMEOUT_MS = 5000; // every unary call, unless the caller gives its own deadline

// The stubs: generated/jobs.json is compiled from proto/ by generate.js.
const packageDefinition = protoLoader.fromJSON(require("./generated/jobs.json"), {
  keepCase: true, // field names as in the proto: job_data, lease_id, resume_token, ...
  longs: Number, // int64 (version, counts) as numbers: they stay far below 2^53
  enums: String, // "JOB_STATUS_RUNNING"
  defaults: true, // unset scalars read as their defaults, unset messages as null
  // A oneof names the field that is set: JobUpdate.event ("job", "synced", "heartbeat"),
  // google.protobuf.Value.kind.
  oneofs: true,
});
const { JobService } = grpc.loadPackageDefinition(packageDefinition).jobs.v1;

// google.rpc.Status and ErrorInfo, the two messages of grpc-status-details-bin that a client
// reads (field numbers as in googleapis' google/rpc/status.proto and error_details.proto;
// Any has google.protobuf.Any's fields).
const RPC_PROTO = `
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`;
const rpc = protobuf.parse(RPC_PROTO, { keepCase: true }).root;
const RpcStatus = rpc.lookupType("google.rpc.Status");
const ErrorInfo = rpc.lookupType("google.rpc.ErrorInfo");

// A JobService client on its own channel that sends `authorization: Bearer <JWT>` on every
// call. Plaintext here; behind TLS use grpc.credentials.createSsl() instead.
function connect(addr, token) {
  const bearer = (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set("authorization", `Bearer ${token}`);
        next(metadata, listener);
      },
    });
  return new JobService(addr, grpc.credentials.createInsecure(), { interceptors: [bearer] });
}

// One unary call as a promise, with a deadline.
function call(client, method, request, timeoutMs = CALL_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// The google.rpc.ErrorInfo of a failed call (from grpc-status-details-bin), or null.
function errorInfo(err) {
  const [bin] = err.metadata?.get("grpc-status-details-bin") ?? [];
  if (!bin) return null;
  const detail = RpcStatus.decode(bin).details.find(
    (d) => d.type_url === "type.googleapis.com/google.rpc.ErrorInfo",
  );
  return detail ? ErrorInfo.toObject(ErrorInfo.decode(detail.value)) : null;
}

// Milliseconds as a google.protobuf.Duration.
const duration = (ms) => ({ seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 });

// google.protobuf.Struct / Value <-> plain JavaScript data. The well-known types keep the
// camelCase field names protobufjs gives them (stringValue, structValue), whatever keepCase says.
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case "number":
      return { numberValue: v };
    case "string":
      return { stringValue: v };
    case "boolean":
      return { boolValue: v };
    case "object":
      return { structValue: toStruct(v) };
  }
  throw new TypeError(`not JSON: ${v}`);
}
const toStruct = (obj) => ({
  fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])),
});
function fromValue(v) {
  switch (v?.kind) {
    case undefined:
      return undefined;
    case "nullValue":
      return null;
    case "structValue":
      return fromStruct(v.structValue);
    case "listValue":
      return v.listValue.values.map(fromValue);
    default:
      return v[v.kind];
  }
}
const fromStruct = (s) =>
  Object.fromEntries(Object.entries(s?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));

module.exports = {
  CALL_TIMEOUT_MS,
  connect,
  call,
  errorInfo,
  duration,
  toValue,
  toStruct,
  fromValue,
  fromStruct,
};
