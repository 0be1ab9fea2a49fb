/**
 * What runs behind a URL, as in the Python client (titan_broker/_redis/topology.py): one Redis, a Redis
 * Cluster reached through any one node's URL (detected with INFO cluster, no flag needed), or a
 * primary that Redis Sentinel names (`redis+sentinel://[user:pass@]host:port[,host:port]/<primary>`).
 */
import { readFileSync } from "node:fs";

import { Cluster, Redis, type ClusterOptions, type RedisOptions } from "ioredis";

import { accessDenied, isDenied } from "./denied.js";
import { ConfigError, RedisUnavailable } from "./errors.js";

export type Kind = "single" | "cluster" | "sentinel";
export type AnyRedis = Redis | Cluster;

export const DEFAULT_URL = "redis://localhost:6379/0";
const PROBE_TIMEOUT_MS = 2000;
const CONNECT_TIMEOUT_MS = 5000;

/** The URL with its passwords replaced by `***`, for messages. */
export function redact(url: string): string {
  const [base = "", query] = url.split(/\?(.*)/s, 2);
  const q = query === undefined ? "" : "?" + query.replace(/(^|&)([^=&]*password=)[^&]*/gi, "$1$2***");
  const m = /^([a-z+]+:\/\/)([^@/]*:[^@/]*)@(.*)$/is.exec(base);
  if (!m) return base + q;
  const user = (m[2] ?? "").split(":", 1)[0];
  return `${m[1]}${user}:***@${m[3]}${q}`;
}

interface Parsed {
  url: string;
  scheme: string;
  hosts: Array<{ host: string; port: number }>;
  username?: string;
  password?: string;
  path: string;
  query: URLSearchParams;
}

function parse(url: string): Parsed {
  const m = /^([a-z+]+):\/\/(?:([^@/]*)@)?([^/?#]*)([^?#]*)(?:\?([^#]*))?/i.exec(url);
  if (!m) throw new ConfigError(`Redis URL ${redact(url)} is not a URL: use redis://host:port, rediss://, or redis+sentinel://`);
  const scheme = (m[1] ?? "").toLowerCase();
  if (!["redis", "rediss", "redis+sentinel", "redis+sentinels"].includes(scheme)) {
    throw new ConfigError(`Redis URL ${redact(url)} must start with redis://, rediss:// or redis+sentinel://`);
  }
  const sentinel = scheme.startsWith("redis+sentinel");
  const hosts = (m[3] ?? "").split(",").filter((h) => h !== "").map((item) => {
    let host: string;
    let port: string;
    if (item.startsWith("[")) {
      const end = item.indexOf("]");
      host = item.slice(1, end);
      port = item.slice(end + 1).replace(/^:/, "");
    } else {
      [host = "", port = ""] = item.split(":");
    }
    const p = port === "" ? (sentinel ? 26379 : 6379) : Number(port);
    if (!host || !Number.isInteger(p) || p <= 0 || p >= 65536) {
      throw new ConfigError(`${redact(url)}: bad address ${JSON.stringify(item)}`);
    }
    return { host, port: p };
  });
  if (hosts.length === 0) hosts.push({ host: "localhost", port: sentinel ? 26379 : 6379 });
  const parsed: Parsed = { url, scheme, hosts, path: m[4] ?? "", query: new URLSearchParams(m[5] ?? "") };
  if (m[2]) {
    const [user, ...rest] = m[2].split(":");
    if (user) parsed.username = decodeURIComponent(user);
    if (rest.length) parsed.password = decodeURIComponent(rest.join(":"));
  }
  return parsed;
}

/** The scheme with TLS for each scheme without it (a unix socket has none). */
const TLS_INSTEAD: Record<string, string> = { redis: "rediss", "redis+sentinel": "redis+sentinels" };

function tlsOptions(p: Parsed, secure: boolean): RedisOptions["tls"] | undefined {
  if (!secure) {
    // Given to a plain connection they would be ignored: the client would talk in clear to a
    // server its user meant to authenticate.
    const given = [...p.query.keys()].filter((k) => k.startsWith("ssl_")).sort();
    if (given.length) {
      const instead = TLS_INSTEAD[p.scheme];
      const fix = instead ? `use ${instead}://` : "remove them";
      throw new ConfigError(`Redis URL ${redact(p.url)} has TLS options (${given.join(", ")}) but ${p.scheme}:// does not use TLS: ${fix}`);
    }
    return undefined;
  }
  const ca = p.query.get("ssl_ca_certs");
  const tls: NonNullable<RedisOptions["tls"]> = {};
  if (ca) {
    try {
      tls.ca = readFileSync(ca);
    } catch (exc) {
      throw new ConfigError(`${redact(p.url)}: cannot read the CA file ssl_ca_certs=${ca}: ${(exc as Error).message}`, { cause: exc });
    }
  }
  // Mutual TLS: the client's own certificate and key, as the Python side reads them from the URL.
  for (const [name, field] of [["ssl_certfile", "cert"], ["ssl_keyfile", "key"]] as const) {
    const path = p.query.get(name);
    if (!path) continue;
    try {
      tls[field] = readFileSync(path);
    } catch (exc) {
      throw new ConfigError(`${redact(p.url)}: cannot read ${name}=${path}: ${(exc as Error).message}`, { cause: exc });
    }
  }
  if (p.query.get("ssl_cert_reqs") === "none") tls.rejectUnauthorized = false;
  return tls;
}

/** The ACL user a URL names (undefined: none, so Redis's `default` user, or not a URL). */
export function urlUser(url: string): string | undefined {
  try {
    return parse(url).username;
  } catch {
    return undefined;
  }
}

/** Options every connection of the client shares: commands wait in ioredis's queue while it
 * reconnects, and each call bounds its own wait (its deadline). */
const COMMON: RedisOptions = {
  maxRetriesPerRequest: null,
  connectTimeout: CONNECT_TIMEOUT_MS,
  enableAutoPipelining: true,
  retryStrategy: (times: number) => Math.min(1000, 50 * 2 ** Math.min(times, 5)),
};

/** How to open connections to the deployment behind one URL. */
export class Topology {
  private constructor(
    readonly url: string,
    readonly kind: Kind,
    private readonly nodeOptions: RedisOptions,
    private readonly seeds: Array<{ host: string; port: number }>,
  ) {}

  /** What runs behind `url`; raises RedisUnavailable (unreachable, refused credentials) or ConfigError. */
  static async discover(url: string): Promise<Topology> {
    const p = parse(url);
    const secure = p.scheme === "rediss" || p.scheme === "redis+sentinels";
    const auth: RedisOptions = {};
    if (p.username !== undefined) auth.username = p.username;
    if (p.password !== undefined) auth.password = p.password;
    const tls = tlsOptions(p, secure);
    if (tls) auth.tls = tls;
    if (p.scheme.startsWith("redis+sentinel")) {
      const names = p.path.split("/").filter((n) => n);
      if (names.length !== 1) {
        throw new ConfigError(`${redact(url)}: a sentinel URL names the sentinels and one primary: redis+sentinel://[user:password@]host:26379[,host:26379...]/<primary name>[?db=N]`);
      }
      const db = p.query.get("db") ?? "0";
      if (!/^\d+$/.test(db)) throw new ConfigError(`${redact(url)}: db must be a number, got ${JSON.stringify(db)}`);
      const options: RedisOptions = { ...auth, sentinels: p.hosts, name: names[0], db: Number(db) };
      const su = p.query.get("sentinel_username");
      const sp = p.query.get("sentinel_password");
      if (su) options.sentinelUsername = su;
      if (sp) options.sentinelPassword = sp;
      if (secure) options.enableTLSForSentinelMode = true;
      const topology = new Topology(url, "sentinel", options, p.hosts);
      await topology.probe(options);
      return topology;
    }
    const seed = p.hosts[0] ?? { host: "localhost", port: 6379 };
    const nodeOptions: RedisOptions = { ...auth, host: seed.host, port: seed.port };
    const probe = new Redis({ ...nodeOptions, ...probeOptions() });
    let failure: unknown = null;
    probe.on("error", (exc: unknown) => {
      failure ??= exc; // the reason, where connect() says only that the connection closed
    });
    let enabled: boolean;
    try {
      await bounded(probe.connect(), `connect to ${redact(url)}`).catch((exc: unknown) => {
        throw failure ?? exc;
      });
      try {
        const info = await bounded(probe.info("cluster"), `INFO cluster on ${redact(url)}`);
        enabled = /cluster_enabled:1/.test(info);
      } catch (exc) {
        if (!String((exc as Error).message).startsWith("NOPERM")) throw exc;
        try {
          await bounded(probe.call("CLUSTER", "MYID"), `CLUSTER MYID on ${redact(url)}`);
          enabled = true;
        } catch (exc2) {
          const text = String((exc2 as Error).message);
          if (text.startsWith("NOPERM")) {
            throw new ConfigError(`the Redis user of ${redact(url)} may run neither INFO nor CLUSTER MYID, so it cannot be told whether this is a Redis Cluster: allow +info (or +cluster|myid and +cluster|slots on a cluster)`);
          }
          enabled = false; // "cluster support disabled"
        }
      }
    } catch (exc) {
      throw unreachable(url, exc);
    } finally {
      probe.disconnect();
    }
    if (!enabled) {
      const db = p.path.replace(/^\//, "") || p.query.get("db") || "0";
      if (!/^\d+$/.test(db)) throw new ConfigError(`${redact(url)}: the database must be a number, got ${JSON.stringify(db)}`);
      return new Topology(url, "single", { ...nodeOptions, db: Number(db) }, [seed]);
    }
    if (!["", "/", "/0"].includes(p.path) || (p.query.get("db") ?? "0") !== "0") {
      throw new ConfigError(`${redact(url)} is a Redis Cluster, which has only database 0: remove the database number`);
    }
    return new Topology(url, "cluster", nodeOptions, [seed]);
  }

  private async probe(options: RedisOptions): Promise<void> {
    const probe = new Redis({ ...options, ...probeOptions() });
    let failure: unknown = null;
    probe.on("error", (exc: unknown) => {
      failure ??= exc;
    });
    let command: string | undefined;
    try {
      await bounded(probe.connect(), `connect to ${redact(this.url)}`).catch((exc: unknown) => {
        throw failure ?? exc;
      });
      command = "PING";
      await bounded(probe.ping(), `PING ${redact(this.url)}`);
    } catch (exc) {
      throw unreachable(this.url, exc, command);
    } finally {
      probe.disconnect();
    }
  }

  /** A new client (a pool of one connection per node) for this deployment. */
  open(extra: RedisOptions = {}): AnyRedis {
    if (this.kind === "cluster") {
      const { host: _h, port: _p, ...redisOptions } = this.nodeOptions;
      const options: ClusterOptions = {
        redisOptions: { ...COMMON, ...redisOptions, ...extra },
        enableAutoPipelining: extra.enableAutoPipelining ?? true,
        maxRedirections: 16,
        retryDelayOnFailover: 100,
        retryDelayOnClusterDown: 100,
        clusterRetryStrategy: (times: number) => Math.min(1000, 50 * 2 ** Math.min(times, 5)),
        slotsRefreshTimeout: PROBE_TIMEOUT_MS,
      };
      return new Cluster(this.seeds, options);
    }
    return new Redis({ ...COMMON, ...this.nodeOptions, ...extra });
  }
}

function probeOptions(): RedisOptions {
  return {
    lazyConnect: true,
    connectTimeout: PROBE_TIMEOUT_MS,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    enableOfflineQueue: false,
    sentinelRetryStrategy: () => null,
  };
}

async function bounded<T>(promise: Promise<T>, doing: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${doing}: no answer within ${PROBE_TIMEOUT_MS / 1000} s`)), PROBE_TIMEOUT_MS);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** The error for a first connection to `url` that failed with `exc` (running `command`, when known;
 * passwords hidden): AccessDenied when Redis refused a command for the URL's ACL user. */
export function unreachable(url: string, exc: unknown, command?: string): Error {
  if (exc instanceof ConfigError) return exc;
  if (isDenied(exc)) return accessDenied(exc, `connect to ${redact(url)}`, command, undefined, { role: "caller", user: urlUser(url) });
  const text = exc instanceof Error ? exc.message : String(exc);
  if (/WRONGPASS|NOAUTH|invalid password|invalid username/i.test(text)) {
    return new RedisUnavailable(`Redis at ${redact(url)} refused the credentials: ${text}`, { cause: exc });
  }
  const code = String((exc as { code?: unknown } | null)?.code ?? "");
  if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME/.test(code) || /certificate/i.test(text)) {
    return new RedisUnavailable(
      `Redis at ${redact(url)} presented a TLS certificate this client does not trust: ${text}; name the CA that signed it with ?ssl_ca_certs=/path/ca.pem`,
      { cause: exc },
    );
  }
  if (/^(ERR|NOPERM|DENIED)/.test(text)) {
    return new RedisUnavailable(`Redis at ${redact(url)} refused the connection: ${text}`, { cause: exc });
  }
  return new RedisUnavailable(
    `cannot reach Redis at ${redact(url)}: ${text}; is it running? (pass the URL to connect() or set TITAN_REDIS_URL)`,
    { cause: exc },
  );
}
