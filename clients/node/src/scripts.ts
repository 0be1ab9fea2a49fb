/**
 * The protocol's Lua scripts (lua/*.lua, copied from the Python package at build time), with their
 * `-- include: NAME` lines replaced by lua/NAME.lua once each, as titan_broker/_redis/scripting.py does.
 * They run through ioredis's defineCommand: EVALSHA, and EVAL when Redis answers NOSCRIPT.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import type { AnyRedis } from "./topology.js";

const LUA_DIR = join(dirname(dirname(fileURLToPath(import.meta.url))), "lua");

export function luaSource(name: string, included: Set<string> = new Set()): string {
  included.add(name);
  const path = join(LUA_DIR, `${name}.lua`);
  if (!existsSync(path)) {
    throw new Error(`titan-broker: ${path} is missing: the package was built without its Lua scripts (npm run build)`);
  }
  const lines: string[] = [];
  for (const line of readFileSync(path, "utf8").split("\n")) {
    if (line.startsWith("-- include:")) {
      const part = line.slice("-- include:".length).trim();
      if (!included.has(part)) lines.push(luaSource(part, included).replace(/\n$/, ""));
    } else {
      lines.push(line);
    }
  }
  while (lines.length > 0 && lines[lines.length - 1] === "") lines.pop();
  return lines.join("\n") + "\n";
}

/** What the client runs besides the protocol's scripts: the restart check of a reply stream's node
 * (its run_id, and whether the client's canary key is still there), on the node of that key. */
const RESTART_PROBE = `return {redis.call('INFO', 'server'), redis.call('EXISTS', KEYS[1])}`;

export type ScriptCall = (...args: Array<string | Buffer | number>) => Promise<unknown>;

export interface Scripts {
  submit: ScriptCall;
  enqueue: ScriptCall;
  cancel: ScriptCall;
  restartProbe: ScriptCall;
}

/** Define the scripts on a client; each call takes numkeys, the keys, then the arguments. Replies
 * come as Buffers. */
export function defineScripts(redis: AnyRedis): Scripts {
  const sources: Record<keyof Scripts, string> = {
    submit: luaSource("submit"),
    enqueue: luaSource("enqueue"),
    cancel: luaSource("cancel"),
    restartProbe: RESTART_PROBE,
  };
  const out: Partial<Scripts> = {};
  for (const [name, lua] of Object.entries(sources) as Array<[keyof Scripts, string]>) {
    const command = `titan_${name}`;
    if (redis.isCluster) {
      // On a cluster, ioredis's automatic pipelining files a script call under the node of its
      // first argument (numkeys, not a key), so script calls and commands of one tick whose keys
      // are on different nodes land in one pipeline that it then refuses ("All keys in the
      // pipeline should belong to the same slots allocation group"): calls to two services, or two
      // shards of one, in the same turn. Sent on their own, they go to the node of their keys.
      (redis.options.autoPipeliningIgnoredCommands ??= []).push(command);
    }
    redis.defineCommand(command, { lua });
    const fn = (redis as unknown as Record<string, ScriptCall>)[`${command}Buffer`];
    if (fn === undefined) throw new Error(`ioredis did not define ${command}Buffer`);
    out[name] = fn.bind(redis);
  }
  return out as Scripts;
}
