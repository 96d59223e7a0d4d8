#!/usr/bin/env node
// A jobsvc worker in Node.js (@grpc/grpc-js): claims an agent's jobs under a lease, runs a
// handler per job, heartbeats while it runs, and completes, fails (retried by the server), or
// hands the job back.
//
//   npm ci --prefix clients/node
//   JOBSVC_ADDR=127.0.0.1:50051 JOBSVC_TOKEN=<service_role JWT> node clients/node/worker.js
//
// `Worker` below is the part a service would copy; `main` runs it on six jobs and checks every
// outcome: a job that fails once and is retried, one that fails for good, one that outlasts its
// lease thanks to heartbeats, one cancelled while it runs, one failed by an operator under the
// worker (its lease is lost), and one handed back when the worker stops. JOBSVC_TOKEN is what
// `jobsvc token --role service_role` prints (or the `export TOKEN=...` line the server prints at
// start). Every answer is checked: any surprise ends the program with exit status 1 and a
// message naming the step. Each call and each wait has a timeout.
//
// The plumbing it shares with example.js (loading the stubs, the bearer token, a unary call with
// a deadline, ErrorInfo, Duration, Struct / Value) is in jobsvc.js: `Worker` needs it too.
"use strict";
const { randomUUID } = require("node:crypto");
const { isDeepStrictEqual } = require("node:util");
const grpc = require("@grpc/grpc-js");
// CALL_TIMEOUT_MS: every unary call (a waiting ClaimJobs gets its `wait` on top).
const { CALL_TIMEOUT_MS, call, connect, duration, errorInfo } = require("./jobsvc");
const { fromStruct, fromValue, toStruct, toValue } = require("./jobsvc");
const { Failure, check, run, step } = require("./checks");

// --- plumbing a service would keep (with jobsvc.js) ---------------------------------------

// A failed call that says the lease is no longer the job's.
const leaseLost = (err) =>
  err.code === grpc.status.FAILED_PRECONDITION && errorInfo(err)?.reason === "LEASE_LOST";

// Worth another try later: the server or the network is briefly unable to answer.
const TRANSIENT = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
]);

// Resolves after `ms` with false, or at once with true when `signal` aborts (or has).
function sleep(ms, signal) {
  if (signal?.aborted) return Promise.resolve(true);
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve(true);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(false);
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

// --- the worker a service would copy -------------------------------------------------------

// Thrown by a handler: the job cannot succeed however often it is tried (bad input, ...). The
// job is FAILED for good (`no_retry`), whatever attempts it has left.
class PermanentError extends Error {
  name = "PermanentError";
}

// Thrown by a handler (through `ctx.check()`) when it was told to stop working.
class Stopped extends Error {
  name = "Stopped";
}

const CANCELLED = "cancelled";
const LEASE_LOST = "lease lost";
const SHUTDOWN = "worker shutting down";

// What a handler gets besides the job: a stop signal (the job was cancelled, its lease lost, or
// the worker is shutting down; `signal.reason` says which) and a way to report progress with
// the next heartbeat.
class JobContext {
  constructor(job, leaseId) {
    this.job = job;
    this.leaseId = leaseId;
    this.stopper = new AbortController();
    this.signal = this.stopper.signal; // pass it on to fetch() and the like
    this.pendingProgress = undefined; // the last progress reported and not yet sent
  }

  get stopReason() {
    return this.signal.aborted ? this.signal.reason : null;
  }

  // Reports progress (any JSON): stored with the job by the next heartbeat.
  progress(data) {
    this.pendingProgress = data;
  }

  // Sleeps up to `ms`; true (at once) when the handler should stop.
  wait(ms) {
    return sleep(ms, this.signal);
  }

  // Throws Stopped when the handler should stop; call it between steps of the work.
  check() {
    if (this.signal.aborted) throw new Stopped(this.signal.reason);
  }

  requestStop(why) {
    if (!this.signal.aborted) this.stopper.abort(why); // the first reason stays
  }
}

// Claims jobs of one agent and runs `await handler(job, ctx)` for each, `concurrency` at a time.
//
// The handler returns the job's result (any JSON, stored by COMPLETED) or throws: an error
// FAILS the job, which the server retries with backoff while it has attempts left;
// PermanentError (or another class in `noRetry`) fails it for good. While the handler runs, a
// heartbeat every third of the lease keeps the lease (the handler must not block the event
// loop for that long: move CPU-bound work to a worker thread); when a heartbeat says the job
// was cancelled, or that the lease is lost (it expired and the job was retried elsewhere, or
// someone else ended it), `ctx.signal` aborts, and the worker never tries to finish that job: a
// handler should watch `ctx.signal` / `ctx.wait()` / `ctx.check()` and give up. On `stop()`,
// running handlers are told to stop too; one that throws Stopped hands its job back (PENDING,
// the claim not counted), so another worker takes it at once.
class Worker {
  constructor(
    client,
    agentIdentifier,
    handler,
    {
      workerId,
      concurrency = 1,
      leaseMs = 30000,
      waitMs = 20000, // a claim that finds nothing waits this long (at most 60 s)
      noRetry = [PermanentError],
      onEvent = (job, what) => console.log(`    job ${job.id} attempt ${job.attempt}: ${what}`),
    },
  ) {
    Object.assign(this, { client, agentIdentifier, handler, workerId, concurrency });
    Object.assign(this, { leaseMs, waitMs, noRetry, onEvent });
    this.error = null; // the error that stopped the worker, if any
    this.stopping = new AbortController();
    this.running = new Set(); // the JobContexts of the handlers running now
    this.loops = [];
  }

  // Starting and stopping.

  start() {
    for (let n = 0; n < this.concurrency; n++) this.loops.push(this.loop());
  }

  // Stops claiming, tells running handlers to stop, and waits for the loops (a waiting claim
  // ends within `waitMs`). True when every loop has ended within `timeoutMs`.
  async stop(timeoutMs = 60000) {
    this.stopping.abort();
    for (const ctx of this.running) ctx.requestStop(SHUTDOWN);
    let timer;
    const late = new Promise((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    const ended = await Promise.race([Promise.all(this.loops).then(() => true), late]);
    clearTimeout(timer);
    return ended;
  }

  // An error no retry can fix (a bad token, a bad request): the whole worker stops.
  fatal(err) {
    this.error ??= err;
    this.stopping.abort();
  }

  // The claim loop; `concurrency` of them run at once.

  async loop() {
    let backoffMs = 500;
    while (!this.stopping.signal.aborted) {
      const request = {
        agent_identifier: this.agentIdentifier,
        max_jobs: 1, // one job per loop at a time; claim more for short jobs
        lease_duration: duration(this.leaseMs),
        wait: duration(this.waitMs), // long-poll: no busy loop when idle
        worker_id: this.workerId,
      };
      let claimed;
      try {
        // The call's deadline outlasts the server-side wait. It is not cancelled on stop(): a
        // claim cut short may have taken jobs that nobody would then work on.
        claimed = await call(this.client, "ClaimJobs", request, this.waitMs + CALL_TIMEOUT_MS);
      } catch (err) {
        if (!TRANSIENT.has(err.code)) return this.fatal(err);
        await sleep(backoffMs, this.stopping.signal); // the server is busy or away: back off
        backoffMs = Math.min(backoffMs * 2, 30000);
        continue;
      }
      backoffMs = 500;
      for (const { job, lease_id } of claimed.jobs) {
        try {
          if (this.stopping.signal.aborted) {
            // Claimed while stop() waited for this call: hand it back at once.
            this.onEvent(job, "claimed while stopping");
            await this.finish(job, lease_id, "JOB_STATUS_PENDING");
          } else {
            await this.work(job, lease_id);
          }
        } catch (err) {
          return this.fatal(err);
        }
      }
    }
  }

  // One job.

  async work(job, leaseId) {
    const ctx = new JobContext(job, leaseId);
    this.running.add(ctx);
    if (this.stopping.signal.aborted) ctx.requestStop(SHUTDOWN);
    this.onEvent(job, `claimed (attempt ${job.attempt} of ${job.max_attempts})`);
    const done = new AbortController();
    const beats = this.heartbeat(ctx, done.signal);
    let result;
    let error = null;
    try {
      result = toValue((await this.handler(job, ctx)) ?? null);
    } catch (err) {
      error = err; // the handler's failure is the job's, never the worker's
    } finally {
      done.abort();
      await beats;
      this.running.delete(ctx);
    }

    if (ctx.stopReason === CANCELLED || ctx.stopReason === LEASE_LOST) {
      // The job is no longer ours: finishing it would be refused (LEASE_LOST). Drop it.
      this.onEvent(job, `stopped: ${ctx.stopReason}`);
    } else if (error instanceof Stopped) {
      await this.finish(job, leaseId, "JOB_STATUS_PENDING"); // shutting down: hand it back
    } else if (error === null) {
      await this.finish(job, leaseId, "JOB_STATUS_COMPLETED", { result });
    } else {
      await this.finish(job, leaseId, "JOB_STATUS_FAILED", {
        error_message: `${error.name ?? "Error"}: ${error.message ?? error}`.slice(0, 4000),
        no_retry: this.noRetry.some((cls) => error instanceof cls),
      });
    }
  }

  // Every third of the lease: extend it and send progress, until the handler is done (`done`
  // aborts) or the job is no longer ours.
  async heartbeat(ctx, done) {
    const intervalMs = this.leaseMs / 3;
    let leaseEnds = Date.now() + this.leaseMs; // as the claim set it, about
    while (!(await sleep(intervalMs, done))) {
      const progress = ctx.pendingProgress;
      ctx.pendingProgress = undefined;
      const request = {
        id: ctx.job.id,
        lease_id: ctx.leaseId,
        lease_duration: duration(this.leaseMs),
      };
      if (progress !== undefined) request.progress = toValue(progress);
      const sent = Date.now();
      let answer;
      try {
        const timeoutMs = Math.min(CALL_TIMEOUT_MS, intervalMs);
        answer = await call(this.client, "Heartbeat", request, timeoutMs);
      } catch (err) {
        if (leaseLost(err)) return ctx.requestStop(LEASE_LOST);
        if (TRANSIENT.has(err.code) && Date.now() < leaseEnds) {
          if (progress !== undefined) ctx.pendingProgress ??= progress; // unless newer
          continue; // two more tries before the lease can have ended
        }
        // The lease may have ended unseen (or the job is gone): assume another worker has
        // the job now.
        return ctx.requestStop(LEASE_LOST);
      }
      if (answer.cancel_requested) return ctx.requestStop(CANCELLED);
      leaseEnds = sent + this.leaseMs;
    }
  }

  // Ends the lease with a move: COMPLETED, FAILED (retried while attempts are left, unless
  // no_retry) or PENDING (handed back). A repeat of the lease's own move answers with the job
  // unchanged, so a move whose answer was lost is simply sent again.
  async finish(job, leaseId, status, fields = {}) {
    const request = { id: job.id, status, lease_id: leaseId, ...fields };
    let after;
    for (let attempt = 0; ; attempt++) {
      try {
        after = await call(this.client, "UpdateStatus", request);
        break;
      } catch (err) {
        if (leaseLost(err)) {
          return this.onEvent(job, "lease lost before it could be ended: dropped");
        }
        if (err.code === grpc.status.INVALID_ARGUMENT && status === "JOB_STATUS_COMPLETED") {
          // The result was refused (too large, ...): no retry will change that.
          return this.finish(job, leaseId, "JOB_STATUS_FAILED", {
            error_message: `result refused: ${err.details}`.slice(0, 4000),
            no_retry: true,
          });
        }
        if (!TRANSIENT.has(err.code) || attempt === 3) throw err;
        await sleep(500 * 2 ** attempt);
      }
    }
    if (after.status === "JOB_STATUS_COMPLETED") {
      this.onEvent(after, "completed");
    } else if (after.status === "JOB_STATUS_FAILED") {
      this.onEvent(after, `failed for good: ${after.error_message}`);
    } else if (status === "JOB_STATUS_FAILED") {
      this.onEvent(after, `failed, to be retried: ${after.error_message}`); // PENDING, backoff
    } else {
      this.onEvent(after, "handed back");
    }
  }
}

// A flag to wait for with a timeout: set by a handler, awaited by the scenario.
class Flag {
  constructor() {
    this.isSet = false;
    this.waiters = [];
  }
  set() {
    this.isSet = true;
    for (const wake of this.waiters.splice(0)) wake();
  }
  clear() {
    this.isSet = false;
  }
  // True once set; false when `ms` passes first.
  async wait(ms) {
    if (this.isSet) return true;
    let timer;
    const woken = new Promise((resolve) => this.waiters.push(resolve));
    const late = new Promise((resolve) => (timer = setTimeout(resolve, ms)));
    await Promise.race([woken, late]);
    clearTimeout(timer);
    return this.isSet;
  }
}

// --- the scenario -------------------------------------------------------------------------

const LEASE_MS = 3000; // heartbeats every second, and the "slow" job outlasts a lease

// The demo's handler: what it does depends on job_data.kind. `started[kind]` is set when a
// handler of that kind begins, so the scenario can act on a running job.
function handlerFor(started) {
  return async (job, ctx) => {
    const data = fromStruct(job.job_data);
    started[data.kind]?.set();
    switch (data.kind) {
      case "quick":
        return { echo: data.text };
      case "flaky": // fails its first attempt, then succeeds
        if (job.attempt === 1) throw new Error("upstream timed out");
        return { attempt: job.attempt };
      case "bad":
        throw new PermanentError("no such document");
      case "slow": // 4.5 s, longer than the lease: only heartbeats keep it
        for (let n = 1; n <= 9; n++) {
          ctx.progress({ step: n, of: 9 });
          if (await ctx.wait(500)) ctx.check();
        }
        return { steps: 9 };
      case "wait-for-stop": // runs until told to stop (cancel, lost lease, shutdown)
        ctx.progress({ waiting: true });
        await ctx.wait(15000);
        ctx.check();
        return { stopped: false }; // never told: the scenario's checks will say so
    }
    throw new PermanentError(`unknown kind ${data.kind}`);
  };
}

async function main() {
  const addr = process.env.JOBSVC_ADDR;
  const token = process.env.JOBSVC_TOKEN;
  if (!addr || !token) {
    console.error("set JOBSVC_ADDR (host:port) and JOBSVC_TOKEN (a service_role JWT)");
    process.exit(2);
  }

  // The service creating jobs (and the operator) and the worker hold separate channels.
  const jobs = connect(addr, token);
  const workerClient = connect(addr, token);
  const run = randomUUID().slice(0, 8);
  const agentId = `worker-demo-${run}`; // one agent name per run: only this run's jobs are claimed
  const workerId = `node-worker-${run}`;

  step("CreateJob: six jobs, each with max_attempts 2 and an initial_backoff of 0.2 s");
  const specs = {
    // name (job_data.kind unless given): [priority, more job_data]
    slow: [10, {}],
    cancel: [5, { kind: "wait-for-stop" }],
    lost: [4, { kind: "wait-for-stop" }],
    quick: [0, { text: "hello" }],
    flaky: [0, {}],
    bad: [-1, {}],
  };
  const ids = {};
  for (const [name, [priority, data]] of Object.entries(specs)) {
    const job = await call(jobs, "CreateJob", {
      agent_identifier: agentId,
      job_data: toStruct({ kind: name, ...data }),
      priority,
      max_attempts: 2,
      initial_backoff: duration(200),
      request_id: randomUUID(),
    });
    check(job.status === "JOB_STATUS_PENDING", `${name}: created ${job.status}`);
    check(
      isDeepStrictEqual([job.priority, job.max_attempts, job.attempt], [priority, 2, 0]),
      `${name}: created with priority ${job.priority}, max_attempts ${job.max_attempts}, ` +
        `attempt ${job.attempt}`,
    );
    ids[name] = job.id;
    console.log(`    ${name}: ${job.id} (priority ${priority})`);
  }
  const names = new Map(Object.entries(ids).map(([name, id]) => [id, name]));

  step(`start the worker: 2 at a time, ${LEASE_MS / 1000} s leases (a heartbeat every 1 s)`);
  const started = { slow: new Flag(), "wait-for-stop": new Flag() };
  const events = []; // [job name, attempt, what], in the order the worker reported them
  const onEvent = (job, what) => {
    const name = names.get(job.id) ?? job.id;
    events.push([name, job.attempt, what]);
    console.log(`    worker: ${name} attempt ${job.attempt}: ${what}`);
  };
  const worker = new Worker(workerClient, agentId, handlerFor(started), {
    workerId,
    concurrency: 2,
    leaseMs: LEASE_MS,
    waitMs: 5000,
    onEvent,
  });
  worker.start();

  async function waitStarted(kind, what) {
    if (!(await started[kind].wait(15000))) {
      throw worker.error ?? new Failure(`no handler started ${what} within 15 s`);
    }
    started[kind].clear();
  }

  step("the two highest priorities are claimed first; CancelJob while its handler runs");
  await waitStarted("wait-for-stop", "the job to cancel");
  await waitStarted("slow", "the slow job");
  const first = [...new Set(events.filter(([, , w]) => w.startsWith("claimed")).map(([n]) => n))];
  check(
    isDeepStrictEqual(first.sort(), ["cancel", "slow"]),
    `the first claims were ${JSON.stringify(first)}`,
  );
  const cancelled = await call(jobs, "CancelJob", { id: ids.cancel });
  check(cancelled.status === "JOB_STATUS_CANCELLED", `cancel: ${cancelled.status}`);

  step("an operator fails a running job (no lease): the worker's heartbeat gets LEASE_LOST");
  await waitStarted("wait-for-stop", "the job to take away");
  const failed = await call(jobs, "UpdateStatus", {
    id: ids.lost,
    status: "JOB_STATUS_FAILED",
    error_message: "stopped by an operator",
  });
  check(failed.status === "JOB_STATUS_FAILED", `lost: ${failed.status}`);

  step("WaitJob: every job ends (the flaky one after its retry)");
  const terminal = ["JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"];
  for (const [name, id] of Object.entries(ids)) {
    // The call's deadline (25 s) outlasts the server-side wait (20 s).
    const ended = await call(jobs, "WaitJob", { id, timeout: { seconds: 20 } }, 25000);
    check(worker.error === null, `the worker stopped: ${worker.error}`);
    check(terminal.includes(ended.status), `${name} is still ${ended.status} after 20 s`);
  }

  step("GetJob: status, attempts, result and error of every job");
  const want = {
    // name: [status, attempt, result, text the error_message holds]
    slow: ["JOB_STATUS_COMPLETED", 1, { steps: 9 }, null],
    cancel: ["JOB_STATUS_CANCELLED", 1, undefined, null],
    lost: ["JOB_STATUS_FAILED", 1, undefined, "stopped by an operator"],
    quick: ["JOB_STATUS_COMPLETED", 1, { echo: "hello" }, null],
    flaky: ["JOB_STATUS_COMPLETED", 2, { attempt: 2 }, null],
    bad: ["JOB_STATUS_FAILED", 1, undefined, "PermanentError: no such document"],
  };
  const final = {};
  for (const [name, [status, attempt, result, error]] of Object.entries(want)) {
    const job = await call(jobs, "GetJob", { id: ids[name] });
    final[name] = job;
    check(
      isDeepStrictEqual([job.status, job.attempt, job.max_attempts], [status, attempt, 2]),
      `${name} is ${job.status} at attempt ${job.attempt} of ${job.max_attempts}, ` +
        `expected ${status} at attempt ${attempt} of 2`,
    );
    const got = fromValue(job.result);
    check(isDeepStrictEqual(got, result), `${name}: result is ${JSON.stringify(got)}`);
    if (error !== null) {
      check(job.error_message.includes(error), `${name}: error_message is ${job.error_message}`);
    }
    check(job.worker_id === workerId, `${name}: worker_id is ${job.worker_id}`);
    check(job.lease_expire_time === null, `${name}: a finished job holds no lease`);
    check(job.completed_at !== null, `${name}: a finished job has completed_at`);
    console.log(`    ${name}: ${job.status}, attempt ${job.attempt} of ${job.max_attempts}`);
  }
  const progress = fromValue(final.slow.progress) ?? {};
  check(
    progress.of === 9 && progress.step >= 1 && progress.step <= 9,
    `slow: the heartbeats stored progress ${JSON.stringify(progress)}`,
  );
  check(final.flaky.run_after !== null, "flaky: the retry set run_after");

  step("the worker's own account: what it did with each job");
  const done = events
    .filter(([, , what]) => !what.startsWith("claimed"))
    .map(([name, attempt, what]) => [name, attempt, what.split(":")[0]]);
  const wantDone = [
    ["slow", 1, "completed"],
    ["cancel", 1, "stopped"], // cancel_requested: stopped, and never completed
    ["lost", 1, "stopped"], // LEASE_LOST on a heartbeat
    ["quick", 1, "completed"],
    ["flaky", 1, "failed, to be retried"],
    ["flaky", 2, "completed"],
    ["bad", 1, "failed for good"],
  ];
  const sorted = (rows) => rows.map((r) => JSON.stringify(r)).sort();
  check(
    isDeepStrictEqual(sorted(done), sorted(wantDone)),
    `the worker reported ${JSON.stringify(done)}`,
  );
  const why = Object.fromEntries(
    events.filter(([, , what]) => what.startsWith("stopped")).map(([name, , what]) => [name, what]),
  );
  check(why.cancel === "stopped: cancelled", `cancel: the worker ${why.cancel}`);
  check(why.lost === "stopped: lease lost", `lost: the worker ${why.lost}`);

  step("ListJobEvents: the flaky job's history shows the retry");
  const history = await call(jobs, "ListJobEvents", { job_id: ids.flaky });
  const statuses = history.events.map((e) => e.status.replace("JOB_STATUS_", ""));
  check(
    isDeepStrictEqual(statuses, ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETED"]),
    `flaky: history is ${JSON.stringify(statuses)}`,
  );

  step("GetStats: 3 completed, 2 failed, 1 cancelled, nothing left");
  const stats = await call(jobs, "GetStats", { agent_identifier: agentId });
  const counts = [stats.total, stats.pending, stats.running, stats.completed, stats.failed];
  counts.push(stats.cancelled);
  check(
    isDeepStrictEqual(counts, [6, 0, 0, 3, 2, 1]),
    `GetStats counts (total..cancelled) are ${counts}`,
  );

  step("stop the worker while a job runs: it hands the job back (PENDING, the claim not counted)");
  const last = await call(jobs, "CreateJob", {
    agent_identifier: agentId,
    job_data: toStruct({ kind: "wait-for-stop" }),
    max_attempts: 2,
  });
  names.set(last.id, "hand-back");
  await waitStarted("wait-for-stop", "the job to hand back");
  check(await worker.stop(15000), "the worker's loops did not end within 15 s");
  check(worker.error === null, `the worker stopped: ${worker.error}`);
  const back = await call(jobs, "GetJob", { id: last.id });
  check(
    back.status === "JOB_STATUS_PENDING" && back.attempt === 0,
    `hand-back is ${back.status} at attempt ${back.attempt}, expected PENDING at 0`,
  );
  check(back.lease_expire_time === null, "hand-back: a job handed back holds no lease");
  check(
    events.some((e) => isDeepStrictEqual(e, ["hand-back", 0, "handed back"])),
    "the worker did not report the hand-back",
  );
  const gone = await call(jobs, "CancelJob", { id: last.id });
  check(gone.status === "JOB_STATUS_CANCELLED", `hand-back: cancel gave ${gone.status}`);

  jobs.close();
  workerClient.close();
  console.log("OK: every answer was as expected");
}

run(main);
