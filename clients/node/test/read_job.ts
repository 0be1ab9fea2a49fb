/** A second Node process for the jobs test: reads a job by its id and prints its state and result. */
import { connect } from "titan-broker";

const [url, id] = process.argv.slice(2);
const client = await connect(url);
try {
  const job = client.job<number>(id!);
  const result = await job.result({ timeout: 20 });
  console.log(JSON.stringify({ state: (await job.status()).state, result }));
} finally {
  await client.close();
}
