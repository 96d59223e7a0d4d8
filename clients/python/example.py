#!/usr/bin/env python3
"""A jobsvc client in Python: the whole life of a job, from the creator's and the agent's side.

    scripts/setup-clients   # a venv with requirements.txt in target/clients-venv
    export JOBSVC_ADDR=127.0.0.1:50051 JOBSVC_TOKEN=<service_role JWT>
    target/clients-venv/bin/python clients/python/example.py

JOBSVC_TOKEN is what `jobsvc token --role service_role` prints (or the `export TOKEN=...` line
the server prints at start). Every answer is checked: any surprise ends the program with exit
status 1 and a message naming the step. Each call and each wait has a timeout.

The plumbing it shares with worker.py (the stub and its bearer token, ErrorInfo, Struct / Value)
is in jobsvc_client.py; UpdateStream below reads a stream.
"""

import os
import queue
import sys
import threading
import uuid

import grpc
from google.protobuf import duration_pb2

from jobs.v1 import jobs_pb2
from jobsvc_client import CALL_TIMEOUT, S, as_json, connect, error_info, value
from checks import Failure, check, run, step

STREAM_WAIT = 10.0  # seconds, the longest wait for one stream message


# --- plumbing a service would keep (with jobsvc_client.py) --------------------------------


class UpdateStream:
    """StreamJobUpdates read on a thread, so the caller can wait for each message with a
    timeout. Remembers the last non-empty resume_token, the point to resume from."""

    def __init__(self, stub, request):
        self._call = stub.StreamJobUpdates(request)  # no deadline: a stream stays open
        self._messages = queue.Queue()
        self._closed = False
        self.resume_token = request.resume_token
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for update in self._call:
                self._messages.put(update)
        except grpc.RpcError as err:
            if not self._closed:
                self._messages.put(err)

    def next(self, timeout=STREAM_WAIT):
        try:
            item = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise Failure(f"no stream message within {timeout:.0f} s") from None
        if isinstance(item, grpc.RpcError):
            raise item
        if item.resume_token:
            self.resume_token = item.resume_token
        return item

    def next_job(self, timeout=STREAM_WAIT):
        """The next job change, skipping heartbeats (and `synced`, which a resumed stream
        may send at any point)."""
        while True:
            update = self.next(timeout)
            if update.WhichOneof("event") == "job":
                return update.job

    def close(self):
        """Drops the stream, as a disconnect would."""
        self._closed = True
        self._call.cancel()


# --- checks -------------------------------------------------------------------------------




def expect_job(job, *, id, status, version):
    check(job.id == id, f"job id is {job.id!r}, expected {id!r}")
    check(
        job.status == status and job.version == version,
        f"job {id} is {S.Name(job.status)} v{job.version}, expected {S.Name(status)} v{version}",
    )


def counts(stats):
    """(total, pending, running, completed, failed, cancelled) of a JobStats."""
    return (
        stats.total,
        stats.pending,
        stats.running,
        stats.completed,
        stats.failed,
        stats.cancelled,
    )




# --- the scenario -------------------------------------------------------------------------


def main():
    addr = os.environ.get("JOBSVC_ADDR")
    token = os.environ.get("JOBSVC_TOKEN")
    if not addr or not token:
        sys.exit("set JOBSVC_ADDR (host:port) and JOBSVC_TOKEN (a service_role JWT)")

    # The service creating jobs and the agent doing them hold separate channels.
    client_channel, jobs = connect(addr, token)
    agent_channel, agent = connect(addr, token)
    run = uuid.uuid4().hex[:8]
    agent_id = f"summarizer-{run}"  # one agent name per run, so the counts below are exact

    step("CreateJob with a request_id, then the same call again (a retry)")
    create = jobs_pb2.CreateJobRequest(agent_identifier=agent_id, request_id=str(uuid.uuid4()))
    create.job_data.update({"url": "https://example.com", "words": 100})
    job = jobs.CreateJob(create, timeout=CALL_TIMEOUT)
    check(str(uuid.UUID(job.id)) == job.id, f"job id {job.id!r} is not a canonical UUID")
    expect_job(job, id=job.id, status=S.JOB_STATUS_PENDING, version=1)
    check(as_json(job.job_data) == {"url": "https://example.com", "words": 100}, "job_data differs")
    retry = jobs.CreateJob(create, timeout=CALL_TIMEOUT)
    expect_job(retry, id=job.id, status=S.JOB_STATUS_PENDING, version=1)
    print(f"    job {job.id}; the retry returned the same job")

    step("StreamJobUpdates for the job (include_existing), until synced")
    stream = UpdateStream(
        jobs, jobs_pb2.StreamJobUpdatesRequest(job_ids=[job.id], include_existing=True)
    )
    existing = stream.next()
    check(existing.WhichOneof("event") == "job", f"expected the existing job first, got {existing}")
    expect_job(existing.job, id=job.id, status=S.JOB_STATUS_PENDING, version=1)
    synced = stream.next()
    check(synced.WhichOneof("event") == "synced", f"expected synced, got {synced}")

    step("the agent moves the job to RUNNING, then COMPLETED (optimistic concurrency)")
    running = agent.UpdateStatus(
        jobs_pb2.UpdateStatusRequest(id=job.id, status=S.JOB_STATUS_RUNNING, expected_version=1),
        timeout=CALL_TIMEOUT,
    )
    expect_job(running, id=job.id, status=S.JOB_STATUS_RUNNING, version=2)
    check(running.HasField("started_at"), "a RUNNING job has started_at")
    done = agent.UpdateStatus(
        jobs_pb2.UpdateStatusRequest(
            id=job.id,
            status=S.JOB_STATUS_COMPLETED,
            result=value({"summary": "done"}),
            expected_version=running.version,
        ),
        timeout=CALL_TIMEOUT,
    )
    expect_job(done, id=job.id, status=S.JOB_STATUS_COMPLETED, version=3)

    step("the stream delivers both changes, in version order")
    expect_job(stream.next_job(), id=job.id, status=S.JOB_STATUS_RUNNING, version=2)
    streamed = stream.next_job()
    expect_job(streamed, id=job.id, status=S.JOB_STATUS_COMPLETED, version=3)
    check(as_json(streamed.result) == {"summary": "done"}, "streamed result differs")
    stream.close()

    step("WaitJob returns the finished job")
    waited = jobs.WaitJob(
        jobs_pb2.WaitJobRequest(id=job.id, timeout=duration_pb2.Duration(seconds=10)),
        timeout=15,  # the call's deadline outlasts the server-side wait
    )
    expect_job(waited, id=job.id, status=S.JOB_STATUS_COMPLETED, version=3)
    check(as_json(waited.result) == {"summary": "done"}, f"result is {as_json(waited.result)}")
    check(waited.HasField("completed_at"), "a COMPLETED job has completed_at")

    step("ListJobs, GetStats and ListJobEvents for this agent's job")
    page = jobs.ListJobs(
        jobs_pb2.ListJobsRequest(agent_identifier=agent_id, statuses=[S.JOB_STATUS_COMPLETED]),
        timeout=CALL_TIMEOUT,
    )
    check([j.id for j in page.jobs] == [job.id], f"ListJobs gave {[j.id for j in page.jobs]}")
    check(page.next_page_token == "", "one job fits in one page")
    stats = jobs.GetStats(jobs_pb2.GetStatsRequest(agent_identifier=agent_id), timeout=CALL_TIMEOUT)
    check(counts(stats) == (1, 0, 0, 1, 0, 0), f"GetStats counts are {counts(stats)}")
    check(stats.avg_processing_seconds >= 0, "avg_processing_seconds is negative")
    check(not stats.HasField("oldest_pending_created_at"), "nothing of this agent is pending")
    history = jobs.ListJobEvents(jobs_pb2.ListJobEventsRequest(job_id=job.id), timeout=CALL_TIMEOUT)
    events = [(e.job_id, e.version, S.Name(e.status)) for e in history.events]
    want = [
        (job.id, 1, "JOB_STATUS_PENDING"),
        (job.id, 2, "JOB_STATUS_RUNNING"),
        (job.id, 3, "JOB_STATUS_COMPLETED"),
    ]
    check(events == want, f"ListJobEvents gave {events}")

    step("an invalid move: FAILED_PRECONDITION, reason INVALID_TRANSITION")
    try:
        agent.UpdateStatus(
            jobs_pb2.UpdateStatusRequest(id=job.id, status=S.JOB_STATUS_RUNNING),
            timeout=CALL_TIMEOUT,
        )
        raise Failure("moving a COMPLETED job back to RUNNING succeeded")
    except grpc.RpcError as err:
        info = error_info(err)
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION or not info:
            raise
        # Branch on the stable reason, never on the message text.
        check(info.domain == "jobsvc", f"ErrorInfo domain is {info.domain!r}")
        check(info.reason == "INVALID_TRANSITION", f"ErrorInfo reason is {info.reason!r}")
        check(
            dict(info.metadata) == {"current_status": "completed", "requested_status": "running"},
            f"ErrorInfo metadata is {dict(info.metadata)}",
        )
        print(f"    refused as expected: {err.details()}")

    step("resume: a second job streamed, the stream dropped, a change missed, then resumed")
    job2 = jobs.CreateJob(
        jobs_pb2.CreateJobRequest(agent_identifier=agent_id, request_id=str(uuid.uuid4())),
        timeout=CALL_TIMEOUT,
    )
    expect_job(job2, id=job2.id, status=S.JOB_STATUS_PENDING, version=1)
    watch = jobs_pb2.StreamJobUpdatesRequest(job_ids=[job2.id])
    stream = UpdateStream(jobs, watch)
    check(stream.next().WhichOneof("event") == "synced", "expected synced first")
    agent.UpdateStatus(
        jobs_pb2.UpdateStatusRequest(id=job2.id, status=S.JOB_STATUS_RUNNING),
        timeout=CALL_TIMEOUT,
    )
    expect_job(stream.next_job(), id=job2.id, status=S.JOB_STATUS_RUNNING, version=2)
    check(stream.resume_token != "", "a live change carries a resume_token")
    stream.close()  # disconnected: the next change happens while nobody listens
    agent.UpdateStatus(
        jobs_pb2.UpdateStatusRequest(
            id=job2.id, status=S.JOB_STATUS_FAILED, error_message="source unreachable"
        ),
        timeout=CALL_TIMEOUT,
    )
    watch.resume_token = stream.resume_token
    resumed = UpdateStream(jobs, watch)
    handled = {job2.id: 2}  # delivery is at least once: skip versions already handled
    missed = resumed.next_job()
    while missed.version <= handled.get(missed.id, 0):
        missed = resumed.next_job()
    expect_job(missed, id=job2.id, status=S.JOB_STATUS_FAILED, version=3)
    check(
        missed.error_message == "source unreachable", f"error_message is {missed.error_message!r}"
    )
    resumed.close()

    step("GetStats counts both jobs")
    stats = jobs.GetStats(jobs_pb2.GetStatsRequest(agent_identifier=agent_id), timeout=CALL_TIMEOUT)
    check(counts(stats) == (2, 0, 0, 1, 1, 0), f"GetStats counts are {counts(stats)}")

    client_channel.close()
    agent_channel.close()
    print("OK: every answer was as expected")


if __name__ == "__main__":
    run(main)
