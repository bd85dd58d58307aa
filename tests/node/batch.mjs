// The Batch API with the official OpenAI Node SDK, unchanged: upload a JSONL file, create a
// batch, poll it, download its output and error files, list and delete; prints what the SDK
// handed back as JSON for the Python test to check.
import { createRequire } from "node:module";

const require = createRequire(`${process.env.OPENAI_NODE_MODULES}/`);
const { OpenAI, toFile } = require("openai");

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const line = (customId, body) =>
  JSON.stringify({ custom_id: customId, method: "POST", url: "/v1/images/generations", body: { model, num_inference_steps: 4, ...body } });
const jsonl = [line("valid", { prompt: "a lighthouse", n: 2, seed: 11 }), line("invalid", { prompt: "x", size: "13x13" })].join("\n") + "\n";

const uploaded = await client.files.create({ file: await toFile(Buffer.from(jsonl), "requests.jsonl"), purpose: "batch" });
const created = await client.batches.create({ input_file_id: uploaded.id, endpoint: "/v1/images/generations", completion_window: "24h" });

const deadline = Date.now() + 180_000;
let batch = created;
while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
  if (Date.now() > deadline) throw new Error(`batch ${batch.id} is still ${batch.status}`);
  await new Promise((resolve) => setTimeout(resolve, 500));
  batch = await client.batches.retrieve(created.id);
}
const linesOf = async (id) => (await (await client.files.content(id)).text()).trim().split("\n").map((text) => JSON.parse(text));
const output = await linesOf(batch.output_file_id);
const errors = await linesOf(batch.error_file_id);
const listed = await client.batches.list();
const deleted = await client.files.del ? await client.files.del(uploaded.id) : await client.files.delete(uploaded.id);

console.log(JSON.stringify({
  uploadedPurpose: uploaded.purpose,
  createdStatus: created.status,
  status: batch.status,
  counts: batch.request_counts,
  output: output.map((entry) => ({ customId: entry.custom_id, status: entry.response.status_code, seeds: entry.response.body.data.map((d) => d.seed) })),
  errors: errors.map((entry) => ({ customId: entry.custom_id, status: entry.response.status_code, param: entry.response.body.error.param })),
  listedFirst: listed.data[0].id === created.id,
  deleted: deleted.deleted,
}));
