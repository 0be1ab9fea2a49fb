/**
 * Over how many shards a service spreads its calls, and which shard the next call goes to, as the
 * Python client does (titan_broker/_calling/routing.py, class Shards; PROTOCOL.md, Shards).
 *
 * Shard k's keys carry the scope `<service>#<k>` in their hash tag (shard 0: the service's own
 * name, the unsharded layout), so a busy service's calls spread over several slots, and a
 * cluster's primaries. The count is the `shards` field of the service's config hash, in its own
 * slot (written by its workers' registration, absent for one shard).
 *
 * Read in the same round trip: whether the client's ACL user is registered for the service (in its
 * `users` set, PROTOCOL.md, Registered callers): its calls then go to request streams of its own.
 */
import type { AnyRedis } from "./topology.js";
import { within } from "./within.js";

/** Milliseconds a client trusts the shard count it read (then it reads it again in the background). */
export const SHARDS_TTL_MS = 5000;
/** The most slots one service may be sharded over (as the workers check it). */
export const MAX_SHARDS = 64;
/** Milliseconds one background read of a count may take (the last known count stays meanwhile). */
const READ_BUDGET_MS = 1000;
/** The most services whose count is kept, whatever names callers use. */
const MAX_KNOWN = 4096;

/** The name inside the hash tag of shard `shard`'s keys: the service's own for the first. */
export function shardScope(service: string, shard: number): string {
  return shard === 0 ? service : `${service}#${shard}`;
}

/** The service a shard's scope belongs to. */
export function scopeService(scope: string): string {
  const at = scope.indexOf("#");
  return at < 0 ? scope : scope.slice(0, at);
}

/** The shard count as the config hash's `shards` field holds it: 1 when absent or unreadable (the
 * next registration rewrites it). */
export function shardsOf(raw: string | null): number {
  if (raw === null || !/^[0-9]{1,3}$/.test(raw)) return 1;
  const found = Number(raw);
  return found >= 1 && found <= MAX_SHARDS ? found : 1;
}

export class Shards {
  /** service -> when to read it again (performance.now() ms), its shards' scopes, and whether `user`
   * is registered for it. */
  private readonly known = new Map<string, { until: number; scopes: string[]; registered: boolean }>();
  private readonly turn = new Map<string, number>();
  /** service -> the scope of the calls made in this turn of the event loop. */
  private readonly thisTurn = new Map<string, string>();
  private readonly reading = new Set<string>();
  closed = false;

  constructor(
    private readonly redis: AnyRedis,
    /** The key of a service's config hash (shard 0's). */
    private readonly configOf: (service: string) => string,
    /** The key of a service's set of registered caller users. */
    private readonly usersOf: (service: string) => string,
    /** The client's ACL user (undefined: none to register, on a Redis without ACLs). */
    readonly user: string | undefined,
  ) {}

  /** The client's user when it is registered for `service` (as last read), else undefined. */
  userFor(service: string): string | undefined {
    return this.known.get(service)?.registered === true ? this.user : undefined;
  }

  /** At the first call to a service, by `deadline` (performance.now() ms): read it before sending when
   * the client has a user, since whether its calls go to the user's own streams must be known (a rule
   * without the shared stream refuses it). A failed or late read leaves it to the background reads. */
  async ready(service: string, deadline: number): Promise<void> {
    if (this.user === undefined || this.known.has(service)) return;
    await within(this.read(service), deadline, () => new Error("no answer in time")).catch(() => undefined);
  }

  /** The scopes of the service's shards as last read (its own only, until read). */
  scopes(service: string): string[] {
    return this.known.get(service)?.scopes ?? [service];
  }

  /**
   * The scope of the shard for a new call: round-robin over the shards, the calls made in one turn
   * of the event loop to the same one (so that a burst of calls still goes out together, to one
   * node). Until the count is read (in the background, at the first call), the service's own.
   */
  nextScope(service: string): string {
    const known = this.known.get(service);
    if (known === undefined || known.until < performance.now()) this.readSoon(service);
    if (known === undefined) return service;
    const scopes = known.scopes;
    if (scopes.length === 1) return scopes[0]!;
    let scope = this.thisTurn.get(service);
    if (scope === undefined) {
      const turn = ((this.turn.get(service) ?? -1) + 1) % scopes.length;
      this.turn.set(service, turn);
      scope = scopes[turn]!;
      this.thisTurn.set(service, scope);
      // Runs after this turn's callbacks and the promise jobs they queue: the next turn takes the next shard.
      setImmediate(() => this.thisTurn.delete(service));
    }
    return scope;
  }

  /** Read the service's shard count from its config hash (one shard when not registered). A failed
   * read keeps the count known before, if any. */
  async read(service: string): Promise<void> {
    let raw: string | null = null;
    let registered = false;
    try {
      if (this.user === undefined) {
        raw = await within(this.redis.hget(this.configOf(service), "shards"), performance.now() + READ_BUDGET_MS, () => new Error("no answer in time"));
      } else {
        // One round trip, both keys in the service's slot; a rule refusing the set: not registered.
        const both = Promise.all([
          this.redis.hget(this.configOf(service), "shards"),
          this.redis.sismember(this.usersOf(service), this.user).catch(() => 0),
        ]);
        const [shards, member] = await within(both, performance.now() + READ_BUDGET_MS, () => new Error("no answer in time"));
        raw = shards;
        registered = member === 1;
      }
    } catch {
      if (this.known.has(service)) return;
    }
    if (this.known.size >= MAX_KNOWN && !this.known.has(service)) this.known.clear();
    const count = shardsOf(raw);
    this.known.set(service, {
      until: performance.now() + SHARDS_TTL_MS,
      scopes: Array.from({ length: count }, (_, k) => shardScope(service, k)),
      registered,
    });
  }

  private readSoon(service: string): void {
    if (this.closed || this.reading.has(service)) return;
    this.reading.add(service);
    void this.read(service).finally(() => this.reading.delete(service));
  }
}
