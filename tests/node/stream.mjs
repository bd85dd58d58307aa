// Streams a generation with the official OpenAI Node SDK (`stream: true`, `partial_images`)
// and prints the events it iterated, summarised, as JSON for the Python test to check.
import { createRequire } from "node:module";

const require = createRequire(`${process.env.OPENAI_NODE_MODULES}/`);
const { OpenAI } = require("openai");

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const stream = await client.images.generate({
  model,
  prompt: "a small red apple on a white background",
  n: 2,
  size: "64x64",
  stream: true,
  partial_images: 2,
  seed: 21,
});
const events = [];
for await (const event of stream) {
  const bytes = Buffer.from(event.b64_json, "base64");
  events.push({
    type: event.type,
    imageIndex: event.image_index,
    partialImageIndex: event.partial_image_index ?? null,
    signature: bytes.subarray(1, 4).toString("ascii"),
    size: event.size,
    seed: event.seed ?? null,
    creditsCharged: event.credits_charged ?? null,
  });
}
console.log(JSON.stringify({ events }));
