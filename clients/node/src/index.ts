/**
 * titan-broker for Node.js: call services that Python workers serve over Redis (PROTOCOL.md).
 *
 *   import { connect } from "titan-broker";
 *   const client = await connect(process.env.TITAN_REDIS_URL);
 *   const calc = client.service<Calculator>("calculator");
 *   await calc.add(5, 3);
 *   await client.close();
 */
export { Client, connect, kw, rendezvous, DEFAULT_TIMEOUT, STREAM_WINDOW } from "./client.js";
export type { CallOptions, ConnectOptions, Invocation, Kw, ServiceProxy, SubmitOptions } from "./client.js";
export { Job } from "./jobs.js";
export type { JobState, JobStatus } from "./jobs.js";
export { pack, unpack } from "./codec.js";
export { redact } from "./topology.js";
export {
  AccessDenied,
  BacklogFull,
  BadArguments,
  BadRequest,
  BadResult,
  CallError,
  CallLost,
  CallTimeout,
  ConfigError,
  DeadLettered,
  DeadlineExceeded,
  EncodeError,
  InternalError,
  JobCancelled,
  JobNotFound,
  MethodNotFound,
  NoLiveWorkers,
  PayloadTooLarge,
  RateLimited,
  RedisOutOfMemory,
  RedisUnavailable,
  RemoteError,
  TitanError,
} from "./errors.js";
