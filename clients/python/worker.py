#!/usr/bin/env python3
"""A jobsvc worker in Python: claims an agent's jobs under a lease, runs a handler per job,
heartbeats while it runs, and completes, fails (retried by the server), or hands the job back.

    scripts/setup-clients   # a venv with requirements.txt in target/clients-venv
    export JOBSVC_ADDR=127.0.0.1:50051 JOBSVC_TOKEN=<service_role JWT>
    target/clients-venv/bin/python clients/python/worker.py

`Worker` below is the part a service would copy; `main` runs it on six jobs and checks every
outcome: a job that fails once and is retried, one that fails for good, one that outlasts its
lease thanks to heartbeats, one cancelled while it runs, one failed by an operator under the
worker (its lease is lost), and one handed back when the worker stops. JOBSVC_TOKEN is what
`jobsvc token --role service_role` prints (or the `export TOKEN=...` line the server prints at
start). Every answer is checked: any surprise ends the program with exit status 1 and a message
naming the step. Each call and each wait has a timeout.

The plumbing it shares with example.py (the stub and its bearer token, ErrorInfo, Duration,
Struct / Value) is in jobsvc_client.py: `Worker` needs it too.
"""

import os
import sys
import threading
import time
import uuid

import grpc
from google.protobuf import duration_pb2

from jobs.v1 import jobs_pb2
# CALL_TIMEOUT: seconds, every unary call (a waiting ClaimJobs gets its `wait` on top).
from jobsvc_client import CALL_TIMEOUT, S, as_json, connect, duration, error_info, value
from checks import Failure, check, run, step


# --- plumbing a service would keep (with jobsvc_client.py) --------------------------------


def lease_lost(err):
    """Whether a failed call says the lease is no longer the job's."""
    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    info = error_info(err)
    return info is not None and info.reason == "LEASE_LOST"


# Worth another try later: the server or the network is briefly unable to answer.
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


# --- the worker a service would copy -------------------------------------------------------


def print_event(job, what):
    """The worker's default account of what it does: one line per claim and per outcome."""
    print(f"    job {job.id} attempt {job.attempt}: {what}", flush=True)


class PermanentError(Exception):
    """Raised by a handler: the job cannot succeed however often it is tried (bad input, ...).
    The job is FAILED for good (`no_retry`), whatever attempts it has left."""


class Stopped(Exception):
    """Raised by a handler (through `JobContext.check`) when it was told to stop working."""


class JobContext:
    """What a handler gets besides the job: a stop flag (the job was cancelled, its lease lost,
    or the worker is shutting down) and a way to report progress with the next heartbeat."""

    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"
    SHUTDOWN = "worker shutting down"

    def __init__(self, job, lease_id):
        self.job = job
        self.lease_id = lease_id
        self.stop_reason = None  # one of the three above, set once, by whoever sees it first
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = None  # the last progress reported and not yet sent

    def progress(self, data):
        """Reports progress (any JSON): stored with the job by the next heartbeat."""
        with self._lock:
            self._progress = data

    def wait(self, seconds):
        """Sleeps up to `seconds`; True (at once) when the handler should stop."""
        return self._stop.wait(seconds)

    def check(self):
        """Raises Stopped when the handler should stop; call it between steps of the work."""
        if self._stop.is_set():
            raise Stopped(self.stop_reason)

    def request_stop(self, why):
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = why
        self._stop.set()

    def take_progress(self):
        with self._lock:
            progress, self._progress = self._progress, None
            return progress

    def give_back_progress(self, progress):
        """A heartbeat did not get through: send its progress with the next one (unless newer)."""
        with self._lock:
            if self._progress is None:
                self._progress = progress


class Worker:
    """Claims jobs of one agent and runs `handler(job, ctx)` for each, on `threads` threads.

    The handler returns the job's result (any JSON, stored by COMPLETED) or raises: an exception
    FAILS the job, which the server retries with backoff while it has attempts left;
    PermanentError (or another class in `no_retry`) fails it for good. While the handler runs, a
    heartbeat every third of the lease keeps the lease; when a heartbeat says the job was
    cancelled, or that the lease is lost (it expired and the job was retried elsewhere, or
    someone else ended it), the context's stop flag is set, and the worker never tries to finish
    that job: a handler should check `ctx.check()` / `ctx.wait()` and give up. On `stop()`,
    running handlers are told to stop too; one that raises Stopped hands its job back (PENDING,
    the claim not counted), so another worker takes it at once.
    """

    def __init__(
        self,
        stub,
        agent_identifier,
        handler,
        *,
        worker_id,
        threads=1,
        lease_seconds=30.0,
        wait_seconds=20.0,
        no_retry=(PermanentError,),
        on_event=None,
    ):
        self.stub = stub
        self.agent_identifier = agent_identifier
        self.handler = handler
        self.worker_id = worker_id
        self.threads = threads
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds  # a claim that finds nothing waits this long (<= 60 s)
        self.no_retry = no_retry
        self.on_event = on_event or print_event  # called with (job, what happened)
        self.error = None  # the error that stopped the worker, if any
        self._stopping = threading.Event()
        self._running = set()  # the JobContexts of the handlers running now
        self._lock = threading.Lock()
        self._threads = []

    # Starting and stopping.

    def start(self):
        for n in range(self.threads):
            thread = threading.Thread(target=self._loop, name=f"worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout=None):
        """Stops claiming, tells running handlers to stop, and waits for the threads (a waiting
        claim ends within `wait_seconds`). True when every thread has ended."""
        self._stopping.set()
        with self._lock:
            for ctx in self._running:
                ctx.request_stop(JobContext.SHUTDOWN)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _fatal(self, err):
        """An error no retry can fix (a bad token, a bad request): the whole worker stops."""
        with self._lock:
            if self.error is None:
                self.error = err
        self._stopping.set()

    # The claim loop, one per thread.

    def _loop(self):
        backoff = 0.5
        while not self._stopping.is_set():
            request = jobs_pb2.ClaimJobsRequest(
                agent_identifier=self.agent_identifier,
                max_jobs=1,  # one job per thread at a time; claim more for short jobs
                lease_duration=duration(self.lease_seconds),
                wait=duration(self.wait_seconds),  # long-poll: no busy loop when idle
                worker_id=self.worker_id,
            )
            try:
                # The call's deadline outlasts the server-side wait. It is not cancelled on
                # stop(): a claim cut short may have taken jobs that nobody would then work on.
                claimed = self.stub.ClaimJobs(request, timeout=self.wait_seconds + CALL_TIMEOUT)
            except grpc.RpcError as err:
                if err.code() not in TRANSIENT:
                    self._fatal(err)
                    return
                self._stopping.wait(backoff)  # the server is busy or away: back off, try again
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            for item in claimed.jobs:
                try:
                    if self._stopping.is_set():  # claimed while stop() waited for this call
                        self.on_event(item.job, "claimed while stopping")
                        self._finish(item.job, item.lease_id, S.JOB_STATUS_PENDING)
                    else:
                        self._work(item.job, item.lease_id)
                except grpc.RpcError as err:
                    self._fatal(err)
                    return

    # One job.

    def _work(self, job, lease_id):
        ctx = JobContext(job, lease_id)
        with self._lock:
            self._running.add(ctx)
            if self._stopping.is_set():
                ctx.request_stop(JobContext.SHUTDOWN)
        self.on_event(job, f"claimed (attempt {job.attempt} of {job.max_attempts})")
        done = threading.Event()
        beats = threading.Thread(target=self._heartbeat, args=(ctx, done), daemon=True)
        beats.start()
        result, error = None, None
        try:
            result = value(self.handler(job, ctx))
        except Exception as exc:  # the handler's failure is the job's, never the worker's
            error = exc
        finally:
            done.set()
            beats.join()
            with self._lock:
                self._running.discard(ctx)

        if ctx.stop_reason in (JobContext.CANCELLED, JobContext.LEASE_LOST):
            # The job is no longer ours: finishing it would be refused (LEASE_LOST). Drop it.
            self.on_event(job, f"stopped: {ctx.stop_reason}")
        elif isinstance(error, Stopped):
            self._finish(job, lease_id, S.JOB_STATUS_PENDING)  # shutting down: hand it back
        elif error is None:
            self._finish(job, lease_id, S.JOB_STATUS_COMPLETED, result=result)
        else:
            self._finish(
                job,
                lease_id,
                S.JOB_STATUS_FAILED,
                error_message=f"{type(error).__name__}: {error}"[:4000],
                no_retry=isinstance(error, self.no_retry),
            )

    def _heartbeat(self, ctx, done):
        """Every third of the lease: extend it and send progress, until the handler is done or
        the job is no longer ours."""
        interval = self.lease_seconds / 3
        lease_ends = time.monotonic() + self.lease_seconds  # as the claim set it, about
        while not done.wait(interval):
            progress = ctx.take_progress()
            request = jobs_pb2.HeartbeatRequest(
                id=ctx.job.id, lease_id=ctx.lease_id, lease_duration=duration(self.lease_seconds)
            )
            if progress is not None:
                request.progress.CopyFrom(value(progress))
            sent = time.monotonic()
            try:
                answer = self.stub.Heartbeat(request, timeout=min(CALL_TIMEOUT, interval))
            except grpc.RpcError as err:
                if lease_lost(err):
                    ctx.request_stop(JobContext.LEASE_LOST)
                    return
                if err.code() in TRANSIENT and time.monotonic() < lease_ends:
                    if progress is not None:
                        ctx.give_back_progress(progress)
                    continue  # two more tries before the lease can have ended
                # The lease may have ended unseen (or the job is gone): assume another worker
                # has the job now.
                ctx.request_stop(JobContext.LEASE_LOST)
                return
            if answer.cancel_requested:
                ctx.request_stop(JobContext.CANCELLED)
                return
            lease_ends = sent + self.lease_seconds

    def _finish(self, job, lease_id, status, *, result=None, error_message="", no_retry=False):
        """Ends the lease with a move: COMPLETED, FAILED (retried while attempts are left, unless
        no_retry) or PENDING (handed back). A repeat of the lease's own move answers with the
        job unchanged, so a move whose answer was lost is simply sent again."""
        request = jobs_pb2.UpdateStatusRequest(
            id=job.id,
            status=status,
            lease_id=lease_id,
            error_message=error_message,
            no_retry=no_retry,
        )
        if result is not None:
            request.result.CopyFrom(result)
        for attempt in range(4):
            try:
                after = self.stub.UpdateStatus(request, timeout=CALL_TIMEOUT)
                break
            except grpc.RpcError as err:
                if lease_lost(err):
                    self.on_event(job, "lease lost before it could be ended: dropped")
                    return
                refused = err.code() == grpc.StatusCode.INVALID_ARGUMENT
                if refused and status == S.JOB_STATUS_COMPLETED:
                    # The result was refused (too large, ...): no retry will change that.
                    message = f"result refused: {err.details()}"[:4000]
                    self._finish(job, lease_id, S.JOB_STATUS_FAILED, error_message=message,
                                 no_retry=True)
                    return
                if err.code() not in TRANSIENT or attempt == 3:
                    raise
                time.sleep(0.5 * 2**attempt)
        if after.status == S.JOB_STATUS_COMPLETED:
            self.on_event(after, "completed")
        elif after.status == S.JOB_STATUS_FAILED:
            self.on_event(after, f"failed for good: {after.error_message}")
        elif status == S.JOB_STATUS_FAILED:  # back to PENDING: retried after a backoff
            self.on_event(after, f"failed, to be retried: {after.error_message}")
        else:
            self.on_event(after, "handed back")




# --- the scenario -------------------------------------------------------------------------

LEASE = 3.0  # seconds: heartbeats every second, and the "slow" job outlasts a lease


def handler_for(started):
    """The demo's handler: what it does depends on job_data["kind"]. `started[kind]` is set
    when a handler of that kind begins, so the scenario can act on a running job."""

    def handle(job, ctx):
        data = as_json(job.job_data)
        kind = data["kind"]
        started.setdefault(kind, threading.Event()).set()
        if kind == "quick":
            return {"echo": data["text"]}
        if kind == "flaky":  # fails its first attempt, then succeeds
            if job.attempt == 1:
                raise RuntimeError("upstream timed out")
            return {"attempt": job.attempt}
        if kind == "bad":
            raise PermanentError("no such document")
        if kind == "slow":  # 4.5 s, longer than the lease: only heartbeats keep it
            for n in range(1, 10):
                ctx.progress({"step": n, "of": 9})
                if ctx.wait(0.5):
                    ctx.check()
            return {"steps": 9}
        if kind == "wait-for-stop":  # runs until told to stop (cancel, lost lease, shutdown)
            ctx.progress({"waiting": True})
            ctx.wait(15)
            ctx.check()
            return {"stopped": False}  # never told: the scenario's checks will say so
        raise PermanentError(f"unknown kind {kind!r}")

    return handle


def main():
    addr = os.environ.get("JOBSVC_ADDR")
    token = os.environ.get("JOBSVC_TOKEN")
    if not addr or not token:
        sys.exit("set JOBSVC_ADDR (host:port) and JOBSVC_TOKEN (a service_role JWT)")

    # The service creating jobs (and the operator) and the worker hold separate channels.
    client_channel, jobs = connect(addr, token)
    worker_channel, worker_stub = connect(addr, token)
    run = uuid.uuid4().hex[:8]
    agent_id = f"worker-demo-{run}"  # one agent name per run: only this run's jobs are claimed
    worker_id = f"py-worker-{run}"

    step("CreateJob: six jobs, each with max_attempts 2 and an initial_backoff of 0.2 s")
    specs = {  # name (job_data "kind" unless given): (priority, more job_data)
        "slow": (10, {}),
        "cancel": (5, {"kind": "wait-for-stop"}),
        "lost": (4, {"kind": "wait-for-stop"}),
        "quick": (0, {"text": "hello"}),
        "flaky": (0, {}),
        "bad": (-1, {}),
    }
    ids = {}
    for name, (priority, data) in specs.items():
        request = jobs_pb2.CreateJobRequest(
            agent_identifier=agent_id,
            priority=priority,
            max_attempts=2,
            initial_backoff=duration(0.2),
            request_id=str(uuid.uuid4()),
        )
        request.job_data.update({"kind": name, **data})
        job = jobs.CreateJob(request, timeout=CALL_TIMEOUT)
        check(job.status == S.JOB_STATUS_PENDING, f"{name}: created {S.Name(job.status)}")
        check(
            (job.priority, job.max_attempts, job.attempt) == (priority, 2, 0),
            f"{name}: created with priority {job.priority}, max_attempts {job.max_attempts}, "
            f"attempt {job.attempt}",
        )
        ids[name] = job.id
        print(f"    {name}: {job.id} (priority {priority})")
    names = {job_id: name for name, job_id in ids.items()}

    step(f"start the worker: 2 threads, {LEASE:.0f} s leases (a heartbeat every {LEASE / 3:.0f} s)")
    started = {kind: threading.Event() for kind in ("slow", "wait-for-stop")}
    events = []  # (job name, attempt, what), in the order the worker reported them
    events_lock = threading.Lock()

    def on_event(job, what):
        name = names.get(job.id, job.id)
        with events_lock:
            events.append((name, job.attempt, what))
        print(f"    worker: {name} attempt {job.attempt}: {what}", flush=True)

    worker = Worker(
        worker_stub,
        agent_id,
        handler_for(started),
        worker_id=worker_id,
        threads=2,
        lease_seconds=LEASE,
        wait_seconds=5.0,
        on_event=on_event,
    )
    worker.start()

    def wait_started(kind, what):
        if not started[kind].wait(15):
            raise worker.error or Failure(f"no handler started {what} within 15 s")
        started[kind].clear()

    step("the two highest priorities are claimed first; CancelJob while its handler runs")
    wait_started("wait-for-stop", "the job to cancel")
    wait_started("slow", "the slow job")
    with events_lock:
        first = {name for name, _, what in events if what.startswith("claimed")}
    check(first == {"slow", "cancel"}, f"the first claims were {sorted(first)}")
    cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(id=ids["cancel"]), timeout=CALL_TIMEOUT)
    check(cancelled.status == S.JOB_STATUS_CANCELLED, f"cancel: {S.Name(cancelled.status)}")

    step("an operator fails a running job (no lease): the worker's heartbeat gets LEASE_LOST")
    wait_started("wait-for-stop", "the job to take away")
    failed = jobs.UpdateStatus(
        jobs_pb2.UpdateStatusRequest(
            id=ids["lost"], status=S.JOB_STATUS_FAILED, error_message="stopped by an operator"
        ),
        timeout=CALL_TIMEOUT,
    )
    check(failed.status == S.JOB_STATUS_FAILED, f"lost: {S.Name(failed.status)}")

    step("WaitJob: every job ends (the flaky one after its retry)")
    for name, job_id in ids.items():
        ended = jobs.WaitJob(
            jobs_pb2.WaitJobRequest(id=job_id, timeout=duration_pb2.Duration(seconds=20)),
            timeout=25,  # the call's deadline outlasts the server-side wait
        )
        check(worker.error is None, f"the worker stopped: {worker.error}")
        check(
            ended.status in (S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED, S.JOB_STATUS_CANCELLED),
            f"{name} is still {S.Name(ended.status)} after 20 s",
        )

    step("GetJob: status, attempts, result and error of every job")
    want = {  # name: (status, attempt, result, text the error_message holds)
        "slow": (S.JOB_STATUS_COMPLETED, 1, {"steps": 9}, None),
        "cancel": (S.JOB_STATUS_CANCELLED, 1, None, None),
        "lost": (S.JOB_STATUS_FAILED, 1, None, "stopped by an operator"),
        "quick": (S.JOB_STATUS_COMPLETED, 1, {"echo": "hello"}, None),
        "flaky": (S.JOB_STATUS_COMPLETED, 2, {"attempt": 2}, None),
        "bad": (S.JOB_STATUS_FAILED, 1, None, "PermanentError: no such document"),
    }
    final = {}
    for name, (status, attempt, result, error) in want.items():
        job = jobs.GetJob(jobs_pb2.GetJobRequest(id=ids[name]), timeout=CALL_TIMEOUT)
        final[name] = job
        got = as_json(job.result) if job.HasField("result") else None
        check(
            (job.status, job.attempt, job.max_attempts) == (status, attempt, 2),
            f"{name} is {S.Name(job.status)} at attempt {job.attempt} of {job.max_attempts}, "
            f"expected {S.Name(status)} at attempt {attempt} of 2",
        )
        check(got == result, f"{name}: result is {got}, expected {result}")
        if error is not None:
            check(error in job.error_message, f"{name}: error_message is {job.error_message!r}")
        check(job.worker_id == worker_id, f"{name}: worker_id is {job.worker_id!r}")
        check(not job.HasField("lease_expire_time"), f"{name}: a finished job holds no lease")
        check(job.HasField("completed_at"), f"{name}: a finished job has completed_at")
        print(f"    {name}: {S.Name(job.status)}, attempt {job.attempt} of {job.max_attempts}")
    progress = as_json(final["slow"].progress) if final["slow"].HasField("progress") else {}
    check(
        progress.get("of") == 9 and 1 <= progress.get("step", 0) <= 9,
        f"slow: the heartbeats stored progress {progress}",
    )
    check(final["flaky"].HasField("run_after"), "flaky: the retry set run_after")

    step("the worker's own account: what it did with each job")
    with events_lock:
        done = [
            (name, attempt, what.split(":")[0])
            for name, attempt, what in events
            if not what.startswith("claimed")
        ]
    want_done = {
        ("slow", 1, "completed"),
        ("cancel", 1, "stopped"),  # cancel_requested: stopped, and never completed
        ("lost", 1, "stopped"),  # LEASE_LOST on a heartbeat
        ("quick", 1, "completed"),
        ("flaky", 1, "failed, to be retried"),
        ("flaky", 2, "completed"),
        ("bad", 1, "failed for good"),
    }
    check(sorted(done) == sorted(want_done), f"the worker reported {sorted(done)}")
    with events_lock:
        why = {name: what for name, _, what in events if what.startswith("stopped")}
    check(why.get("cancel") == "stopped: cancelled", f"cancel: the worker {why.get('cancel')}")
    check(why.get("lost") == "stopped: lease lost", f"lost: the worker {why.get('lost')}")

    step("ListJobEvents: the flaky job's history shows the retry")
    history = jobs.ListJobEvents(
        jobs_pb2.ListJobEventsRequest(job_id=ids["flaky"]), timeout=CALL_TIMEOUT
    )
    statuses = [S.Name(e.status).removeprefix("JOB_STATUS_") for e in history.events]
    check(
        statuses == ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETED"],
        f"flaky: history is {statuses}",
    )

    step("GetStats: 3 completed, 2 failed, 1 cancelled, nothing left")
    stats = jobs.GetStats(jobs_pb2.GetStatsRequest(agent_identifier=agent_id), timeout=CALL_TIMEOUT)
    counts = (
        stats.total,
        stats.pending,
        stats.running,
        stats.completed,
        stats.failed,
        stats.cancelled,
    )
    check(counts == (6, 0, 0, 3, 2, 1), f"GetStats counts (total..cancelled) are {counts}")

    step("stop the worker while a job runs: it hands the job back (PENDING, the claim not counted)")
    request = jobs_pb2.CreateJobRequest(agent_identifier=agent_id, max_attempts=2)
    request.job_data.update({"kind": "wait-for-stop"})
    last = jobs.CreateJob(request, timeout=CALL_TIMEOUT)
    names[last.id] = "hand-back"
    wait_started("wait-for-stop", "the job to hand back")
    check(worker.stop(timeout=15), "the worker's threads did not end within 15 s")
    check(worker.error is None, f"the worker stopped: {worker.error}")
    back = jobs.GetJob(jobs_pb2.GetJobRequest(id=last.id), timeout=CALL_TIMEOUT)
    check(
        (back.status, back.attempt) == (S.JOB_STATUS_PENDING, 0),
        f"hand-back is {S.Name(back.status)} at attempt {back.attempt}, expected PENDING at 0",
    )
    check(not back.HasField("lease_expire_time"), "hand-back: a job handed back holds no lease")
    with events_lock:
        check(("hand-back", 0, "handed back") in events, "the worker did not report the hand-back")
    gone = jobs.CancelJob(jobs_pb2.CancelJobRequest(id=last.id), timeout=CALL_TIMEOUT)
    check(gone.status == S.JOB_STATUS_CANCELLED, f"hand-back: cancel gave {S.Name(gone.status)}")

    client_channel.close()
    worker_channel.close()
    print("OK: every answer was as expected")


if __name__ == "__main__":
    run(main)
