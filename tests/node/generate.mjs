// Drives the service with the official OpenAI Node SDK, as the qubittron document's example
// does, and prints what the SDK handed back as JSON for the Python test to check.
import { createRequire } from "node:module";

// The SDK lives wherever the test installed it (OPENAI_NODE_MODULES), not beside this file.
const require = createRequire(`${process.env.OPENAI_NODE_MODULES}/`);
const { OpenAI } = require("openai");

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const result = await client.images.generate({ model, prompt: "a small red apple on a white background", n: 2, size: "64x64" });
const images = result.data.map((item) => Buffer.from(item.b64_json, "base64"));

let notFound = null;
try {
  await client.images.generate({ model: "no-such-model", prompt: "x" });
} catch (error) {
  notFound = { status: error.status, code: error.code, requestId: error.requestID, type: error.type };
}

console.log(JSON.stringify({
  count: result.data.length,
  pngSignatures: images.map((bytes) => bytes.subarray(1, 4).toString("ascii")),
  seeds: result.data.map((item) => item.seed),
  size: result.size,
  outputFormat: result.output_format,
  notFound,
}));
