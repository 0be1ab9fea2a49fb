/**
 * The one place a Redis ACL refusal becomes AccessDenied, naming the command, the key and the role
 * (as titan_broker/_redis/denied.py does for the Python client).
 *
 * Redis says `NOPERM` for a command refused outright and, for a command a Lua script runs, an error
 * that starts "The user executing the script can't" (Redis 7.0) or "ACL failure in script" (later
 * versions); a transaction with a refused command is discarded (EXECABORT, the refusal among its
 * previous errors). Not every Redis version names the key,
 * so the code that ran the command says what it ran (`command`, `key`), and `who` says which ACL
 * user ran it and which rule should have allowed it (this client is a caller).
 */
import { AccessDenied } from "./errors.js";

/** Who is running commands: the ACL user (undefined: not known) and the role of the rule it should have. */
export interface Acting {
  role: string;
  user?: string | undefined;
}

const SCRIPT_REFUSALS = ["the user executing the script can't", "acl failure in script"];

function textOf(exc: unknown): string {
  return exc instanceof Error ? exc.message : String(exc);
}

/** Whether `exc` is a command a Lua script ran being refused (not the keys the script declares). */
export function isScriptRefusal(exc: unknown): boolean {
  const text = textOf(exc).replace(/^(ERR|NOPERM) /, "").toLowerCase();
  return SCRIPT_REFUSALS.some((start) => text.startsWith(start));
}

/** Whether `exc` is Redis refusing a command or a key for the user's ACL rules. */
export function isDenied(exc: unknown): boolean {
  if (exc instanceof AccessDenied) return true;
  if (textOf(exc).startsWith("NOPERM") || isScriptRefusal(exc)) return true;
  // A transaction discarded for a refused command: ioredis lists the refusal in previousErrors.
  const previous = exc !== null && typeof exc === "object" ? (exc as { previousErrors?: unknown }).previousErrors : undefined;
  return Array.isArray(previous) && previous.some((e) => e !== exc && isDenied(e));
}

/** The AccessDenied for `exc`, raised while `doing` (`command` on `key` when known) by `who`. */
export function accessDenied(exc: unknown, doing: string, command: string | undefined, key: string | undefined, who: Acting): AccessDenied {
  if (exc instanceof AccessDenied) return exc;
  const user = who.user ? `ACL user '${who.user}'` : "this ACL user";
  // The command's name in capitals; a script's name after EVALSHA as it is ("EVALSHA submit").
  const what = [command?.replace(/^\S+/, (name) => name.toUpperCase()), key && `on key '${key}'`].filter((part) => part).join(" ");
  const previous = exc !== null && typeof exc === "object" ? (exc as { previousErrors?: unknown }).previousErrors : undefined;
  const refusal = Array.isArray(previous) ? previous.find((e) => isDenied(e)) ?? exc : exc;
  return new AccessDenied(
    `cannot ${doing}: Redis refused ${what || "it"} for ${user}, whose ACL rule does not allow it (${textOf(refusal)}); ` +
      `this needs the ${who.role} rule (\`titan acl ${who.role} ...\`) for what it is doing`,
    { cause: exc },
  );
}
