// Drives POST /v1/images/edits with the official OpenAI Node SDK (images.edit with a mask),
// and prints what the SDK handed back as JSON for the Python test to check.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(`${process.env.OPENAI_NODE_MODULES}/`);
const { OpenAI, toFile } = require("openai");

const [baseURL, apiKey, model, imagePath, maskPath] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const result = await client.images.edit({
  model,
  prompt: "a red circle",
  image: await toFile(readFileSync(imagePath), "input.png", { type: "image/png" }),
  mask: await toFile(readFileSync(maskPath), "mask.png", { type: "image/png" }),
  n: 2,
  size: "64x64",
  seed: 11,
});

console.log(JSON.stringify({
  count: result.data.length,
  images: result.data.map((item) => item.b64_json),
  seeds: result.data.map((item) => item.seed),
  size: result.size,
}));
