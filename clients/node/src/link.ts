/**
 * A client's link to one service, or to one shard of a sharded service: its reply stream
 * `<ns>:{<scope>}:reply:<client>` (in the slot of the service, or of the shard `<svc>#<k>`), read
 * by a blocking XREAD on a connection of its own, and the calls waiting for replies.
 *
 * The reader survives Redis going away (ioredis reconnects; the read goes on from the last id
 * seen). While calls wait, it checks about every second (and after any connection trouble)
 * whether the node's run_id changed and the client's canary `<reply key>:alive` is gone: then
 * Redis lost its data, and every waiting call whose request is gone too fails with CallLost.
 *
 * A command Redis refuses for the ACL user's rules is not an outage: the reader stops, every call
 * waiting on it fails with AccessDenied, and the client opens a new link for the next call.
 */
import { accessDenied, isDenied, isScriptRefusal, type Acting } from "./denied.js";
import { AccessDenied, CallLost, TitanError } from "./errors.js";
import { unpack } from "./codec.js";
import type { Scripts } from "./scripts.js";
import { scopeService } from "./shards.js";
import type { AnyRedis } from "./topology.js";

export const READ_BLOCK_MS = 1000;
const TRIM_EVERY_MS = 1000;
const CANARY_TTL_MS = 600_000;
const CANARY_EVERY_MS = 60_000;
const RESTART_CHECK_EVERY_MS = 1000;

export interface Reply {
  id: string;
  ok: boolean;
  value: unknown;
  error: unknown;
  /** A message of stream items: the position of its first item. */
  seq: number | null;
  end: number | null;
  /** A message of stream items: its items, in order from `seq` (empty on other replies). */
  items: unknown[];
}

/** Where a request went: the keys it may be in (an affinity call may fall back to the shared
 * stream; a delayed request is a member of the delayed set) and its entry id, or member. */
export interface Sent {
  keys: string[];
  id: Buffer;
}

export interface Waiter {
  resolve(reply: Reply): void;
  reject(error: Error): void;
}

export interface StreamSink {
  push(item: Reply | Error): void;
}

export function decodeReply(data: Buffer | undefined): Reply | null {
  if (data === undefined) return null;
  let msg: unknown;
  try {
    msg = unpack(data);
  } catch {
    return null;
  }
  if (msg === null || typeof msg !== "object" || typeof (msg as Record<string, unknown>)["id"] !== "string") return null;
  const m = msg as Record<string, unknown>;
  const ok = Boolean(m["ok"]);
  let error = m["e"];
  if (!ok && (error === null || typeof error !== "object")) {
    error = { type: "titan.BadReply", message: "reply carries neither value nor error" };
  }
  const s = m["s"];
  const end = m["end"];
  return {
    id: m["id"] as string,
    ok,
    value: m["v"],
    error: ok ? null : error,
    seq: typeof s === "number" ? s : null,
    end: typeof end === "number" ? end : null,
    // One item in `v`: as workers before multi-item messages sent it.
    items: typeof s !== "number" ? [] : Array.isArray(m["i"]) ? m["i"] : [m["v"]],
  };
}

function kind(key: string): string {
  const rest = key.slice(key.indexOf("}:") + 2);
  return rest.split(":", 1)[0] ?? "";
}

export function parseRunId(info: string): string | null {
  const m = /^run_id:(\S+)/m.exec(info);
  return m ? (m[1] ?? null) : null;
}

export class Link {
  readonly calls = new Map<string, Waiter>();
  readonly streams = new Map<string, StreamSink>();
  readonly entries = new Map<string, Sent>();
  readonly canary: string;
  offsetMs = 0;
  /** Redis's clock minus performance.now(), in ms: an upper bound, from the last entry id. */
  lastUsed = performance.now();
  private runId: string | null = null;
  private restartCheck = true;
  private last = "0-0";
  private seen: string[] = [];
  private closed = false;
  private suspect = false;
  private running: Promise<void> | null = null;
  /** Why the reader stopped: Redis refused one of its commands. A denied link takes no more calls. */
  denied: AccessDenied | null = null;

  /** The service whose replies it reads (of its shard `scope`). */
  readonly service: string;

  constructor(
    /** The scope of the keys it serves: the service's, or one of its shards' (`<service>#<k>`). */
    readonly scope: string,
    readonly replyKey: string,
    private readonly base: AnyRedis,
    private readonly reader: AnyRedis,
    private readonly scripts: Scripts,
    private readonly log: (message: string) => void,
    private readonly acting: Acting = { role: "caller" },
  ) {
    this.service = scopeService(scope);
    this.canary = `${replyKey}:alive`;
    reader.on("reconnecting", () => {
      this.suspect = true;
    });
    reader.on("error", () => {
      this.suspect = true; // ioredis reconnects by itself; the reader checks for a restart after
    });
  }

  get idle(): boolean {
    return this.calls.size === 0 && this.streams.size === 0 && this.entries.size === 0;
  }

  /** Note which Redis serves the reply stream (its run_id), write the canary, measure the clock.
   * Raises AccessDenied when Redis refuses the reply stream's keys to this ACL user. */
  async start(): Promise<void> {
    try {
      await this.probeRestart(true);
    } catch (exc) {
      if (isDenied(exc)) throw this.refused(exc, `connect to the Redis node that serves '${this.service}'`, "EVALSHA", this.canary);
      throw exc;
    }
    await this.syncClock();
    this.running = this.run();
  }

  private refused(exc: unknown, doing: string, command: string, key: string): AccessDenied {
    return accessDenied(exc, doing, command, key, this.acting);
  }

  async syncClock(): Promise<void> {
    const started = performance.now();
    const [seconds, micros] = (await this.base.time()) as unknown as [string | number, string | number];
    this.offsetMs = Number(seconds) * 1000 + Number(micros) / 1000 + 1 - started;
  }

  private async run(): Promise<void> {
    let nextTrim = performance.now() + TRIM_EVERY_MS;
    let nextCanary = performance.now() + CANARY_EVERY_MS;
    let nextCheck = performance.now() + RESTART_CHECK_EVERY_MS;
    let delay = 50;
    let command = "XREAD";
    let key = this.replyKey;
    while (!this.closed) {
      try {
        const now = performance.now();
        if (this.suspect || (this.entries.size > 0 && now >= nextCheck)) {
          this.suspect = false;
          nextCheck = now + RESTART_CHECK_EVERY_MS;
          [command, key] = ["EVALSHA", this.canary];
          await this.probeRestart(false);
        }
        if (this.seen.length > 0 && (this.seen.length >= 1024 || now >= nextTrim)) {
          const ids = this.seen.splice(0, 1024);
          [command, key] = ["XDEL", this.replyKey];
          await this.base.xdel(this.replyKey, ...ids);
          nextTrim = now + TRIM_EVERY_MS;
        }
        if (now >= nextCanary) {
          nextCanary = now + CANARY_EVERY_MS;
          await this.writeCanary();
        }
        [command, key] = ["XREAD", this.replyKey];
        const res = await this.reader.xreadBuffer("COUNT", 256, "BLOCK", READ_BLOCK_MS, "STREAMS", this.replyKey, this.last);
        delay = 50;
        if (res) this.route(res as unknown as Array<[Buffer, Array<[Buffer, Buffer[]]>]>);
      } catch (exc) {
        if (this.closed) return;
        const text = (exc as Error).message ?? String(exc);
        if (isDenied(exc)) {
          this.deny(this.refused(exc, `read the replies of '${this.service}'`, command, key));
          return;
        }
        if (text.startsWith("WRONGTYPE")) {
          await this.recoverClobbered().catch(() => undefined);
          continue;
        }
        this.suspect = true;
        this.log(`titan-broker: reading the replies on ${this.replyKey} failed (${text}); retrying in ${delay} ms`);
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(1000, delay * 2);
      }
    }
  }

  private route(res: Array<[Buffer, Array<[Buffer, Buffer[]]>]>): void {
    for (const [, entries] of res) {
      for (const [rawId, fields] of entries) {
        const id = rawId.toString();
        this.seen.push(id);
        this.last = id;
        let value: Buffer | undefined;
        for (let i = 0; i + 1 < fields.length; i += 2) {
          if (fields[i]!.toString() === "reply") value = fields[i + 1];
        }
        const reply = decodeReply(value);
        if (reply === null) {
          this.log(`titan-broker: dropped a malformed reply on ${this.replyKey}`);
          continue;
        }
        const stream = this.streams.get(reply.id);
        if (stream !== undefined) {
          stream.push(reply);
          continue;
        }
        const waiter = this.calls.get(reply.id);
        if (waiter !== undefined) {
          this.calls.delete(reply.id);
          waiter.resolve(reply);
        }
      }
    }
  }

  private async writeCanary(): Promise<void> {
    try {
      await this.base.set(this.canary, "1", "PX", CANARY_TTL_MS);
    } catch (exc) {
      this.log(`titan-broker: cannot write ${this.canary} (${(exc as Error).message})`);
    }
  }

  /** Compare the node's run_id with the one known; when Redis lost its data, fail the lost calls. */
  private async probeRestart(first: boolean): Promise<void> {
    if (!this.restartCheck) return;
    let answer: [Buffer, number];
    try {
      answer = (await this.scripts.restartProbe(1, this.canary)) as [Buffer, number];
    } catch (exc) {
      // INFO refused inside the script (the canary's key, declared, is checked before it runs).
      if (isScriptRefusal(exc)) {
        this.restartCheck = false;
        this.log("titan-broker: this Redis user may not run INFO: calls lost by a Redis restart without persistence will time out instead of failing at once with CallLost (allow +info to fix)");
        return;
      }
      throw exc;
    }
    const runId = parseRunId(answer[0].toString());
    if (first || this.runId === null) {
      this.runId = runId;
      await this.writeCanary();
      return;
    }
    if (runId === null || runId === this.runId) return;
    const previous = this.runId;
    if (Number(answer[1]) === 0) {
      await this.failLost(previous, runId);
      await this.writeCanary();
    } else {
      this.log(`titan-broker: Redis changed (run_id ${previous} -> ${runId}: a restart or a failover) and kept its data`);
    }
    this.runId = runId;
  }

  private async failLost(previous: string, runId: string): Promise<void> {
    const waiting = [...this.entries.entries()];
    const gone: string[] = [];
    for (const [callId, sent] of waiting) {
      let found = false;
      for (const key of sent.keys) {
        const k = kind(key);
        if (k === "job") continue;
        const hit = k === "delayed" ? await this.base.zscore(key, sent.id) : await this.base.xrange(key, sent.id.toString(), sent.id.toString());
        if (hit !== null && (!Array.isArray(hit) || hit.length > 0)) found = true;
      }
      if (!found) gone.push(callId);
    }
    // Replies written before the check are routed first: a call answered in time is not lost.
    for (;;) {
      const res = await this.base.xreadBuffer("COUNT", 256, "STREAMS", this.replyKey, this.last);
      if (!res) break;
      this.route(res as unknown as Array<[Buffer, Array<[Buffer, Buffer[]]>]>);
    }
    for (const callId of gone) {
      this.fail(callId, new CallLost(
        `Redis restarted or failed over (run_id ${previous} -> ${runId}) and lost this call's request before it was answered; the call may or may not have run`,
      ));
    }
  }

  private async recoverClobbered(): Promise<void> {
    const type = await this.base.type(this.replyKey);
    if (type !== "stream") await this.base.del(this.replyKey);
    this.last = "0-0";
    this.seen = [];
    this.failAll(() => new CallLost(
      `the reply stream ${this.replyKey} was overwritten with a ${type} value by someone else: the replies to the calls waiting on it may be lost, and the call may or may not have run (the key was deleted: later calls work)`,
    ));
  }

  fail(callId: string, error: Error): void {
    const waiter = this.calls.get(callId);
    if (waiter !== undefined) {
      this.calls.delete(callId);
      waiter.reject(error);
    }
    this.streams.get(callId)?.push(error);
  }

  failAll(make: () => Error): void {
    for (const callId of [...this.calls.keys(), ...this.streams.keys()]) this.fail(callId, make());
  }

  /** Stop taking calls: Redis refused the reader a command. Every waiting call fails with `error`. */
  private deny(error: AccessDenied): void {
    this.denied = error;
    this.log(`titan-broker: ${error.message}; the calls waiting on ${this.replyKey} fail with AccessDenied`);
    this.failAll(() => new AccessDenied(error.message, { cause: error.cause }));
    this.reader.disconnect();
  }

  /** Stop reading; fail what still waits. */
  async close(): Promise<void> {
    this.closed = true;
    this.failAll(() => new TitanError("client closed while the call was waiting"));
    this.reader.disconnect();
    await this.running?.catch(() => undefined);
  }
}
