// The web client's smoke program: calls every RPC of jobsvc's JobService once over gRPC-Web
// (binary, HTTP/1.1 through Node's fetch, the transport a browser uses) with the generated
// stubs, and checks each answer.
//
//   scripts/test-deps            # or: npm ci --prefix clients/web
//   JOBSVC_ADDR=127.0.0.1:50051 JOBSVC_TOKEN=<service_role JWT> npm --prefix clients/web run smoke
//
// JOBSVC_TOKEN is what `jobsvc token --role service_role` prints (or the `export TOKEN=...` line
// the server prints at start). `npm run smoke` bundles this file with esbuild into
// target/web-smoke/smoke.mjs and runs it with node. Any surprise ends the program with exit
// status 1 and a message naming the step. Every call has a timeout (`timeoutMs`), and so has
// every wait for a stream message.
import { randomUUID } from "node:crypto";
import { isDeepStrictEqual } from "node:util";
import { fromJson, type JsonValue, toJson } from "@bufbuild/protobuf";
import { timestampDate, ValueSchema } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError } from "@connectrpc/connect";
import { type Job, type JobService, JobStatus, type JobUpdate } from "./src/gen/jobs/v1/jobs_pb.js";
import { errorInfo, jobsvcClient } from "./src/jobsvc.js";

const CALL_TIMEOUT_MS = 5000; // every unary call
const STREAM_TIMEOUT_MS = 30000; // the whole stream (it is aborted long before)
const STREAM_WAIT_MS = 10000; // the longest wait for one stream message

class Failure extends Error {}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Failure(message);
}

const statusName = (s: JobStatus) => JobStatus[s] ?? `${s}`;
const uuidPattern = /^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$/;

function expectJob(
  job: Job | undefined,
  want: { id: string; status: JobStatus; version: bigint },
): asserts job is Job {
  check(job, `no job, expected ${want.id}`);
  check(job.id === want.id, `job id is ${JSON.stringify(job.id)}, expected ${want.id}`);
  check(
    job.status === want.status && job.version === want.version,
    `job ${job.id} is ${statusName(job.status)} v${job.version}, ` +
      `expected ${statusName(want.status)} v${want.version}`,
  );
}

let currentStep = "start";
function step(name: string) {
  currentStep = name;
  console.log(`==> ${name}`);
}

// What the stream's iterator gives next (a message, its end, or its error), within
// STREAM_WAIT_MS.
async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Failure(`no ${what} within ${STREAM_WAIT_MS / 1000} s`)),
      STREAM_WAIT_MS,
    );
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// The next message of a stream.
async function nextUpdate(messages: AsyncIterator<JobUpdate>): Promise<JobUpdate> {
  const next = await within(messages.next(), "stream message");
  check(!next.done, "the stream ended");
  return next.value;
}

// The next job on a stream, skipping heartbeats (sent when it is idle).
async function nextJob(messages: AsyncIterator<JobUpdate>): Promise<Job> {
  for (;;) {
    const update = await nextUpdate(messages);
    if (update.event.case === "job") return update.event.value;
    check(update.event.case === "heartbeat", `expected a job, got ${update.event.case}`);
  }
}

async function run(addr: string, token: string) {
  const baseUrl = `http://${addr}`;
  const jobs: Client<typeof JobService> = jobsvcClient(baseUrl, token);
  const call = { timeoutMs: CALL_TIMEOUT_MS };
  const agentId = `web-smoke-${randomUUID().slice(0, 8)}`; // one per run: exact counts below

  step("CreateJob");
  const jobData = { url: "https://example.com", words: 100 };
  const job = await jobs.createJob(
    { agentIdentifier: agentId, jobData, requestId: randomUUID() },
    call,
  );
  check(uuidPattern.test(job.id), `job id ${job.id} is not a UUID`);
  expectJob(job, { id: job.id, status: JobStatus.PENDING, version: 1n });
  check(job.agentIdentifier === agentId, `agent_identifier is ${job.agentIdentifier}`);
  check(isDeepStrictEqual(job.jobData, jobData), `job_data is ${JSON.stringify(job.jobData)}`);
  check(job.createdAt, "a new job has created_at");
  const age = Date.now() - timestampDate(job.createdAt).getTime();
  check(Math.abs(age) < 60_000, `created_at is ${age} ms away from this clock`);
  console.log(`    job ${job.id}`);

  step("GetJob");
  const got = await jobs.getJob({ id: job.id }, call);
  expectJob(got, { id: job.id, status: JobStatus.PENDING, version: 1n });
  check(isDeepStrictEqual(got.jobData, jobData), `job_data is ${JSON.stringify(got.jobData)}`);

  step("StreamJobUpdates (include_existing): the existing job, synced, then a new job");
  const abort = new AbortController();
  const stream = jobs.streamJobUpdates(
    { agentIdentifier: agentId, includeExisting: true },
    { timeoutMs: STREAM_TIMEOUT_MS, signal: abort.signal },
  );
  const messages = stream[Symbol.asyncIterator]();
  const existing = await nextUpdate(messages);
  check(existing.event.case === "job", `expected the existing job, got ${existing.event.case}`);
  expectJob(existing.event.value, { id: job.id, status: JobStatus.PENDING, version: 1n });
  const synced = await nextUpdate(messages);
  check(synced.event.case === "synced", `expected synced, got ${synced.event.case}`);
  const second = await jobs.createJob({ agentIdentifier: agentId }, call);
  expectJob(second, { id: second.id, status: JobStatus.PENDING, version: 1n });
  const arrived = await nextJob(messages);
  expectJob(arrived, { id: second.id, status: JobStatus.PENDING, version: 1n });
  check(arrived.jobData && Object.keys(arrived.jobData).length === 0, "job_data is not {}");
  abort.abort();
  try {
    const after = await within(messages.next(), "end of the aborted stream");
    check(after.done, "a message after the abort");
  } catch (err) {
    if (err instanceof Failure) throw err;
    check(
      err instanceof ConnectError && err.code === Code.Canceled,
      `the aborted stream ended with ${String(err)}, expected CANCELED`,
    );
  }
  console.log(`    job ${second.id} arrived live; stream aborted`);

  step("UpdateStatus: PENDING -> RUNNING -> COMPLETED (expected_version)");
  const running = await jobs.updateStatus(
    { id: job.id, status: JobStatus.RUNNING, expectedVersion: 1n },
    call,
  );
  expectJob(running, { id: job.id, status: JobStatus.RUNNING, version: 2n });
  check(running.startedAt, "a RUNNING job has started_at");
  const result = { summary: "done" };
  const done = await jobs.updateStatus(
    {
      id: job.id,
      status: JobStatus.COMPLETED,
      result: fromJson(ValueSchema, result),
      expectedVersion: running.version,
    },
    call,
  );
  expectJob(done, { id: job.id, status: JobStatus.COMPLETED, version: 3n });

  step("WaitJob returns the finished job");
  // The call's timeout (15 s) outlasts the server-side wait (10 s).
  const waited = await jobs.waitJob(
    { id: job.id, timeout: { seconds: 10n } },
    { timeoutMs: 15000 },
  );
  expectJob(waited, { id: job.id, status: JobStatus.COMPLETED, version: 3n });
  const waitedResult: JsonValue | undefined = waited.result && toJson(ValueSchema, waited.result);
  check(isDeepStrictEqual(waitedResult, result), `result is ${JSON.stringify(waitedResult)}`);
  check(waited.completedAt, "a COMPLETED job has completed_at");

  step("CancelJob the second job");
  const cancelled = await jobs.cancelJob({ id: second.id }, call);
  expectJob(cancelled, { id: second.id, status: JobStatus.CANCELLED, version: 2n });
  check(cancelled.completedAt, "a CANCELLED job has completed_at");

  step("ListJobs: this agent's two jobs, newest first");
  const page = await jobs.listJobs({ agentIdentifier: agentId }, call);
  const listed = page.jobs.map((j) => [j.id, statusName(j.status)]);
  const wantListed = [
    [second.id, "CANCELLED"],
    [job.id, "COMPLETED"],
  ];
  check(isDeepStrictEqual(listed, wantListed), `ListJobs gave ${JSON.stringify(listed)}`);
  check(page.nextPageToken === "", "two jobs fit in one page");

  step("ListJobEvents: the first job's history");
  const history = await jobs.listJobEvents({ jobId: job.id }, call);
  const events = history.events.map((e) => [e.jobId, Number(e.version), statusName(e.status)]);
  const wantEvents = [
    [job.id, 1, "PENDING"],
    [job.id, 2, "RUNNING"],
    [job.id, 3, "COMPLETED"],
  ];
  check(isDeepStrictEqual(events, wantEvents), `ListJobEvents gave ${JSON.stringify(events)}`);
  check(history.nextPageToken === "", "three events fit in one page");

  step("ClaimJobs: a worker takes a new job under a lease");
  const third = await jobs.createJob({ agentIdentifier: agentId, maxAttempts: 2 }, call);
  expectJob(third, { id: third.id, status: JobStatus.PENDING, version: 1n });
  const claim = await jobs.claimJobs(
    {
      agentIdentifier: agentId,
      maxJobs: 5,
      leaseDuration: { seconds: 30n },
      workerId: "web-smoke",
    },
    call,
  );
  check(claim.jobs.length === 1, `ClaimJobs took ${claim.jobs.length} jobs, expected 1`);
  const [{ job: claimed, leaseId }] = claim.jobs;
  expectJob(claimed, { id: third.id, status: JobStatus.RUNNING, version: 2n });
  check(claimed.attempt === 1, `attempt is ${claimed.attempt}, expected 1`);
  check(claimed.workerId === "web-smoke", `worker_id is ${JSON.stringify(claimed.workerId)}`);
  check(claimed.leaseExpireTime, "a claimed job has lease_expire_time");
  check(leaseId !== "", "the claim has no lease_id");

  step("Heartbeat: the lease goes on, with progress");
  const beat = await jobs.heartbeat(
    {
      id: third.id,
      leaseId,
      leaseDuration: { seconds: 60n },
      progress: fromJson(ValueSchema, { done: 1 }),
    },
    call,
  );
  check(!beat.cancelRequested, "Heartbeat says cancel_requested");
  check(beat.leaseExpireTime, "Heartbeat gave no lease_expire_time");
  const leaseLeft = timestampDate(beat.leaseExpireTime).getTime() - Date.now();
  check(
    leaseLeft > 30_000 && leaseLeft < 90_000,
    `the lease ends in ${leaseLeft} ms, expected about 60 s`,
  );
  const finished = await jobs.updateStatus(
    { id: third.id, status: JobStatus.COMPLETED, leaseId },
    call,
  );
  check(
    finished.id === third.id && finished.status === JobStatus.COMPLETED && finished.version > 2n,
    `job ${finished.id} is ${statusName(finished.status)} v${finished.version}, expected COMPLETED`,
  );
  check(
    finished.progress && isDeepStrictEqual(toJson(ValueSchema, finished.progress), { done: 1 }),
    "the job lost its progress",
  );

  step("GetStats for this agent");
  const stats = await jobs.getStats({ agentIdentifier: agentId }, call);
  const { total, pending, running: runs, completed, failed, cancelled: cancels } = stats;
  const counts = [total, pending, runs, completed, failed, cancels];
  check(
    isDeepStrictEqual(counts, [3n, 0n, 0n, 2n, 0n, 1n]),
    `GetStats counts (total..cancelled) are ${counts.join(",")}, expected 3,0,0,2,0,1`,
  );
  check(stats.avgProcessingSeconds >= 0, "avg_processing_seconds is negative");
  check(!stats.oldestPendingCreatedAt, "nothing of this agent is pending");

  step("a call without a token: UNAUTHENTICATED, reason TOKEN_MISSING");
  const anonymous = jobsvcClient(baseUrl);
  try {
    await anonymous.getStats({}, call);
    throw new Failure("GetStats without a token succeeded");
  } catch (err) {
    if (err instanceof Failure) throw err;
    check(err instanceof ConnectError, `not a ConnectError: ${String(err)}`);
    check(err.code === Code.Unauthenticated, `code ${Code[err.code]}, expected Unauthenticated`);
    const info = errorInfo(err);
    check(info, `no ErrorInfo among the details (${err.details.length} details)`);
    check(
      info.reason === "TOKEN_MISSING" && info.domain === "jobsvc",
      `ErrorInfo is ${info.domain}/${info.reason}, expected jobsvc/TOKEN_MISSING`,
    );
    console.log(`    ${Code[err.code]} ${info.reason}: ${err.rawMessage}`);
  }

  console.log("all checks passed");
}

async function main() {
  const addr = process.env.JOBSVC_ADDR;
  const token = process.env.JOBSVC_TOKEN;
  if (!addr || !token) {
    console.error("set JOBSVC_ADDR (host:port) and JOBSVC_TOKEN (a service_role JWT)");
    process.exit(2);
  }
  try {
    await run(addr, token);
  } catch (err) {
    let what = String(err instanceof Error ? err.message : err);
    if (err instanceof ConnectError) {
      const info = errorInfo(err);
      what = `${Code[err.code]}${info ? ` (${info.reason})` : ""}: ${err.rawMessage}`;
      // A failed fetch (server down, connection refused) says why in its cause.
      const cause = err.cause instanceof Error ? err.cause : undefined;
      const why = cause?.cause instanceof Error ? cause.cause.message : cause?.message;
      if (why && why !== err.rawMessage) what += ` (${why})`;
    } else if (!(err instanceof Failure) && err instanceof Error && err.stack) {
      what = err.stack;
    }
    console.error(`web smoke FAILED at step "${currentStep}": ${what}`);
    process.exit(1);
  }
  process.exit(0); // without waiting for idle keep-alive connections
}

void main();
