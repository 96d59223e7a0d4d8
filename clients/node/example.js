#!/usr/bin/env node
// A jobsvc client in Node.js (@grpc/grpc-js): the whole life of a job, from the creator's and
// the agent's side.
//
//   npm ci --prefix clients/node
//   JOBSVC_ADDR=127.0.0.1:50051 JOBSVC_TOKEN=<service_role JWT> node clients/node/example.js
//
// JOBSVC_TOKEN is what `jobsvc token --role service_role` prints (or the `export TOKEN=...`
// line the server prints at start). Every answer is checked: any surprise ends the program
// with exit status 1 and a message naming the step. Each call and each wait has a timeout.
//
// The plumbing it shares with worker.js (loading the stubs, the bearer token, a unary call with
// a deadline, ErrorInfo, Struct / Value) is in jobsvc.js; UpdateStream below reads a stream.
"use strict";
const { randomUUID } = require("node:crypto");
const { isDeepStrictEqual } = require("node:util");
const grpc = require("@grpc/grpc-js");
const { call, connect, errorInfo } = require("./jobsvc");
const { fromStruct, fromValue, toStruct, toValue } = require("./jobsvc");
const { Failure, check, run, step } = require("./checks");

const STREAM_WAIT_MS = 10000; // the longest wait for one stream message

// --- plumbing a service would keep (with jobsvc.js) ---------------------------------------

// StreamJobUpdates, read one message at a time with a timeout. Remembers the last non-empty
// resume_token, the point to resume from.
class UpdateStream {
  constructor(client, request) {
    this.resumeToken = request.resume_token || "";
    this.call = client.StreamJobUpdates(request); // no deadline: a stream stays open
    this.messages = this.call[Symbol.asyncIterator]();
  }

  async next(timeoutMs = STREAM_WAIT_MS) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Failure(`no stream message within ${timeoutMs / 1000} s`)),
        timeoutMs,
      );
    });
    try {
      const { value, done } = await Promise.race([this.messages.next(), timeout]);
      if (done) throw new Failure("the stream ended");
      if (value.resume_token) this.resumeToken = value.resume_token;
      return value;
    } finally {
      clearTimeout(timer);
    }
  }

  // The next job change, skipping heartbeats (and `synced`, which a resumed stream may send
  // at any point).
  async nextJob(timeoutMs = STREAM_WAIT_MS) {
    for (;;) {
      const update = await this.next(timeoutMs);
      if (update.event === "job") return update.job;
    }
  }

  // Drops the stream, as a disconnect would.
  close() {
    this.call.on("error", () => {}); // the CANCELLED that follows is ours
    this.call.cancel();
  }
}

// --- checks -------------------------------------------------------------------------------


function expectJob(job, { id, status, version }) {
  check(job.id === id, `job id is ${JSON.stringify(job.id)}, expected ${id}`);
  check(
    job.status === status && job.version === version,
    `job ${id} is ${job.status} v${job.version}, expected ${status} v${version}`,
  );
}


// --- the scenario -------------------------------------------------------------------------

async function main() {
  const addr = process.env.JOBSVC_ADDR;
  const token = process.env.JOBSVC_TOKEN;
  if (!addr || !token) {
    console.error("set JOBSVC_ADDR (host:port) and JOBSVC_TOKEN (a service_role JWT)");
    process.exit(2);
  }

  // The service creating jobs and the agent doing them hold separate channels.
  const jobs = connect(addr, token);
  const agent = connect(addr, token);
  const agentId = `summarizer-${randomUUID().slice(0, 8)}`; // one per run: exact counts below

  step("CreateJob with a request_id, then the same call again (a retry)");
  const create = {
    agent_identifier: agentId,
    job_data: toStruct({ url: "https://example.com", words: 100 }),
    request_id: randomUUID(),
  };
  const job = await call(jobs, "CreateJob", create);
  check(
    /^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$/.test(job.id),
    `job id ${job.id} is not a UUID`,
  );
  expectJob(job, { id: job.id, status: "JOB_STATUS_PENDING", version: 1 });
  check(
    isDeepStrictEqual(fromStruct(job.job_data), { url: "https://example.com", words: 100 }),
    `job_data is ${JSON.stringify(fromStruct(job.job_data))}`,
  );
  const retry = await call(jobs, "CreateJob", create);
  expectJob(retry, { id: job.id, status: "JOB_STATUS_PENDING", version: 1 });
  console.log(`    job ${job.id}; the retry returned the same job`);

  step("StreamJobUpdates for the job (include_existing), until synced");
  let stream = new UpdateStream(jobs, { job_ids: [job.id], include_existing: true });
  const existing = await stream.next();
  check(existing.event === "job", `expected the existing job first, got ${existing.event}`);
  expectJob(existing.job, { id: job.id, status: "JOB_STATUS_PENDING", version: 1 });
  const synced = await stream.next();
  check(synced.event === "synced", `expected synced, got ${synced.event}`);

  step("the agent moves the job to RUNNING, then COMPLETED (optimistic concurrency)");
  const running = await call(agent, "UpdateStatus", {
    id: job.id,
    status: "JOB_STATUS_RUNNING",
    expected_version: 1,
  });
  expectJob(running, { id: job.id, status: "JOB_STATUS_RUNNING", version: 2 });
  check(running.started_at !== null, "a RUNNING job has started_at");
  const done = await call(agent, "UpdateStatus", {
    id: job.id,
    status: "JOB_STATUS_COMPLETED",
    result: toValue({ summary: "done" }),
    expected_version: running.version,
  });
  expectJob(done, { id: job.id, status: "JOB_STATUS_COMPLETED", version: 3 });

  step("the stream delivers both changes, in version order");
  expectJob(await stream.nextJob(), { id: job.id, status: "JOB_STATUS_RUNNING", version: 2 });
  const streamed = await stream.nextJob();
  expectJob(streamed, { id: job.id, status: "JOB_STATUS_COMPLETED", version: 3 });
  check(
    isDeepStrictEqual(fromValue(streamed.result), { summary: "done" }),
    "streamed result differs",
  );
  stream.close();

  step("WaitJob returns the finished job");
  // The call's deadline (15 s) outlasts the server-side wait (10 s).
  const waited = await call(jobs, "WaitJob", { id: job.id, timeout: { seconds: 10 } }, 15000);
  expectJob(waited, { id: job.id, status: "JOB_STATUS_COMPLETED", version: 3 });
  check(
    isDeepStrictEqual(fromValue(waited.result), { summary: "done" }),
    `result is ${JSON.stringify(fromValue(waited.result))}`,
  );
  check(waited.completed_at !== null, "a COMPLETED job has completed_at");

  step("ListJobs, GetStats and ListJobEvents for this agent's job");
  const page = await call(jobs, "ListJobs", {
    agent_identifier: agentId,
    statuses: ["JOB_STATUS_COMPLETED"],
  });
  const listed = page.jobs.map((j) => j.id);
  check(isDeepStrictEqual(listed, [job.id]), `ListJobs gave ${JSON.stringify(listed)}`);
  check(page.next_page_token === "", "one job fits in one page");
  let stats = await call(jobs, "GetStats", { agent_identifier: agentId });
  const counts = (s) => [s.total, s.pending, s.running, s.completed, s.failed, s.cancelled];
  check(
    isDeepStrictEqual(counts(stats), [1, 0, 0, 1, 0, 0]),
    `GetStats counts (total..cancelled) are ${counts(stats)}`,
  );
  check(stats.avg_processing_seconds >= 0, "avg_processing_seconds is negative");
  check(stats.oldest_pending_created_at === null, "nothing of this agent is pending");
  const history = await call(jobs, "ListJobEvents", { job_id: job.id });
  const events = history.events.map((e) => [e.job_id, e.version, e.status]);
  const want = [
    [job.id, 1, "JOB_STATUS_PENDING"],
    [job.id, 2, "JOB_STATUS_RUNNING"],
    [job.id, 3, "JOB_STATUS_COMPLETED"],
  ];
  check(isDeepStrictEqual(events, want), `ListJobEvents gave ${JSON.stringify(events)}`);

  step("an invalid move: FAILED_PRECONDITION, reason INVALID_TRANSITION");
  try {
    await call(agent, "UpdateStatus", { id: job.id, status: "JOB_STATUS_RUNNING" });
    throw new Failure("moving a COMPLETED job back to RUNNING succeeded");
  } catch (err) {
    const info = err instanceof Failure ? null : errorInfo(err);
    if (err.code !== grpc.status.FAILED_PRECONDITION || !info) throw err;
    // Branch on the stable reason, never on the message text.
    check(info.domain === "jobsvc", `ErrorInfo domain is ${info.domain}`);
    check(info.reason === "INVALID_TRANSITION", `ErrorInfo reason is ${info.reason}`);
    check(
      isDeepStrictEqual(info.metadata, {
        current_status: "completed",
        requested_status: "running",
      }),
      `ErrorInfo metadata is ${JSON.stringify(info.metadata)}`,
    );
    console.log(`    refused as expected: ${err.details}`);
  }

  step("resume: a second job streamed, the stream dropped, a change missed, then resumed");
  const job2 = await call(jobs, "CreateJob", {
    agent_identifier: agentId,
    request_id: randomUUID(),
  });
  expectJob(job2, { id: job2.id, status: "JOB_STATUS_PENDING", version: 1 });
  const watch = { job_ids: [job2.id] };
  stream = new UpdateStream(jobs, watch);
  check((await stream.next()).event === "synced", "expected synced first");
  await call(agent, "UpdateStatus", { id: job2.id, status: "JOB_STATUS_RUNNING" });
  expectJob(await stream.nextJob(), { id: job2.id, status: "JOB_STATUS_RUNNING", version: 2 });
  check(stream.resumeToken !== "", "a live change carries a resume_token");
  stream.close(); // disconnected: the next change happens while nobody listens
  await call(agent, "UpdateStatus", {
    id: job2.id,
    status: "JOB_STATUS_FAILED",
    error_message: "source unreachable",
  });
  const resumed = new UpdateStream(jobs, { ...watch, resume_token: stream.resumeToken });
  const handled = new Map([[job2.id, 2]]); // delivery is at least once: skip what was handled
  let missed = await resumed.nextJob();
  while (missed.version <= (handled.get(missed.id) ?? 0)) missed = await resumed.nextJob();
  expectJob(missed, { id: job2.id, status: "JOB_STATUS_FAILED", version: 3 });
  check(missed.error_message === "source unreachable", `error_message is ${missed.error_message}`);
  resumed.close();

  step("GetStats counts both jobs");
  stats = await call(jobs, "GetStats", { agent_identifier: agentId });
  check(
    isDeepStrictEqual(counts(stats), [2, 0, 0, 1, 1, 0]),
    `GetStats counts (total..cancelled) are ${counts(stats)}`,
  );

  jobs.close();
  agent.close();
  console.log("OK: every answer was as expected");
}

run(main);
