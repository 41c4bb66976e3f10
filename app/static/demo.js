"use strict";
// The demo page: upload an image, show /predict's top 5 and /attention's heatmap. No build step.
// Its URLs are relative to the page's <base> (why: app/routes/demo.py).

const element = (id) => document.getElementById(id);
let currentFile = null;
let heatmapUrl = null;
let previewUrl = null;
// What was asked last: an answer to an older upload or choice that arrives after a newer one was asked
// for (a slow gradient map, say) is dropped, rather than shown under the newer one's name.
let analysing = 0;
let explaining = 0;
// The class whose gradient map is shown, picked from the top 5 ({ label, index }); null: the top-1, as the
// server defaults. It is asked for by index: a class named "7" would be read as the index 7.
let explainedClass = null;

function showStatus(message, isError = false) {
  element("status").textContent = message;
  element("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  if (response.status === 401) {  // a server with VIT_API_KEY: the page asks for the key, sent from then on
    element("key-form").hidden = false;
    element("api-key").focus();
    return element("api-key").value ? "the server refused this API key" : "this server asks for an API key";
  }
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// The choices come from the API's own contract, so the page never offers what the server refuses.
async function loadChoices() {
  const api = await (await fetch("openapi.json")).json();
  const parameters = api.paths["/attention"].post.parameters;
  for (const name of ["method", "colormap"]) {
    const schema = parameters.find((parameter) => parameter.name === name).schema;
    for (const value of schema.enum) {
      element(name).add(new Option(value, value, false, value === schema.default));
    }
  }
}

async function describeModel() {
  const response = await fetch("model");
  if (!response.ok) {
    element("model-name").textContent = `the model is not ready: ${await errorMessage(response)}`;
    return;
  }
  const model = await response.json();
  const accuracy = model.training?.test_accuracy;
  element("model-name").textContent =
    `${model.name}: ${model.parameters.toLocaleString()} parameters, ${model.classes.length} classes` +
    (accuracy ? `, ${(100 * accuracy).toFixed(2)} % test accuracy` : "");
}

// A POST of the file, with the API key that the page was given, if any.
function upload(url, file) {
  const body = new FormData();
  body.append("file", file, file.name);
  const key = element("api-key").value;
  return fetch(url, { method: "POST", body, headers: key ? { Authorization: `Bearer ${key}` } : {} });
}

function markExplained() {
  for (const button of element("predictions").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.index === String(explainedClass?.index)));
  }
}

// A class of the top 5, clicked: its gradient map, what in the image speaks for that class.
function explainClass(label, index) {
  explainedClass = { label, index };
  element("method").value = "gradient";
  markExplained();
  reexplain();
}

function showPredictions(predictions) {
  const list = element("predictions");
  list.replaceChildren(
    ...predictions.map(({ label, index, probability }) => {
      const item = document.createElement("li");
      const name = Object.assign(document.createElement("button"), {
        type: "button",
        className: "label",
        textContent: label,
        title: `what in the image speaks for ${label}`,
      });
      name.dataset.index = String(index);
      name.addEventListener("click", () => explainClass(label, index));
      const bar = Object.assign(document.createElement("span"), { className: "bar" });
      const fill = document.createElement("span");
      fill.style.width = `${(100 * probability).toFixed(1)}%`;
      bar.append(fill);
      const percent = Object.assign(document.createElement("span"), {
        className: "percent",
        textContent: `${(100 * probability).toFixed(1)} %`,
      });
      item.append(name, bar, percent);
      return item;
    }),
  );
}

async function classify(file, analysis) {
  const response = await upload("predict", file);
  if (!response.ok) throw new Error(await errorMessage(response));
  const answer = await response.json();
  if (analysis === analysing) {
    showPredictions(answer.results[0].predictions);
    markExplained();
  }
}

async function explain(file) {
  const explanation = ++explaining;
  const method = element("method").value;
  const target = method === "gradient" ? explainedClass : null;
  const query = new URLSearchParams({ method, colormap: element("colormap").value });
  if (target !== null) query.set("target", String(target.index));
  const response = await upload(`attention?${query}`, file);
  if (!response.ok) throw new Error(await errorMessage(response));
  const heatmap = await response.blob();
  if (explanation !== explaining) return;
  if (heatmapUrl) URL.revokeObjectURL(heatmapUrl);
  heatmapUrl = URL.createObjectURL(heatmap);
  element("heatmap").src = heatmapUrl;
  element("heatmap-caption").textContent = `attention: ${method}` + (target !== null ? `, for ${target.label}` : "");
}

// The upload as the browser shows it; in a format it does not show (Chromium shows no HEIC and no TIFF), as the
// server decoded it, upright: /attention's overlay at no opacity is the picture alone.
async function previewOf(file) {
  const local = URL.createObjectURL(file);
  const probe = new Image();
  probe.src = local;
  try {
    await probe.decode();
    return local;
  } catch {
    URL.revokeObjectURL(local);
  }
  const response = await upload("attention?alpha=0", file);
  if (!response.ok) throw new Error(await errorMessage(response));
  return URL.createObjectURL(await response.blob());
}

async function analyse(file) {
  const analysis = ++analysing;
  currentFile = file;
  explainedClass = null;  // a new image is explained for its own top-1 first
  showStatus(`analysing ${file.name}...`);
  try {
    const [, , preview] = await Promise.all([classify(file, analysis), explain(file), previewOf(file)]);
    if (analysis !== analysing) return URL.revokeObjectURL(preview);
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = preview;
    element("preview").src = previewUrl;
    element("results").hidden = false;
    showStatus(file.name);
  } catch (error) {
    if (analysis !== analysing) return;
    element("results").hidden = true;
    showStatus(error.message, true);
  }
}

async function reexplain() {
  if (!currentFile || element("results").hidden) return;
  const explanation = explaining + 1;
  try {
    await explain(currentFile);
  } catch (error) {
    if (explanation === explaining) showStatus(error.message, true);
  }
}

function acceptDrops() {
  const zone = element("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    if (file) {
      analyse(file);
    } else {  // a link, text, or in some browsers an image dragged out of a page: an address this page may not fetch
      showStatus(
        "this drop holds no file, only text or an address (a link, or an image dragged out of a web page): " +
          "save the image, then drop or choose the file",
        true,
      );
    }
  });
}

element("file-input").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) analyse(file);
});
element("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (currentFile) analyse(currentFile);
});
element("method").addEventListener("change", () => {
  if (element("method").value !== "gradient") explainedClass = null;  // only a gradient map is of a chosen class
  markExplained();
  reexplain();
});
element("colormap").addEventListener("change", reexplain);
acceptDrops();
loadChoices();
describeModel();
