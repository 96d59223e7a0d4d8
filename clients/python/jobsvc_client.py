"""The plumbing a service would keep to call jobsvc from Python, shared by example.py and
worker.py: a JobService stub on a channel that sends the bearer token on every call, the
google.rpc.ErrorInfo of a failed call, and google.protobuf.Duration / Struct / Value from and to
plain Python data. The stubs themselves are generated into jobs/v1/ by generate.sh.

    from jobs.v1 import jobs_pb2
    from jobsvc_client import CALL_TIMEOUT, connect, error_info
    channel, jobs = connect("127.0.0.1:50051", token)
    job = jobs.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=CALL_TIMEOUT)
"""

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobs.v1 import jobs_pb2, jobs_pb2_grpc

CALL_TIMEOUT = 5.0  # seconds, every unary call, unless the caller gives its own deadline
S = jobs_pb2.JobStatus  # S.JOB_STATUS_RUNNING, S.Name(value) -> "JOB_STATUS_RUNNING"


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <JWT>` to every call of the channel."""

    def __init__(self, token):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


def connect(addr, token):
    """A JobService stub on its own channel. Plaintext here; behind TLS use
    grpc.secure_channel(addr, grpc.ssl_channel_credentials()) with the same interceptor."""
    channel = grpc.intercept_channel(grpc.insecure_channel(addr), BearerAuth(token))
    return channel, jobs_pb2_grpc.JobServiceStub(channel)


def error_info(err):
    """The google.rpc.ErrorInfo of a failed call (from grpc-status-details-bin), or None."""
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def duration(seconds):
    """Seconds (a float) as a google.protobuf.Duration."""
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def as_json(message):
    """A Struct or Value as plain Python data."""
    return json_format.MessageToDict(message)


def value(data):
    """Plain Python data as a google.protobuf.Value."""
    return json_format.ParseDict(data, struct_pb2.Value())
