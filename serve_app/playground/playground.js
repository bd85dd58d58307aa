// The playground's behaviour: list the key's models, stream a generation (OpenAI's image
// streaming events over fetch), show previews as they arrive, then each image with its
// seed, a download link, and the credits charged and remaining.
"use strict";

// The key lives in this tab's sessionStorage (gone when the tab closes); only with "Remember
// key on this device" ticked does it go to localStorage, which outlives the tab.
const KEY_STORAGE = "imagegen.apiKey";
const $ = (id) => document.getElementById(id);
const MIME = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || localStorage.getItem(KEY_STORAGE) || "";
}

function keyPlaceholder() {
  if (localStorage.getItem(KEY_STORAGE)) return "key remembered on this device";
  if (sessionStorage.getItem(KEY_STORAGE)) return "key kept for this tab";
  return "qbt_... API key";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const select = $("model");
  select.replaceChildren();
  if (!apiKey()) {
    setStatus("Paste an API key and press “Use key”.");
    return;
  }
  const response = await fetch("v1/models", { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (!response.ok) {
    setStatus(`Could not list models: ${await errorText(response)}`, true);
    return;
  }
  const models = (await response.json()).data;
  for (const model of models) select.append(new Option(model.id, model.id));
  setStatus(models.length ? "Ready." : "This key may use no model.", !models.length);
}

function readFileAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const body = { model: $("model").value, prompt: $("prompt").value, stream: true };
  body.n = Number($("n").value || 1);
  body.partial_images = Number($("partial_images").value);
  body.output_format = $("output_format").value;
  const text = { negative_prompt: "negative_prompt", size: "size", aspect_ratio: "aspect_ratio" };
  for (const [field, id] of Object.entries(text)) if ($(id).value.trim()) body[field] = $(id).value.trim();
  const numbers = { num_inference_steps: "num_inference_steps", guidance: "guidance", seed: "seed", strength: "strength" };
  for (const [field, id] of Object.entries(numbers)) if ($(id).value !== "") body[field] = Number($(id).value);
  const file = $("image").files[0];
  if (file) body.image = await readFileAsDataURL(file);
  else delete body.strength;
  return body;
}

// Server-sent events from a fetch body: yields {event, data} as each one completes.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function slot(index) {
  let figure = document.querySelector(`figure[data-index="${index}"]`);
  if (!figure) {
    figure = document.createElement("figure");
    figure.dataset.index = index;
    const img = document.createElement("img");
    img.alt = `image ${index + 1}`;
    const caption = document.createElement("figcaption");
    caption.append(document.createElement("span"), document.createElement("a"));
    figure.append(img, caption);
    const figures = [...$("results").children];
    const after = figures.find((other) => Number(other.dataset.index) > index);
    $("results").insertBefore(figure, after || null);
  }
  return figure;
}

function showPreview(event) {
  const figure = slot(event.image_index);
  figure.querySelector("img").src = `data:${MIME[event.output_format]};base64,${event.b64_json}`;
  figure.querySelector("span").textContent = `preview ${event.partial_image_index + 1}, step ${event.step}/${event.total_steps}`;
}

function showImage(event) {
  const figure = slot(event.image_index);
  const url = `data:${MIME[event.output_format]};base64,${event.b64_json}`;
  const img = figure.querySelector("img");
  img.src = url;
  img.dataset.final = "true";
  figure.querySelector("span").textContent = `seed ${event.seed} · ${event.size}`;
  const link = figure.querySelector("a");
  link.href = url;
  link.download = `imagegen-${event.seed}.${event.output_format}`;
  link.textContent = "Download";
  $("credits").textContent = `Credits charged: ${event.credits_charged} · remaining: ${event.credits_remaining}`;
}

async function generate(submit) {
  submit.preventDefault();
  if (!apiKey()) {
    setStatus("Paste an API key first.", true);
    return;
  }
  $("generate").disabled = true;
  $("results").replaceChildren();
  $("credits").textContent = "";
  setStatus("Generating…");
  try {
    const response = await fetch("v1/images/generations", {
      method: "POST",
      headers: { Authorization: `Bearer ${apiKey()}`, "Content-Type": "application/json" },
      body: JSON.stringify(await requestBody()),
    });
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return;
    }
    let completed = 0;
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === "error") {
        setStatus(`Failed: ${data.error.message}`, true);
        return;
      }
      if (data.type.endsWith(".partial_image")) showPreview(data);
      else if (data.type.endsWith(".completed")) {
        showImage(data);
        completed += 1;
      }
    }
    setStatus(`Done: ${completed} image${completed === 1 ? "" : "s"}.`);
  } catch (error) {
    setStatus(`Failed: ${error.message}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

$("save-key").addEventListener("click", () => {
  const key = $("api-key").value.trim();
  if (key) {
    // One place at a time: a key kept for the tab never leaves an older remembered one behind.
    const [keep, drop] = $("remember-key").checked ? [localStorage, sessionStorage] : [sessionStorage, localStorage];
    keep.setItem(KEY_STORAGE, key);
    drop.removeItem(KEY_STORAGE);
  }
  $("api-key").value = "";
  $("api-key").placeholder = keyPlaceholder();
  loadModels();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  localStorage.removeItem(KEY_STORAGE);
  $("remember-key").checked = false;
  $("api-key").placeholder = keyPlaceholder();
  loadModels();
});
$("generate-form").addEventListener("submit", generate);
$("remember-key").checked = Boolean(localStorage.getItem(KEY_STORAGE));
$("api-key").placeholder = keyPlaceholder();
loadModels();
