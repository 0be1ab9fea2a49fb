/**
 * Background jobs (PROTOCOL.md, Jobs): a request with a token instead of a reply stream, whose
 * worker writes the outcome into the job's hash `<ns>:{<svc>}:job:<token>`, kept `result_ttl`
 * after it ended. Its id `<service>:<token>` is all another process needs to read it.
 */
import { accessDenied, isDenied, type Acting } from "./denied.js";
import { CallTimeout, ConfigError, JobCancelled, JobNotFound, RedisUnavailable, RemoteError, remoteError, TitanError } from "./errors.js";
import { decodeReply } from "./link.js";
import type { Scripts } from "./scripts.js";
import type { AnyRedis } from "./topology.js";

export type JobState = "queued" | "running" | "retrying" | "done" | "failed" | "dead" | "cancelled";
const STATES: readonly string[] = ["queued", "running", "retrying", "done", "failed", "dead", "cancelled"];

export interface JobStatus {
  id: string;
  method: string;
  state: JobState;
  attempts: number;
  submitted: Date | null;
  /** When it may start (its delay, or its next attempt's backoff). */
  due: Date | null;
  /** When its request reached the service's stream. */
  queued: Date | null;
  started: Date | null;
  finished: Date | null;
  worker: string | null;
  /** The error of a failed or dead job, or of the last run of a retrying one. */
  error: RemoteError | null;
}

const TOKEN = /^[A-Za-z0-9_.:-]{1,128}$/;
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$/;
const POLL_FIRST_MS = 10;
const POLL_AT_MOST_MS = 250;
/** Each read of a job's hash gives up after this long (a stopped Redis). */
const READ_TIMEOUT_MS = 10_000;

function when(raw: string | undefined): Date | null {
  if (!raw || !/^\d{1,15}$/.test(raw)) return null;
  return new Date(Number(raw));
}

export class Job<T = unknown> {
  readonly service: string;
  readonly token: string;
  readonly key: string;

  constructor(
    private readonly redis: AnyRedis,
    private readonly scripts: Scripts,
    private readonly namespace: string,
    readonly id: string,
    private readonly acting: Acting = { role: "caller" },
  ) {
    const at = id.indexOf(":");
    const service = at > 0 ? id.slice(0, at) : "";
    const token = at > 0 ? id.slice(at + 1) : "";
    if (!NAME.test(service) || !TOKEN.test(token)) {
      throw new ConfigError(`${JSON.stringify(id.slice(0, 80))} is not a job id (<service>:<token>, as submit returned it)`);
    }
    this.service = service;
    this.token = token;
    this.key = `${namespace}:{${service}}:job:${token}`;
  }

  /** Where the job stands now; raises JobNotFound (never submitted, or expired). */
  async status(): Promise<JobStatus> {
    const fields = await this.read("HGETALL", this.key, () => this.redis.hgetallBuffer(this.key));
    if (Object.keys(fields).length === 0) throw this.notFound();
    const text = (name: string): string | undefined => fields[name]?.toString();
    let error: RemoteError | null = null;
    const result = fields["result"];
    if (result && result.length > 0) {
      const reply = decodeReply(result);
      if (reply !== null && !reply.ok) error = remoteError(reply.error);
    }
    const state = text("status") ?? "queued";
    const attempts = text("attempts") ?? "0";
    return {
      id: this.id,
      method: text("method") ?? "",
      state: (STATES.includes(state) ? state : "queued") as JobState,
      attempts: /^\d+$/.test(attempts) ? Number(attempts) : 0,
      submitted: when(text("submitted")),
      due: when(text("due")),
      queued: when(text("queued")),
      started: when(text("started")),
      finished: when(text("finished")),
      worker: text("worker") ?? null,
      error,
    };
  }

  /**
   * Wait for the job to end (at most `timeout` seconds; none: as long as it takes) and return its
   * result or raise its error (RemoteError, DeadLettered, JobCancelled). Raises CallTimeout when it
   * did not end in time (it goes on), JobNotFound when there is no such job (any more).
   */
  async result(options: { timeout?: number } = {}): Promise<T> {
    const until = options.timeout === undefined ? Infinity : performance.now() + options.timeout * 1000;
    let delay = POLL_FIRST_MS;
    for (;;) {
      const ended = await this.ended(); // once whatever the timeout: timeout 0 reads a job that ended
      if (ended !== null) return this.outcome(ended);
      const left = until - performance.now();
      if (left <= 0) {
        throw new CallTimeout(`job ${this.id} did not end within ${options.timeout} s; it goes on (see job.status())`);
      }
      await new Promise((r) => setTimeout(r, Math.min(delay, left)));
      delay = Math.min(POLL_AT_MOST_MS, delay * 1.5);
    }
  }

  /** Cancel the job if it has not started; true when it was. A job that runs, or has ended, is
   * left as it is (false). Raises JobNotFound. */
  async cancel(): Promise<boolean> {
    const cancel = async (): Promise<unknown> =>
      this.scripts.cancel(3, this.key, await jobStream(this.redis, this.key, `${this.namespace}:{${this.service}}:calls`), `${this.namespace}:{${this.service}}:delayed`, "workers");
    const outcome = await this.read("EVALSHA cancel", this.key, cancel, "cancel");
    const text = String(outcome);
    if (text === "unknown") throw this.notFound();
    return text === "cancelled";
  }

  private async ended(): Promise<Buffer | null> {
    const [state, result] = await this.read("HMGET", this.key, () => this.redis.hmgetBuffer(this.key, "status", "result"));
    if (state === null || state === undefined) throw this.notFound();
    const s = state.toString();
    if (s === "cancelled") throw new JobCancelled(`job ${this.id} was cancelled before it started`);
    if (s === "done" || s === "failed" || s === "dead") return result ?? Buffer.alloc(0);
    return null;
  }

  private outcome(raw: Buffer): T {
    const reply = decodeReply(raw);
    if (reply === null) throw new JobNotFound(`job ${this.id} ended but its result cannot be read`);
    if (!reply.ok) throw remoteError(reply.error);
    return reply.value as T;
  }

  /** Run `fn` (`command` on `key`), bounded; a Redis failure becomes RedisUnavailable, a refusal AccessDenied. */
  private async read<R>(command: string, key: string, fn: () => Promise<R>, doing = "read"): Promise<R> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new RedisUnavailable(`cannot read job ${this.id}: Redis did not answer within ${READ_TIMEOUT_MS / 1000} s`)), READ_TIMEOUT_MS);
    });
    try {
      return await Promise.race([fn(), late]);
    } catch (exc) {
      if (exc instanceof TitanError) throw exc;
      if (isDenied(exc)) throw accessDenied(exc, `${doing} job ${this.id}`, command, key, this.acting);
      throw new RedisUnavailable(`cannot read job ${this.id}: ${(exc as Error).message}`, { cause: exc });
    } finally {
      clearTimeout(timer);
    }
  }

  private notFound(): JobNotFound {
    return new JobNotFound(`job ${this.id} is unknown: it was never submitted, or it ended longer ago than its result_ttl (its outcome expired)`);
  }

  toString(): string {
    return `<Job ${this.id}>`;
  }
}

/** The request stream a job waits on: the shared one, or (its hash's `stream`) the stream of the
 * registered caller user who submitted it, never a key outside the service's request streams. */
export async function jobStream(redis: AnyRedis, job: string, shared: string): Promise<string> {
  const found = await redis.hget(job, "stream");
  return found !== null && found.startsWith(`${shared}@`) ? found : shared;
}
