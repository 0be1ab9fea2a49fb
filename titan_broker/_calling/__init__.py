"""Internal: the calling side. The ``Client`` and its typed proxies (``client``, ``proxy``), requests out
(``sending``), replies back (``replies``), one ``Link`` of both per service called (``links``), streams
(``streaming``), affinity routes (``routing``), the circuit breaker (``breaker``) and jobs (``jobs``)."""

from .client import Client as Client
from .jobs import Job as Job
from .jobs import JobState as JobState
from .jobs import JobStatus as JobStatus
from .jobs import cancel as cancel
from .jobs import list_jobs as list_jobs
from .jobs import split_id as split_id
from .jobs import status_of as status_of

__all__ = (
    "Client",
    "Job",
    "JobState",
    "JobStatus",
    "cancel",
    "list_jobs",
    "split_id",
    "status_of",
)
