/**
 * Real Redis servers and real Python workers for the tests: each server is private (a free port,
 * no persistence), each worker a `titan-worker run` process from the repository's .venv. Every
 * wait is bounded and names what it waited for.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Redis } from "ioredis";

export const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO = resolve(PACKAGE, "..", "..");
export const VENV = process.env["TITAN_VENV"] ?? join(REPO, ".venv");
export const PYTHON = join(VENV, "bin", "python");
export const TITAN_WORKER = join(VENV, "bin", "titan-worker");
export const TITAN = join(VENV, "bin", "titan");

if (!existsSync(TITAN_WORKER)) {
  throw new Error(`${TITAN_WORKER} is missing: run 'make install' in ${REPO} first (or set TITAN_VENV)`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

/** Poll `check` until it returns true, at most `timeoutMs`; else throw naming `what`. */
export async function waitFor(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 20_000): Promise<void> {
  const until = performance.now() + timeoutMs;
  let last: unknown = null;
  while (performance.now() < until) {
    try {
      if (await check()) return;
    } catch (exc) {
      last = exc;
    }
    await sleep(50);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${String(last)})` : ""}`);
}

function stopChild(child: ChildProcess, signal: NodeJS.Signals, timeoutMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolveStop) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
    }, timeoutMs);
    child.once("exit", () => {
      clearTimeout(timer);
      resolveStop();
    });
    child.kill(signal);
  });
}

export class PrivateRedis {
  child: ChildProcess | null = null;
  readonly dir = mkdtempSync(join(tmpdir(), "titan-node-redis-"));
  private constructor(readonly port: number, readonly extra: string[]) {}

  static async start(extra: string[] = []): Promise<PrivateRedis> {
    const server = new PrivateRedis(await freePort(), extra);
    await server.launch();
    return server;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async launch(): Promise<void> {
    const args = ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", this.dir, ...this.extra];
    this.child = spawn(process.env["TITAN_REDIS_SERVER"] ?? "redis-server", args, { stdio: ["ignore", "ignore", "inherit"] });
    const client = new Redis({ port: this.port, host: "127.0.0.1", lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 });
    client.on("error", () => undefined);
    try {
      await waitFor(`redis-server on port ${this.port}`, async () => {
        if (this.child?.exitCode !== null) throw new Error(`redis-server exited with ${this.child?.exitCode}`);
        try {
          await client.connect();
        } catch {
          client.disconnect();
          return false;
        }
        return (await client.ping()) === "PONG";
      }, 10_000);
    } finally {
      client.disconnect();
    }
  }

  client(): Redis {
    const client = new Redis({ port: this.port, host: "127.0.0.1", maxRetriesPerRequest: 1 });
    client.on("error", () => undefined);
    return client;
  }

  pause(): void {
    this.child?.kill("SIGSTOP");
  }

  resume(): void {
    this.child?.kill("SIGCONT");
  }

  /** Kill it and start a new one on the same port, with nothing in it (a new run_id). */
  async restart(): Promise<void> {
    if (this.child) await stopChild(this.child, "SIGKILL", 5000);
    await this.launch();
  }

  async stop(): Promise<void> {
    if (this.child) {
      this.child.kill("SIGCONT");
      await stopChild(this.child, "SIGTERM", 5000);
    }
  }
}

export class Worker {
  output = "";
  private constructor(readonly child: ChildProcess, readonly file: string) {
    child.stdout?.on("data", (d: Buffer) => (this.output += d.toString()));
    child.stderr?.on("data", (d: Buffer) => (this.output += d.toString()));
  }

  /** Start `titan-worker run FILE` and wait (bounded) until its record is in Redis. */
  static async start(file: string, url: string, service: string, args: string[] = [], namespace = "titan"): Promise<Worker> {
    const child = spawn(TITAN_WORKER, ["run", file, "--redis", url, "--namespace", namespace, ...args], {
      cwd: REPO,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PYTHONPATH: REPO },
    });
    const worker = new Worker(child, file);
    const redis = await connectAny(url);
    try {
      const before = new Set(await redis.smembers(`${namespace}:{${service}}:workers`));
      await waitFor(`a worker of '${service}' (${file}) to register`, async () => {
        if (child.exitCode !== null) throw new Error(`titan-worker exited with ${child.exitCode}: ${worker.output.slice(-2000)}`);
        const ids = await redis.smembers(`${namespace}:{${service}}:workers`);
        for (const id of ids) {
          if (!before.has(id) && (await redis.exists(`${namespace}:{${service}}:worker:${id}`))) {
            const pid = await redis.hget(`${namespace}:{${service}}:worker:${id}`, "pid");
            if (pid === String(child.pid)) return true;
          }
        }
        return false;
      }, 30_000);
    } finally {
      redis.disconnect();
    }
    return worker;
  }

  async stop(): Promise<void> {
    await stopChild(this.child, "SIGTERM", 10_000);
  }
}

/** A plain ioredis client for a URL: a cluster's when it is one; the primary a sentinel names for
 * `redis+sentinel://host:port/<name>`; over TLS trusting `?ssl_ca_certs=` for `rediss://`, with the
 * client certificate of `?ssl_certfile=&ssl_keyfile=` when given. */
export async function connectAny(url: string): Promise<Redis> {
  const sentinel = /^redis\+sentinel:\/\/([^/?]*)\/([^/?]+)/.exec(url);
  if (sentinel) {
    const sentinels = sentinel[1]!.split(",").map((h) => ({ host: h.split(":")[0]!, port: Number(h.split(":")[1]) }));
    const client = new Redis({ sentinels, name: sentinel[2]!, maxRetriesPerRequest: 2 });
    client.on("error", () => undefined);
    return client;
  }
  const u = new URL(url);
  const ca = u.searchParams.get("ssl_ca_certs");
  const client = ca === null
    ? new Redis(url, { maxRetriesPerRequest: 2 })
    : new Redis(`${u.protocol}//${u.host}${u.pathname}`, { maxRetriesPerRequest: 2, tls: tlsOf(u, ca) });
  client.on("error", () => undefined);
  const info = await client.info("cluster");
  if (/cluster_enabled:1/.test(info)) {
    client.disconnect();
    const { Cluster } = await import("ioredis");
    const u = new URL(url);
    const cluster = new Cluster([{ host: u.hostname, port: Number(u.port) }]);
    cluster.on("error", () => undefined);
    return cluster as unknown as Redis;
  }
  return client;
}

function tlsOf(u: URL, ca: string): { ca: Buffer; cert?: Buffer; key?: Buffer } {
  const cert = u.searchParams.get("ssl_certfile");
  const key = u.searchParams.get("ssl_keyfile");
  return { ca: readFileSync(ca), ...(cert ? { cert: readFileSync(cert) } : {}), ...(key ? { key: readFileSync(key) } : {}) };
}

/** A private Redis Cluster, started by the Python test helpers (titan_broker/testing/_local_cluster.py). */
export class PythonCluster {
  private constructor(readonly child: ChildProcess, readonly url: string) {}

  static async start(): Promise<PythonCluster> {
    const child = spawn(PYTHON, [join(PACKAGE, "test", "local_cluster.py")], {
      cwd: REPO,
      stdio: ["pipe", "pipe", "inherit"],
      env: { ...process.env, PYTHONPATH: REPO },
    });
    let out = "";
    const url = await new Promise<string>((resolveUrl, reject) => {
      const timer = setTimeout(() => reject(new Error(`the local cluster did not start within 60 s: ${out}`)), 60_000);
      child.stdout?.on("data", (d: Buffer) => {
        out += d.toString();
        const m = /^URL (\S+)$/m.exec(out);
        if (m) {
          clearTimeout(timer);
          resolveUrl(m[1]!);
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`the local cluster helper exited with ${code}: ${out}`));
      });
    });
    return new PythonCluster(child, url);
  }

  async stop(): Promise<void> {
    this.child.stdin?.end(); // the helper closes the cluster when its stdin closes
    await stopChild(this.child, "SIGTERM", 30_000).catch(() => undefined);
  }
}

/** Run a command to its end (bounded), returning its exit code and output. */
export function run(command: string, args: string[], options: { cwd?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<{ code: number | null; out: string }> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(command, args, { cwd: options.cwd ?? REPO, env: options.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr?.on("data", (d: Buffer) => (out += d.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${command} ${args.join(" ")} did not end within ${options.timeoutMs ?? 60_000} ms: ${out}`));
    }, options.timeoutMs ?? 60_000);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolveRun({ code, out });
    });
  });
}

/** A private Sentinel set-up or TLS Redis, started by test/local_servers.py from the Python test
 * helpers: `info` is the JSON line it printed first (`url`, ...); `ask` sends it a command. */
export class PythonServers {
  private lines: string[] = [];
  private waiting: ((line: string) => void) | null = null;
  private out = "";

  private constructor(readonly child: ChildProcess, public info: Record<string, unknown> = {}) {
    child.stdout?.on("data", (d: Buffer) => {
      this.out += d.toString();
      let at: number;
      while ((at = this.out.indexOf("\n")) >= 0) {
        const line = this.out.slice(0, at);
        this.out = this.out.slice(at + 1);
        if (this.waiting) {
          const w = this.waiting;
          this.waiting = null;
          w(line);
        } else this.lines.push(line);
      }
    });
  }

  get url(): string {
    return String(this.info["url"]);
  }

  static async start(kind: "sentinel" | "tls"): Promise<PythonServers> {
    const child = spawn(PYTHON, [join(PACKAGE, "test", "local_servers.py"), kind], {
      cwd: REPO,
      stdio: ["pipe", "pipe", "inherit"],
      env: { ...process.env, PYTHONPATH: REPO },
    });
    const servers = new PythonServers(child);
    try {
      servers.info = await servers.next(`the local ${kind} set-up to start`, 60_000);
    } catch (exc) {
      await servers.stop();
      throw exc;
    }
    return servers;
  }

  /** The next JSON line it prints, within `timeoutMs`. */
  private next(what: string, timeoutMs: number): Promise<Record<string, unknown>> {
    const queued = this.lines.shift();
    if (queued !== undefined) return Promise.resolve(JSON.parse(queued) as Record<string, unknown>);
    return new Promise((resolveLine, reject) => {
      const onExit = (code: number | null): void => {
        clearTimeout(timer);
        reject(new Error(`local_servers.py exited with ${code} while waiting for ${what}`));
      };
      const timer = setTimeout(() => {
        this.waiting = null;
        this.child.off("exit", onExit);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.child.once("exit", onExit);
      this.waiting = (line) => {
        clearTimeout(timer);
        this.child.off("exit", onExit);
        resolveLine(JSON.parse(line) as Record<string, unknown>);
      };
    });
  }

  /** Send a command line ("failover") and wait for its answer. */
  async ask(command: string, timeoutMs = 45_000): Promise<Record<string, unknown>> {
    this.child.stdin?.write(command + "\n");
    const answer = await this.next(`the answer to '${command}'`, timeoutMs);
    if ("error" in answer) throw new Error(`local_servers.py: ${String(answer["error"])}`);
    return answer;
  }

  async stop(): Promise<void> {
    this.child.stdin?.end(); // the helper closes everything when its stdin closes
    await stopChild(this.child, "SIGTERM", 30_000).catch(() => undefined);
  }
}

/** The scopes of a service's `shards` shards (PROTOCOL.md, Shards): the service's own, then `<svc>#<k>`. */
export function shardScopes(service: string, shards: number): string[] {
  return Array.from({ length: shards }, (_, k) => (k === 0 ? service : `${service}#${k}`));
}

/** How many entries were ever added to the stream `key` (0 when it does not exist): acknowledged
 * calls are deleted from a calls stream, so its length does not tell. */
export async function entriesAdded(redis: Redis, key: string): Promise<number> {
  if ((await redis.exists(key)) === 0) return 0;
  const info = (await redis.call("XINFO", "STREAM", key)) as unknown[];
  return Number(info[info.indexOf("entries-added") + 1]);
}
