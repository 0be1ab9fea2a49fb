// The Node caller of bench_node.py: the B workload (64 calls in flight, `add`) through the Node
// client (clients/node, built by `npm ci` there), one round per run. Prints one JSON line:
// {"rate": calls/s, "cpu_us_per_call": this process's user + system CPU per call}.
// Run by bench_node.py: node bench/bench_node.mjs URL NAMESPACE CALLS
import { connect } from "../clients/node/dist/index.js";

const [url, namespace, callsText] = process.argv.slice(2);
const calls = Number(callsText);
const IN_FLIGHT = 64;
const client = await connect(url, { namespace });
const calc = client.service("calculator");

async function round(n) {
  const perTask = Math.floor(n / IN_FLIGHT);
  const task = async () => {
    for (let i = 0; i < perTask; i++) await calc.add(i, 1);
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, task));
  return perTask * IN_FLIGHT;
}

await round(IN_FLIGHT * 10); // warm-up: links, JIT
const cpu = process.cpuUsage();
const started = performance.now();
const done = await round(calls);
const seconds = (performance.now() - started) / 1000;
const used = process.cpuUsage(cpu);
console.log(JSON.stringify({ rate: done / seconds, cpu_us_per_call: (used.user + used.system) / done }));
await client.close();
