// Copies the protocol's Lua scripts (PROTOCOL.md: a client in another language runs the same
// files) from the Python package next to this one into lua/, which the published package ships.
import { cpSync, existsSync, mkdirSync, readdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const out = join(here, "lua");
const repo = resolve(here, "..", "..");

/** The first folder named lua under titan_broker/ that holds submit.lua (it may move into a subpackage). */
function find(dir, depth) {
  if (depth < 0 || !existsSync(dir)) return null;
  if (dir.endsWith("lua") && existsSync(join(dir, "submit.lua"))) return dir;
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory() && !name.startsWith(".") && name !== "__pycache__") {
      const found = find(path, depth - 1);
      if (found) return found;
    }
  }
  return null;
}

const source = find(join(repo, "titan_broker"), 3);
if (source === null) {
  if (existsSync(join(out, "submit.lua"))) process.exit(0); // a packed copy: its lua/ came along
  console.error(`copy-lua: no titan_broker/**/lua/submit.lua under ${repo}: build inside the titan-broker repository`);
  process.exit(1);
}
mkdirSync(out, { recursive: true });
for (const name of readdirSync(source)) {
  if (name.endsWith(".lua")) cpSync(join(source, name), join(out, name));
}
