// The audit page. Captions are untrusted LMM text: they only ever go into the DOM through textContent.
"use strict";

let state = null; // from /api/state: total, labelled, first_unlabelled, labels, choices
let index = 0; // the item shown
let ticket = 0; // the latest item request: an older answer arriving late is not drawn
let saving = false; // one answer at a time, so a quick double key press cannot label the wrong item

const $ = (id) => document.getElementById(id);

function setText(el, value, fallback) {
  el.textContent = value === null || value === undefined || value === "" ? fallback : String(value);
}

function setStatus(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (err) {
      // not JSON: keep the status line
    }
    throw new Error(message);
  }
  return response.json();
}

function placeholder(message) {
  const box = document.createElement("div");
  box.className = "placeholder";
  box.textContent = message;
  return box;
}

function renderChoices() {
  const box = $("choices");
  box.replaceChildren();
  for (const choice of state.choices) {
    const button = document.createElement("button");
    button.id = `label-${choice.key}`;
    button.dataset.label = choice.key;
    const key = document.createElement("kbd");
    key.textContent = choice.shortcut;
    button.append(key, document.createTextNode(choice.name));
    button.addEventListener("click", () => answer(choice.key));
    box.append(button);
  }
}

function renderProgress() {
  $("progress").textContent = `${state.labelled} of ${state.total} labelled`;
}

function viewCard(view) {
  const card = document.createElement("div");
  card.className = "view";
  if (view.image) {
    const img = document.createElement("img");
    img.src = view.image;
    img.alt = `view ${view.view_index}`;
    img.addEventListener("error", () => img.replaceWith(placeholder("image failed to load")));
    card.append(img);
  } else {
    card.append(placeholder("no image"));
  }
  const info = document.createElement("div");
  info.className = "info";
  const parts = [`view ${view.view_index}` + (view.view ? ` (${view.view})` : "")];
  parts.push(`captioned as ${view.view_type || "?"}`);
  parts.push(`wearer's left on image: ${view.wearer_left_on_image || "?"}`);
  if (!view.kept) parts.push("not a kept view");
  info.textContent = parts.join(" · ");
  const caption = document.createElement("p");
  setText(caption, view.caption, "(no caption for this view)");
  card.append(info, caption);
  return card;
}

async function show(i) {
  if (state.total === 0) {
    $("position").textContent = "the sample is empty";
    return;
  }
  const want = Math.max(0, Math.min(state.total - 1, i));
  const mine = ++ticket;
  let item;
  try {
    item = await api(`/api/items/${want}`);
  } catch (err) {
    setStatus(`cannot load item ${want + 1}: ${err.message}`, true);
    return;
  }
  if (mine !== ticket) return;
  index = want;
  $("position").textContent = `item ${index + 1} / ${item.total}`;
  setText($("dataset"), item.dataset, "?");
  setText($("product"), item.product_id, "?");
  setText($("category"), item.category, "no category");
  setText($("short"), item.short_caption, "(no short caption)");
  setText($("long"), item.long_caption, "(no long caption)");
  for (const button of document.querySelectorAll("#choices button")) {
    button.classList.toggle("chosen", button.dataset.label === item.label);
  }
  const views = $("views");
  views.replaceChildren(...item.views.map(viewCard));
  if (item.views.length === 0) views.append(placeholder("this product has no views"));
  document.body.dataset.index = String(index);
  window.scrollTo(0, 0);
}

async function answer(label) {
  if (saving || state.total === 0) return;
  saving = true;
  const at = index;
  try {
    state = await api(`/api/labels/${at}`, {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label }),
    });
  } catch (err) {
    setStatus(`not saved: ${err.message}`, true);
    saving = false;
    return;
  }
  renderProgress();
  setStatus(`saved item ${at + 1}`, false);
  try {
    if (at + 1 < state.total) await show(at + 1);
    else if (state.first_unlabelled !== null) await show(state.first_unlabelled);
    else {
      await show(at);
      setStatus(`all ${state.total} items labelled: now run fashionmv audit score`, false);
    }
  } finally {
    saving = false;
  }
}

function onKey(event) {
  if (!state || event.ctrlKey || event.metaKey || event.altKey) return;
  const choice = state.choices.find((c) => c.shortcut === event.key);
  if (choice) answer(choice.key);
  else if (event.key === "ArrowRight" || event.key === "j") show(index + 1);
  else if (event.key === "ArrowLeft" || event.key === "k") show(index - 1);
  else if (event.key === "u" && state.first_unlabelled !== null) show(state.first_unlabelled);
  else return;
  event.preventDefault();
}

async function start() {
  try {
    state = await api("/api/state");
  } catch (err) {
    setStatus(`cannot reach the audit server: ${err.message}`, true);
    return;
  }
  renderChoices();
  renderProgress();
  $("prev").addEventListener("click", () => show(index - 1));
  $("next").addEventListener("click", () => show(index + 1));
  $("todo").addEventListener("click", () => state.first_unlabelled !== null && show(state.first_unlabelled));
  document.addEventListener("keydown", onKey);
  // Resume where the audit stopped: the first unlabelled item.
  await show(state.first_unlabelled ?? 0);
}

start();
