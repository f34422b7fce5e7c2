"""One AWS API call, the way every AWS adapter makes it: bounded retries with back-off, runbook errors.

AWS throttles (``ThrottlingException``, ``RequestLimitExceeded``, ...) and sometimes fails
transiently (5xx, a dropped connection); the APIs are eventually consistent (a snapshot or a
command invocation is not found right after it was created). :func:`aws_call` retries what
``retry_on`` accepts with exponential back-off (tenacity, with the adapter's injectable sleep),
a bounded number of times, and turns what is left into the runbook's error (``error``) naming the
call and the AWS error code - never a secret (messages are redacted). Codes in ``absent`` are
answered with ``None`` (the caller decides how long "not there yet" may last).

The clients are made with botocore's own retries off (:func:`client`), so this is the one retry
policy, and a call that may have reached the service is never repeated behind the caller's back
(SendCommand retries only on errors that prove it was refused: :func:`refused`).

>>> from botocore.exceptions import ClientError
>>> def throttled(**kw):
...     raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "GetCommandInvocation")
>>> aws_call(throttled, what="SSM GetCommandInvocation", attempts=3, sleep=lambda s: None)
Traceback (most recent call last):
...
runbook.errors.RunbookError: SSM GetCommandInvocation: ThrottlingException: Rate exceeded (gave up after 3 attempts)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Collection

from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                 HTTPClientError)
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import ConfigError, RunbookError
from ..redact import redact

log = logging.getLogger(__name__)

THROTTLED = frozenset({"ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded",
                       "TooManyRequestsException", "RequestThrottled", "RequestThrottledException", "SlowDown",
                       "RequestLimitExceededException"})
TRANSIENT = frozenset({"InternalServerError", "InternalFailure", "InternalError", "ServiceUnavailable",
                       "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException"})


def error_code(exc: BaseException) -> str | None:
    return exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None


def refused(exc: BaseException) -> bool:
    """The service refused the request (throttled) or it never left here: safe to send again."""
    return error_code(exc) in THROTTLED or isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))


def transient(exc: BaseException) -> bool:
    """Worth another try for a call that changes nothing (a read): refused, a 5xx, a broken connection."""
    if refused(exc) or error_code(exc) in TRANSIENT:
        return True
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(exc, HTTPClientError)


def aws_call(fn: Callable[..., Any], /, *, what: str, retry_on: Callable[[BaseException], bool] = transient,
             absent: Collection[str] = (), attempts: int = 8, first_wait: float = 0.5, max_wait: float = 10.0,
             sleep: Callable[[float], None] = time.sleep, error: type[RunbookError] = RunbookError,
             **kwargs: Any) -> Any:
    """``fn(**kwargs)``, retried while ``retry_on(exc)`` for at most ``attempts`` attempts."""

    def retryable(exc: BaseException) -> bool:
        return error_code(exc) not in absent and retry_on(exc)

    tries = 0
    try:
        for attempt in Retrying(retry=retry_if_exception(retryable), stop=stop_after_attempt(attempts),
                                wait=wait_exponential(multiplier=first_wait, max=max_wait), sleep=sleep,
                                reraise=True, before_sleep=lambda state: log.info(
                                    "%s: %s; again in %.1fs", what, redact(state.outcome.exception()),
                                    state.next_action.sleep)):
            with attempt:
                tries += 1
                return fn(**kwargs)
    except ClientError as exc:
        code = error_code(exc)
        if code in absent:
            return None
        message = exc.response.get("Error", {}).get("Message") or ""
        gave_up = f" (gave up after {tries} attempts)" if retryable(exc) else ""
        raise error(f"{what}: {code}: {redact(message)}{gave_up}", aws_error=code) from None
    except BotoCoreError as exc:
        gave_up = f" (gave up after {tries} attempts)" if retryable(exc) else ""
        raise error(f"{what}: {redact(exc)}{gave_up}") from None


_CLIENTS = threading.Lock()


def client(service: str, region: str | None):
    """A boto3 client with botocore's retries off (the caller retries, see :func:`aws_call`).
    The endpoint comes from the usual places (``AWS_ENDPOINT_URL_<SERVICE>``: how a rehearsal points
    the adapters at the local stand-ins)."""
    import boto3
    from botocore.config import Config

    try:
        with _CLIENTS:   # boto3's default session is not thread-safe while it makes a client (use is)
            return boto3.client(service, region_name=region,
                                config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    except BotoCoreError as exc:        # e.g. NoRegionError: the outputs name no region and neither does AWS config
        raise ConfigError(f"cannot make an AWS {service} client: {redact(exc)}") from None
