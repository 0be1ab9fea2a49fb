/**
 * Every error this client raises derives from TitanError; the names and the tree are those of the
 * Python client (titan_broker._errors). Errors a worker answers with cross the wire as
 * `{type, message, details}` and are raised as RemoteError, or the subclass of a `titan.*` type.
 */

export class TitanError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** An option, URL or argument given to the client is invalid. */
export class ConfigError extends TitanError {}

/** Redis cannot be reached, refused the credentials, or dropped the connection. */
export class RedisUnavailable extends TitanError {}

/** Redis refused a command for the ACL user's rules (NOPERM): the message names what was being done,
 * the command, the key when known, the ACL user, and the role whose rule should allow it
 * (`titan acl caller ...`). A refusal is not an outage: it is not retried. */
export class AccessDenied extends RedisUnavailable {}

/** Redis refused a write: it reached its maxmemory limit with the noeviction policy. */
export class RedisOutOfMemory extends RedisUnavailable {}

/** A call to a service did not produce a result. */
export class CallError extends TitanError {}

/** A call was not answered before its deadline (Redis stalled or unreachable included). */
export class CallTimeout extends CallError {}

/** A call timed out and the service has no live worker (or, with `waitForWorker: false`, none was
 * alive when it was about to be sent: it was not sent). */
export class NoLiveWorkers extends CallTimeout {}

/** The service's request stream holds its maximum backlog; the call was refused, not queued. */
export class BacklogFull extends CallError {}

/** Redis lost the call before it was answered (a restart without persistence, a failover that lost
 * the latest writes); the call may or may not have run. */
export class CallLost extends CallError {}

/** The job was cancelled before it started: it has no result. */
export class JobCancelled extends CallError {}

/** No such job: it was never submitted, or it ended longer ago than its resultTtl. */
export class JobNotFound extends TitanError {}

/** The worker answered with an error. `type` names the remote exception class (`ValueError`) or a
 * protocol error (`titan.BadArguments`); `message` is its message; `details` what came with it. */
export class RemoteError extends CallError {
  readonly type: string;
  readonly details: Record<string, unknown>;

  constructor(type: string, message: string, details?: Record<string, unknown> | null) {
    super(message);
    this.type = type;
    this.details = details ?? {};
    this.name = `${new.target.name} [${type}]`;
  }

  /** Names the failure in the worker's log, where its traceback is. */
  get errorId(): string | undefined {
    const id = this.details["error_id"];
    return typeof id === "string" ? id : undefined;
  }
}

export class MethodNotFound extends RemoteError {}
export class BadArguments extends RemoteError {}
export class BadRequest extends RemoteError {}
export class PayloadTooLarge extends RemoteError {}
export class DeadlineExceeded extends RemoteError {}
export class EncodeError extends RemoteError {}
export class BadResult extends RemoteError {}
export class DeadLettered extends RemoteError {}
export class InternalError extends RemoteError {}
export class RateLimited extends RemoteError {
  /** Seconds to wait before calling again. */
  get retryAfter(): number {
    const v = this.details["retry_after"];
    return typeof v === "number" ? v : 0;
  }
}

const WIRE_ERRORS: Record<string, new (type: string, message: string, details?: Record<string, unknown> | null) => RemoteError> = {
  "titan.MethodNotFound": MethodNotFound,
  "titan.BadArguments": BadArguments,
  "titan.BadRequest": BadRequest,
  "titan.PayloadTooLarge": PayloadTooLarge,
  "titan.DeadlineExceeded": DeadlineExceeded,
  "titan.EncodeError": EncodeError,
  "titan.BadResult": BadResult,
  "titan.DeadLettered": DeadLettered,
  "titan.RateLimited": RateLimited,
  "titan.InternalError": InternalError,
};

/** The error an error reply `{type, message, details}` stands for. */
export function remoteError(error: unknown): RemoteError {
  const e = (error !== null && typeof error === "object" ? error : {}) as Record<string, unknown>;
  const type = typeof e["type"] === "string" ? e["type"] : "titan.Unknown";
  const message = typeof e["message"] === "string" ? e["message"] : "";
  const details = e["details"] !== null && typeof e["details"] === "object" && !Array.isArray(e["details"])
    ? (e["details"] as Record<string, unknown>)
    : null;
  const Cls = WIRE_ERRORS[type] ?? RemoteError;
  return new Cls(type, message, details);
}
