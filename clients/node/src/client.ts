/**
 * The calling side, as PROTOCOL.md specifies it and the Python client (titan_broker/_calling/client.py)
 * implements it: a call is one stream entry added by submit.lua; its reply comes back on the
 * client's reply stream in the service's slot (link.ts). A sharded service's calls go to its
 * shards in turn, each shard with its own stream, reply stream and link (shards.ts).
 *
 * A call is bounded by its timeout from start to finish, whatever Redis does: connecting, routing,
 * sending and waiting all end at its deadline. A call given up (timeout, an error, a stream left
 * early) has its request deleted in the background if no worker took it, and a mark set so that
 * no later run of it is queued; a request that reaches Redis after its caller's deadline is
 * refused by the submit script, which checks the deadline in Redis's clock.
 */
import { randomBytes } from "node:crypto";

import { blake2b } from "./blake2b.js";
import { accessDenied, isDenied, type Acting } from "./denied.js";
import { pack, packRawMap } from "./codec.js";
import {
  BacklogFull,
  CallLost,
  CallTimeout,
  ConfigError,
  NoLiveWorkers,
  RedisOutOfMemory,
  RedisUnavailable,
  TitanError,
  remoteError,
  EncodeError,
  PayloadTooLarge,
} from "./errors.js";
import { Job, jobStream } from "./jobs.js";
import { Link, READ_BLOCK_MS, type Reply, type Sent } from "./link.js";
import { defineScripts, type Scripts } from "./scripts.js";
import { Shards, scopeService } from "./shards.js";
import { DEFAULT_URL, Topology, redact, urlUser, type AnyRedis } from "./topology.js";
import { within } from "./within.js";

export const VERSION = "3";
export const DEFAULT_TIMEOUT = 30;
export const DEFAULT_MAX_BACKLOG = 10_000;
export const DEFAULT_MAX_PAYLOAD = 1024 * 1024;
export const DEFAULT_RESULT_TTL = 86_400;
export const STREAM_WINDOW = 32;
const NO_DEADLINE_MS = 315_360_000_000;
const LONGEST = 315_360_000;
const DEADLINE_SLACK_MS = 10;
const FORGET_GRACE_MS = 5000;
const CONTROL_TTL_MS = 600_000;
const GONE_TTL_MS = 600_000;
const ROUTE_TTL_MS = 1000;
const PROBE_BUDGET_MS = 1000;
const CLOSE_BUDGET_MS = 1000;
const MAX_LINKS = 64;
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$/;

export interface ConnectOptions {
  /** Key prefix shared with the workers (default: $TITAN_NAMESPACE, else "titan"). */
  namespace?: string;
  /** Seconds a call may take unless it says otherwise (default 30). */
  timeout?: number;
  /** Backlog limit used when a service publishes none (default 10,000). */
  maxBacklog?: number;
  /** Largest arguments payload sent, in bytes (default 1 MiB, as the workers'). */
  maxPayload?: number;
  /** Where warnings go (default: console.warn). */
  log?: (message: string) => void;
  /**
   * The Redis ACL user this client is (default: `ACL WHOAMI` at connect, or the URL's user when the
   * rule refuses WHOAMI). The client id starts with
   * it and a dot, so the rules of `titan acl caller` keep each user's replies apart.
   */
  aclUser?: string;
}

export interface CallOptions {
  /** Seconds the call may take, from now: routing, sending, running and the reply. */
  timeout?: number;
  /** Affinity key: calls with the same key go to the same live worker (rendezvous hashing). */
  key?: string;
  /** false: fail at once with NoLiveWorkers when the service has no live worker (nothing is sent). */
  waitForWorker?: boolean;
}

export interface SubmitOptions {
  /** Seconds before the job may start. */
  delay?: number;
  /** Seconds the job may take from its start (default: none). */
  deadline?: number;
  /** Seconds its outcome is kept after it ended (default one day). */
  resultTtl?: number;
  /** Seconds the submit itself may take. */
  timeout?: number;
  /** Keyword arguments of the method. */
  kwargs?: Record<string, unknown>;
}

const KWARGS = Symbol.for("titan-broker.kwargs");

/** Keyword arguments for a proxy call: `db.get_all_users(kw({ limit: 10 }))`, always last. */
export type Kw<T extends Record<string, unknown>> = T & { readonly [KWARGS]: true };

export function kw<T extends Record<string, unknown>>(values: T): Kw<T> {
  return Object.defineProperty({ ...values }, KWARGS, { value: true, enumerable: false }) as Kw<T>;
}

function isKw(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && (value as Record<symbol, unknown>)[KWARGS] === true;
}

/** What a proxy's method returns: await it for a result, or iterate it for a streaming method. */
export interface Invocation<T> extends PromiseLike<T>, AsyncIterable<T extends AsyncIterable<infer I> ? I : T> {
  catch<R = never>(onrejected?: ((reason: unknown) => R | PromiseLike<R>) | null): Promise<T | R>;
  finally(onfinally?: (() => void) | null): Promise<T>;
}

/** A service's methods as the proxy offers them (any name; typed by `client.service<T>`). */
export type ServiceProxy<T = Record<string, (...args: unknown[]) => Invocation<unknown>>> = T;

interface ProxyInfo {
  service: string;
  options: CallOptions;
}

const proxies = new WeakMap<object, ProxyInfo>();

function checkName(value: string, what: string): string {
  if (typeof value !== "string" || !NAME.test(value)) {
    throw new ConfigError(`${what} ${JSON.stringify(value)} is not valid: use letters, digits, '_', '-' and '.', at most 128`);
  }
  return value;
}

function checkSeconds(what: string, value: number, atLeast = 0.001): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value < atLeast || value > LONGEST) {
    throw new ConfigError(`${what} must be a number of seconds from ${atLeast} to ${LONGEST} (ten years), got ${String(value)}`);
  }
  return value;
}

function entryMs(id: Buffer | string): number {
  const text = id.toString();
  return Number(text.slice(0, text.indexOf("-")));
}

function errorText(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc);
}

/** A TitanError for an ioredis failure while `doing` (`command` on `key`, by `who`): AccessDenied for
 * an ACL refusal (denied.ts), RedisOutOfMemory for a write refused at maxmemory, else RedisUnavailable. */
function titanError(exc: unknown, doing: string, who: Acting, command?: string, key?: string): Error {
  if (exc instanceof TitanError) return exc;
  if (isDenied(exc)) return accessDenied(exc, doing, command, key, who);
  const text = errorText(exc);
  if (text.startsWith("OOM")) {
    return new RedisOutOfMemory(`cannot ${doing}: Redis is out of memory, so it refuses new writes; free memory in Redis, raise maxmemory, or let workers drain the queues`, { cause: exc });
  }
  return new RedisUnavailable(`cannot ${doing}: ${text}`, { cause: exc });
}

/** Names the ACL rules can match as a prefix: no glob character and no dot (PROTOCOL.md, ACL rules). */
const ACL_USER_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/** `<user>.<random>`, or the random part alone for a user the rules cannot name. */
export function clientIdFor(user: string | undefined, random: string): string {
  return user !== undefined && ACL_USER_NAME.test(user) ? `${user}.${random}` : random;
}

export class Client {
  readonly namespace: string;
  readonly clientId: string;
  readonly defaultTimeout: number;
  readonly maxBacklog: number;
  readonly maxPayload: number;
  private nextId = 1;
  private readonly links = new Map<string, Link>();
  private readonly opening = new Map<string, Promise<Link>>();
  private readonly live = new Map<string, { at: number; count: number }>();
  private readonly routes = new Map<string, { until: number; workers: string[] }>();
  private readonly checking = new Set<string>();
  private readonly withdrawals = new Set<Promise<void>>();
  private readonly scripts: Scripts;
  private readonly shards: Shards;
  /** Who runs this client's commands, for AccessDenied: a caller, as its ACL user. */
  private readonly acting: Acting;
  private closed = false;
  private readonly log: (message: string) => void;

  /** Use `connect()`. */
  constructor(
    readonly topology: Topology,
    readonly redis: AnyRedis,
    options: ConnectOptions = {},
  ) {
    this.namespace = checkName(options.namespace ?? process.env["TITAN_NAMESPACE"] ?? "titan", "namespace");
    this.clientId = clientIdFor(options.aclUser, randomBytes(8).toString("hex"));
    this.defaultTimeout = checkSeconds("timeout", options.timeout ?? DEFAULT_TIMEOUT);
    this.maxBacklog = options.maxBacklog ?? DEFAULT_MAX_BACKLOG;
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.log = options.log ?? ((m: string) => console.warn(m));
    this.scripts = defineScripts(redis);
    const user = options.aclUser !== undefined && ACL_USER_NAME.test(options.aclUser) ? options.aclUser : undefined;
    this.shards = new Shards(redis, (service) => this.key(service, "config"), (service) => this.key(service, "users"), user);
    this.acting = { role: "caller", user: options.aclUser };
    redis.on("error", () => undefined); // ioredis reconnects by itself; calls report what it means to them
  }

  // --- keys (PROTOCOL.md, Keys) ------------------------------------------------------------------

  /** A key of a service, or of one of its shards (`scope`: `<service>#<k>`). */
  key(scope: string, rest: string): string {
    return `${this.namespace}:{${scope}}:${rest}`;
  }

  /** The scope of the shard a call goes to: the next one in turn for an ordinary call, the first
   * (the service's own) for a call with an affinity key, as the workers' own streams are there. */
  private scopeFor(service: string, key: string | undefined): string {
    checkName(service, "service");
    return key === undefined ? this.shards.nextScope(service) : service;
  }

  // --- proxies -------------------------------------------------------------------------------------

  /**
   * A proxy of `service`: `await proxy.method(...args)` calls it; `for await (const x of
   * proxy.method(...))` iterates a streaming method's items. Keyword arguments go last, in `kw()`.
   * `T` is the interface `titan codegen typescript` writes for the service.
   */
  service<T = ServiceProxy>(service: string, options: CallOptions = {}): T {
    checkName(service, "service");
    if (options.timeout !== undefined) checkSeconds("timeout", options.timeout);
    const target = {};
    const proxy = new Proxy(target, {
      get: (_t, prop) => {
        if (typeof prop !== "string" || prop === "then" || prop === "toJSON" || prop === "constructor") return undefined;
        return (...args: unknown[]) => this.invoke(service, prop, args, options);
      },
    });
    proxies.set(proxy, { service, options });
    return proxy as T;
  }

  private invoke(service: string, method: string, args: unknown[], options: CallOptions): Invocation<unknown> {
    let kwargs: Record<string, unknown> = {};
    if (args.length > 0 && isKw(args[args.length - 1])) {
      kwargs = { ...(args[args.length - 1] as Record<string, unknown>) };
      args = args.slice(0, -1);
    }
    let promise: Promise<unknown> | null = null;
    const started = (): Promise<unknown> => (promise ??= this.call(service, method, args, kwargs, options));
    return {
      then: (onfulfilled, onrejected) => started().then(onfulfilled, onrejected),
      catch: (onrejected) => started().catch(onrejected),
      finally: (onfinally) => started().finally(onfinally),
      [Symbol.asyncIterator]: () => this.stream(service, method, args, kwargs, options)[Symbol.asyncIterator](),
    } as Invocation<unknown>;
  }

  // --- calls ---------------------------------------------------------------------------------------

  /** A request of `service`'s shard `scope` (where its reply comes back), or of a job. */
  private request(service: string, scope: string, method: string, args: unknown[], kwargs: Record<string, unknown>, ttlMs: number, job?: string): { callId: string; fields: Array<[string, Buffer]> } {
    checkName(service, "service");
    const callId = `${this.clientId}-${this.nextId++}`;
    let payload: Uint8Array;
    try {
      payload = pack([args, kwargs]);
    } catch (exc) {
      const message = exc instanceof EncodeError ? exc.message : errorText(exc);
      throw new EncodeError("titan.EncodeError", `arguments of ${method}() ${message}`);
    }
    if (payload.length > this.maxPayload) {
      throw new PayloadTooLarge("titan.PayloadTooLarge", `arguments of ${method}() are ${payload.length} bytes, over the limit of ${this.maxPayload}`);
    }
    const fields: Array<[string, Buffer]> = [
      ["v", Buffer.from(VERSION)],
      ["id", Buffer.from(callId)],
      ["m", Buffer.from(method)],
      ["a", Buffer.from(payload.buffer, payload.byteOffset, payload.length)],
      ["ttl", Buffer.from(String(Math.max(0, Math.floor(ttlMs))))],
    ];
    if (job === undefined) fields.push(["r", Buffer.from(this.key(scope, `reply:${this.clientId}`))]);
    else fields.push(["j", Buffer.from(job)]);
    return { callId, fields };
  }

  /**
   * Call `service.method(...args, **kwargs)` and return its result. Raises RemoteError (or the
   * subclass of its titan.* type) when the worker answers with an error; CallTimeout
   * (NoLiveWorkers when no worker lives) when the deadline passes, also when Redis does not answer;
   * BacklogFull when the service refuses new calls; CallLost when Redis lost the request;
   * AccessDenied when Redis refuses a command for the ACL user's rules (never retried).
   */
  async call(service: string, method: string, args: unknown[] = [], kwargs: Record<string, unknown> = {}, options: CallOptions = {}): Promise<unknown> {
    const timeout = options.timeout === undefined ? this.defaultTimeout : checkSeconds("timeout", options.timeout);
    checkName(service, "service");
    await this.shards.ready(service, performance.now() + timeout * 1000);
    const scope = this.scopeFor(service, options.key);
    const { callId, fields } = this.request(service, scope, method, args, kwargs, timeout * 1000);
    const started = performance.now();
    const deadline = started + timeout * 1000;
    if (options.waitForWorker === false) await this.requireWorker(service, method, deadline);
    const link = this.liveLink(scope) ?? (await this.link(scope, deadline, method, timeout));
    link.lastUsed = started;
    let sent: Sent | null = null;
    let answered = false;
    let timer: NodeJS.Timeout | undefined;
    let probe: NodeJS.Timeout | undefined;
    const reply = new Promise<Reply>((resolve, reject) => {
      if (link.denied !== null) reject(link.denied); // its reader stopped while the link was opened
      link.calls.set(callId, { resolve, reject });
      timer = setTimeout(() => {
        link.calls.delete(callId);
        reject(this.timeoutError(service, method, timeout, started));
      }, Math.max(0, deadline - performance.now()));
    });
    reply.catch(() => undefined); // awaited below unless the send fails first
    try {
      probe = setTimeout(() => this.probe(service), Math.max(0, deadline - started - Math.min(250, (timeout * 1000) / 4)));
      const worker = options.key !== undefined ? await this.workerFor(service, method, options.key, deadline) : null;
      sent = await this.send(link, service, method, fields, worker, deadline, timeout);
      link.entries.set(callId, sent);
      const answer = await reply;
      answered = true;
      if (answer.seq !== null || answer.end !== null) {
        this.withdraw(link, sent, deadline, this.key(scope, `stream:${callId}`), callId);
        throw new TitanError(`${service}.${method}() streams its results: iterate it with 'for await' instead`);
      }
      if (answer.ok) return answer.value;
      throw remoteError(answer.error);
    } finally {
      clearTimeout(timer);
      clearTimeout(probe);
      link.calls.delete(callId);
      link.entries.delete(callId);
      if (sent !== null && !answered) this.withdraw(link, sent, deadline, null, callId);
    }
  }

  /**
   * The items a streaming (async generator) method yields, as they come. The worker runs at most
   * 32 items ahead; leaving the loop early stops it (and deletes the request if no worker took
   * it). `timeout` bounds the whole stream.
   */
  async *stream(service: string, method: string, args: unknown[] = [], kwargs: Record<string, unknown> = {}, options: CallOptions = {}): AsyncGenerator<unknown, void, undefined> {
    const timeout = options.timeout === undefined ? this.defaultTimeout : checkSeconds("timeout", options.timeout);
    checkName(service, "service");
    await this.shards.ready(service, performance.now() + timeout * 1000);
    const scope = this.scopeFor(service, options.key);
    const { callId, fields } = this.request(service, scope, method, args, kwargs, timeout * 1000);
    const started = performance.now();
    const deadline = started + timeout * 1000;
    if (options.waitForWorker === false) await this.requireWorker(service, method, deadline);
    const link = this.liveLink(scope) ?? (await this.link(scope, deadline, method, timeout));
    const control = this.key(scope, `stream:${callId}`);
    const queue: Array<Reply | Error> = [];
    let wake: (() => void) | null = null;
    link.streams.set(callId, {
      push: (item) => {
        queue.push(item);
        wake?.();
      },
    });
    if (link.denied !== null) queue.push(link.denied); // its reader stopped while the link was opened
    let sent: Sent | null = null;
    let finished = false;
    const probe = setTimeout(() => this.probe(service), Math.max(0, deadline - started - Math.min(250, (timeout * 1000) / 4)));
    try {
      const worker = options.key !== undefined ? await this.workerFor(service, method, options.key, deadline) : null;
      sent = await this.send(link, service, method, fields, worker, deadline, timeout);
      link.entries.set(callId, sent);
      let received = 0;
      for (;;) {
        if (queue.length === 0) {
          const left = deadline - performance.now();
          if (left > 0) {
            let t: NodeJS.Timeout | undefined;
            await new Promise<void>((resolve) => {
              wake = resolve;
              t = setTimeout(resolve, left);
            });
            wake = null;
            clearTimeout(t);
          }
          if (queue.length === 0) throw this.timeoutError(service, method, timeout, started);
        }
        const item = queue.shift()!;
        if (item instanceof Error) throw item;
        if (!item.ok) {
          finished = true;
          throw remoteError(item.error);
        }
        if (item.end !== null) {
          // The last items lost and the end not (a failover): never ended short silently.
          if (item.end > received) throw lostItems(service, method, received, item.end, "its end");
          finished = true;
          return;
        }
        if (item.seq === null) {
          finished = true;
          throw new TitanError(`${service}.${method}() does not stream: await it instead of iterating`);
        }
        if (item.seq > received) throw lostItems(service, method, received, item.seq, `item ${item.seq}`);
        // Items before `received` were replayed from the start by a worker that took the call over.
        for (const value of item.items.slice(Math.max(0, received - item.seq))) {
          received += 1;
          yield value;
          if (received % (STREAM_WINDOW / 2) === 0) await this.grant(service, control, `${control}:wake`, received + STREAM_WINDOW, deadline);
        }
      }
    } finally {
      clearTimeout(probe);
      link.streams.delete(callId);
      link.entries.delete(callId);
      if (sent !== null && !finished) this.withdraw(link, sent, deadline, control, callId);
    }
  }

  /** Raise a stream's credit, and push it onto the wake list a worker out of credit waits on. */
  private async grant(service: string, control: string, wake: string, credit: number, deadline: number): Promise<void> {
    const write = this.redis.multi().hset(control, "credit", credit).pexpire(control, CONTROL_TTL_MS)
      .del(wake).rpush(wake, credit).pexpire(wake, CONTROL_TTL_MS).exec();
    try {
      await within(write, deadline, () => new CallTimeout(`${service}: Redis did not take the stream's credit before the deadline`));
    } catch (exc) {
      throw titanError(exc, "grant a stream more items", this.acting, "HSET", control);
    }
  }

  // --- sending -------------------------------------------------------------------------------------

  /** Queue a request by `deadline` through submit.lua (or enqueue.lua for a job or a delay), on the
   * stream of the link's shard (the first, for a job or a worker's own stream). */
  private async send(link: Link, service: string, method: string, fields: Array<[string, Buffer]>, worker: string | null, deadline: number, timeout: number, later?: { delayMs: number; jobId: string | null; resultTtlMs: number }): Promise<Sent> {
    const doing = `send ${service}.${method}()`;
    const scope = link.scope;
    // A registered caller user's requests go to streams of its own (PROTOCOL.md, Registered callers).
    const user = this.shards.userFor(service);
    const mine = user === undefined ? "" : `@${user}`;
    const shared = this.key(scope, `calls${mine}`);
    const delayed = this.key(scope, "delayed");
    const flat: Buffer[] = [];
    for (const [name, value] of fields) flat.push(Buffer.from(name), value);
    let keys: string[] = worker !== null ? [this.key(service, `calls:${worker}${mine}`), shared] : [shared];
    let where = keys;
    let member: Buffer = Buffer.alloc(0);
    if (later !== undefined) {
      keys = [shared, delayed];
      // A registered user's delayed call carries the user: it comes due on the user's stream.
      const routed: Array<[string, Buffer]> = user === undefined ? fields : [...fields, ["@", Buffer.from(user)]];
      member = later.delayMs > 0 ? packRawMap(routed) : member;
      const token = later.jobId?.slice(service.length + 1);
      const jobKeys = token ? [this.key(service, `job:${token}`)] : [];
      if (token) keys.push(...jobKeys, this.key(service, "jobs"));
      where = [later.delayMs > 0 ? delayed : shared, ...jobKeys];
    }
    for (let attempt = 0; attempt < 3; attempt++) {
      const notAfter = Math.floor(deadline + link.offsetMs) + DEADLINE_SLACK_MS;
      const started = performance.now();
      const pending = later === undefined
        ? this.scripts.submit(keys.length, ...keys, this.key(scope, "config"), worker !== null ? this.key(service, `worker:${worker}`) : "", this.maxBacklog, notAfter, ...flat)
        : this.scripts.enqueue(keys.length, ...keys, this.key(scope, "config"), this.maxBacklog, notAfter, later.delayMs, member, later.jobId ?? "", later.resultTtlMs, method, ...flat);
      let id: Buffer;
      try {
        id = (await within(pending, deadline, () => new LateError())) as Buffer;
      } catch (exc) {
        if (exc instanceof LateError) {
          // The request may still reach Redis: once its id is known, it is deleted.
          pending.then((late) => {
            if (late !== null && late !== undefined && late.toString() !== "delayed") {
              this.withdraw(link, { keys: where, id: late as Buffer }, deadline, null, null);
            } else if (later?.jobId) {
              this.withdraw(link, { keys: where, id: member }, deadline, null, null);
            }
          }, () => undefined);
          const outcome = later?.jobId
            ? "if the job reached Redis after all, it is cancelled unless a worker had started it"
            : "the request was not queued";
          throw new CallTimeout(`${doing} got no answer within ${timeout} s: Redis did not answer in time (it is stopped, overloaded or unreachable); ${outcome}`);
        }
        const text = errorText(exc);
        if (text.startsWith("TITANBACKLOG")) {
          const limit = text.split(/\s+/).pop();
          throw new BacklogFull(`service '${service}' refused ${method}(): its backlog is full (${limit} calls waiting, max_backlog=${limit}); add workers or retry later`);
        }
        if (text.startsWith("TITANLATE")) {
          if (performance.now() >= deadline) throw this.timeoutError(service, method, timeout, deadline - timeout * 1000);
          await link.syncClock().catch(() => undefined); // Redis's clock jumped: measure it again
          continue;
        }
        throw titanError(exc, doing, this.acting, later === undefined ? "EVALSHA submit" : "EVALSHA enqueue", keys[0]);
      }
      const text = id.toString();
      if (text === "delayed") return { keys: where, id: member };
      link.offsetMs = entryMs(text) + 1 - started;
      return { keys: where, id };
    }
    throw new RedisUnavailable(`cannot ${doing}: Redis's clock disagrees with the call's deadline`);
  }

  /**
   * Delete a request nobody waits for, in the background, retrying while Redis is away (until
   * FORGET_GRACE past its deadline, when workers drop it unrun anyway). With `control`, the
   * streaming call's worker is told to stop; with `callId`, the gone mark stops later runs.
   */
  private withdraw(link: Link, sent: Sent, deadline: number, control: string | null, callId: string | null): void {
    const job = sent.keys.find((k) => kindOf(k) === "job");
    const attempt = async (): Promise<void> => {
      if (job !== undefined) {
        await this.scripts.cancel(3, job, await jobStream(this.redis, job, this.key(link.scope, "calls")), this.key(link.scope, "delayed"), "workers");
        return;
      }
      const tx = this.redis.multi();
      for (const key of sent.keys) {
        if (kindOf(key) === "delayed") tx.zrem(key, sent.id);
        else tx.xdel(key, sent.id.toString());
      }
      if (control !== null) tx.hset(control, "cancel", 1).pexpire(control, CONTROL_TTL_MS);
      if (callId !== null) tx.set(this.key(link.scope, `gone:${callId}`), 1, "PX", GONE_TTL_MS);
      await tx.exec();
    };
    const run = async (): Promise<void> => {
      let delay = 50;
      for (;;) {
        try {
          await within(attempt(), performance.now() + 2000, () => new LateError());
          return;
        } catch (exc) {
          if (isDenied(exc)) {
            // A refusal is not retried: the rules (`titan acl caller`) allow what a caller withdraws.
            this.log(`titan-broker: ${accessDenied(exc, `withdraw a request of '${link.service}'`, job !== undefined ? "EVALSHA cancel" : "MULTI", job ?? sent.keys[0], this.acting).message}`);
            return;
          }
          if (this.closed || performance.now() > deadline + FORGET_GRACE_MS) return;
          await new Promise((r) => setTimeout(r, delay));
          delay = Math.min(1000, delay * 2);
        }
      }
    };
    const task = run();
    this.withdrawals.add(task);
    void task.finally(() => this.withdrawals.delete(task));
  }

  // --- links ---------------------------------------------------------------------------------------

  /** The open link of the shard `scope` (a service, or `<service>#<k>`) that still takes calls, if any. */
  private liveLink(scope: string): Link | undefined {
    const found = this.links.get(scope);
    return found !== undefined && found.denied === null ? found : undefined;
  }

  /** The link of the shard `scope`, opened by `deadline` unless open; a link Redis refused its reader
   * is dropped, and a new one opened (which raises AccessDenied while the rules still refuse it). */
  private async link(scope: string, deadline: number, method: string, timeout: number): Promise<Link> {
    if (this.closed) throw new TitanError("client is closed");
    const found = this.links.get(scope);
    if (found !== undefined && found.denied === null) return found;
    if (found !== undefined) {
      this.links.delete(scope);
      void found.close();
    }
    let opening = this.opening.get(scope);
    if (opening === undefined) {
      opening = this.openLink(scope);
      this.opening.set(scope, opening);
      void opening.then(() => this.opening.delete(scope), () => this.opening.delete(scope));
    }
    const service = scopeService(scope);
    return within(opening, deadline, () => new CallTimeout(`${service}.${method}() got no answer within ${timeout} s: the Redis node that serves '${scope}' did not answer in time`));
  }

  private async openLink(scope: string): Promise<Link> {
    const replyKey = this.key(scope, `reply:${this.clientId}`);
    const reader = this.topology.open({ enableAutoPipelining: false, commandTimeout: undefined });
    reader.on("error", () => undefined);
    if ("on" in reader) reader.on("node error", () => undefined);
    const link = new Link(scope, replyKey, this.redis, reader, this.scripts, this.log, this.acting);
    try {
      await link.start();
    } catch (exc) {
      reader.disconnect();
      throw titanError(exc, `connect to the Redis node that serves '${scope}'`, this.acting);
    }
    if (this.closed) {
      await link.close();
      throw new TitanError("client closed while connecting");
    }
    this.links.set(scope, link);
    await this.evict();
    return link;
  }

  private async evict(): Promise<void> {
    if (this.links.size <= MAX_LINKS) return;
    const idle = [...this.links.values()].filter((l) => l.idle).sort((a, b) => a.lastUsed - b.lastUsed);
    for (const link of idle.slice(0, this.links.size - MAX_LINKS)) {
      this.links.delete(link.scope);
      await link.close();
      await this.redis.del(link.replyKey, link.canary).catch(() => undefined);
    }
  }

  // --- workers: affinity and fail-fast -------------------------------------------------------------

  /** How many workers of `service` have a live registry record. */
  async liveWorkers(service: string): Promise<number> {
    const ids = await this.redis.smembers(this.key(service, "workers"));
    let count = 0;
    if (ids.length > 0) {
      const found = await Promise.all(ids.map((id) => this.redis.exists(this.key(service, `worker:${id}`))));
      count = found.reduce((a, b) => a + b, 0);
    }
    this.live.set(service, { at: performance.now(), count });
    return count;
  }

  private async requireWorker(service: string, method: string, deadline: number): Promise<void> {
    const known = this.live.get(service);
    if (known !== undefined && known.count > 0 && performance.now() - known.at < ROUTE_TTL_MS) return;
    let count: number;
    try {
      count = await within(this.liveWorkers(service), deadline, () => new CallTimeout(`cannot check the workers of '${service}': Redis did not answer in time`));
    } catch (exc) {
      throw titanError(exc, `check the workers of '${service}'`, this.acting, "SMEMBERS", this.key(service, "workers"));
    }
    if (count === 0) {
      throw new NoLiveWorkers(`${service}.${method}() was not sent: service '${service}' has no live worker (waitForWorker: false; start one with 'titan-worker run FILE')`);
    }
  }

  private probe(service: string): void {
    if (this.checking.has(service) || this.closed) return;
    this.checking.add(service);
    void within(this.liveWorkers(service), performance.now() + PROBE_BUDGET_MS, () => new LateError())
      .catch(() => undefined)
      .finally(() => this.checking.delete(service));
  }

  private timeoutError(service: string, method: string, timeout: number, started: number): CallTimeout {
    const live = this.live.get(service);
    if (live !== undefined && live.at >= started && live.count === 0) {
      return new NoLiveWorkers(`${service}.${method}() got no answer within ${timeout} s: service '${service}' has no live worker (start one with 'titan-worker run FILE')`);
    }
    return new CallTimeout(`${service}.${method}() got no answer within ${timeout} s`);
  }

  /** The live worker that `key` maps to (rendezvous hashing over the affinity set), or null. */
  private async workerFor(service: string, method: string, key: string, deadline: number): Promise<string | null> {
    let cached = this.routes.get(service);
    if (cached === undefined || cached.until < performance.now()) {
      const read = async (): Promise<string[]> => {
        const ids = (await this.redis.smembers(this.key(service, "affinity"))).sort();
        const alive = await Promise.all(ids.map((id) => this.redis.exists(this.key(service, `worker:${id}`))));
        return ids.filter((_, i) => alive[i] === 1);
      };
      let workers: string[];
      try {
        workers = await within(read(), deadline, () => new CallTimeout(`cannot route ${service}.${method}(): Redis did not answer in time`));
      } catch (exc) {
        throw titanError(exc, `route ${service}.${method}()`, this.acting, "SMEMBERS", this.key(service, "affinity"));
      }
      cached = { until: performance.now() + ROUTE_TTL_MS, workers };
      this.routes.set(service, cached);
    }
    return rendezvous(key, cached.workers);
  }

  // --- jobs ----------------------------------------------------------------------------------------

  /**
   * Queue `method` of a service (a proxy from `client.service()`, or its name) as a job and return
   * it, without waiting for it to run. Its outcome is kept `resultTtl` seconds after it ended:
   * read it with `client.job(id)` from any process.
   */
  submit(target: string, method: string, args?: unknown[], options?: SubmitOptions): Promise<Job<unknown>>;
  submit<T extends object, M extends keyof T & string>(
    target: T,
    method: M,
    args: T[M] extends (...a: infer A) => unknown ? A : unknown[],
    options?: SubmitOptions,
  ): Promise<Job<T[M] extends (...a: never[]) => infer R ? Awaited<R> : unknown>>;
  async submit(target: object | string, method: string, args: unknown[] = [], options: SubmitOptions = {}): Promise<Job<unknown>> {
    const service = typeof target === "string" ? target : proxies.get(target)?.service;
    if (service === undefined) throw new ConfigError("submit() takes a service proxy (client.service(...)) or a service name");
    const argList = [...args];
    let kwargs = options.kwargs ?? {};
    if (argList.length > 0 && isKw(argList[argList.length - 1])) {
      kwargs = { ...(argList.pop() as Record<string, unknown>), ...kwargs };
    }
    if (options.deadline !== undefined) checkSeconds("deadline", options.deadline);
    if (options.delay !== undefined) checkSeconds("delay", options.delay, 0);
    const resultTtl = checkSeconds("resultTtl", options.resultTtl ?? DEFAULT_RESULT_TTL);
    const timeout = options.timeout === undefined ? this.defaultTimeout : checkSeconds("timeout", options.timeout);
    const token = randomBytes(16).toString("hex");
    const jobId = `${service}:${token}`;
    const ttlMs = options.deadline !== undefined ? options.deadline * 1000 : NO_DEADLINE_MS;
    const { fields } = this.request(service, service, method, argList, kwargs, ttlMs, token);
    const deadline = performance.now() + timeout * 1000;
    await this.shards.ready(service, deadline);
    const link = this.liveLink(service) ?? (await this.link(service, deadline, method, timeout));
    await this.send(link, service, method, fields, null, deadline, timeout, {
      delayMs: Math.round((options.delay ?? 0) * 1000),
      jobId,
      resultTtlMs: Math.round(resultTtl * 1000),
    });
    return new Job(this.redis, this.scripts, this.namespace, jobId, this.acting);
  }

  /** The job with this id (from `submit`, in this process or another). */
  job<T = unknown>(jobId: string): Job<T> {
    return new Job<T>(this.redis, this.scripts, this.namespace, jobId, this.acting);
  }

  // --- closing -------------------------------------------------------------------------------------

  /** Stop reading replies, withdraw what is still pending, delete the reply streams, disconnect. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.shards.closed = true;
    const links = [...this.links.values()];
    this.links.clear();
    for (const link of links) await link.close();
    const cleanup = async (): Promise<void> => {
      await Promise.allSettled([...this.withdrawals]);
      for (const link of links) await this.redis.del(link.replyKey, link.canary);
    };
    await within(cleanup(), performance.now() + CLOSE_BUDGET_MS, () => new LateError()).catch(() => undefined);
    this.redis.disconnect();
  }
}

class LateError extends Error {}

function kindOf(key: string): string {
  const rest = key.slice(key.indexOf("}:") + 2);
  return rest.split(":", 1)[0] ?? "";
}

/** The worker a key maps to: the one maximising blake2b(key + "\0" + id, 8 bytes), first on ties. */
export function rendezvous(key: string, workers: string[]): string | null {
  let best: string | null = null;
  let bestDigest: Buffer | null = null;
  for (const id of workers) {
    const digest = Buffer.from(blake2b(Buffer.from(`${key}\0${id}`), 8));
    if (bestDigest === null || Buffer.compare(digest, bestDigest) > 0) {
      best = id;
      bestDigest = digest;
    }
  }
  return best;
}

/**
 * Connect to Redis at `url` (default: $TITAN_REDIS_URL, else redis://localhost:6379/0): one Redis,
 * any node of a Redis Cluster, or `redis+sentinel://`. Raises RedisUnavailable naming the URL
 * (password hidden) when Redis cannot be reached or refuses the credentials.
 */
export async function connect(url?: string, options: ConnectOptions = {}): Promise<Client> {
  const resolved = url || process.env["TITAN_REDIS_URL"] || DEFAULT_URL;
  const topology = await Topology.discover(resolved);
  const redis = topology.open();
  redis.on("error", () => undefined);
  try {
    await within(redis.ping(), performance.now() + 5000, () => new RedisUnavailable(`cannot reach Redis at ${redact(resolved)}: no answer within 5 s`));
  } catch (exc) {
    redis.disconnect();
    if (isDenied(exc)) throw accessDenied(exc, `reach Redis at ${redact(resolved)}`, "PING", undefined, { role: "caller", user: options.aclUser ?? urlUser(resolved) });
    throw exc instanceof TitanError ? exc : new RedisUnavailable(`cannot reach Redis at ${redact(resolved)}: ${errorText(exc)}`, { cause: exc });
  }
  let aclUser = options.aclUser;
  if (aclUser === undefined) {
    try {
      aclUser = String(await redis.call("ACL", "WHOAMI"));
    } catch (exc) {
      // Refused by the rule: the connection logged in as the URL's user ("default" without one), whose
      // name the client id needs to match the rule's reply keys. A Redis without ACLs: no user.
      aclUser = isDenied(exc) ? (urlUser(resolved) ?? "default") : undefined;
    }
  }
  return new Client(topology, redis, { ...options, aclUser });
}

export { READ_BLOCK_MS };

/** Items `from` to `to - 1` of a stream never came, and `next` did: Redis lost writes to the reply
 * stream (a failover or a restart), and the call fails rather than skip them. */
function lostItems(service: string, method: string, from: number, to: number, next: string): CallLost {
  return new CallLost(
    `${service}.${method}() lost stream items ${from} to ${to - 1}: ${next} came next (Redis lost writes to the reply stream: a failover or a restart)`,
  );
}
