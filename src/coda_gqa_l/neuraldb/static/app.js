// coda-db web page: ingest, list, pick a document, ask; the answer streams in as it is generated.
"use strict";

const $ = (id) => document.getElementById(id);
let selectedId = null;

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  let size = n / 1024;
  for (const unit of ["KiB", "MiB", "GiB"]) {
    if (size < 1024) return `${size.toFixed(1)} ${unit}`;
    size /= 1024;
  }
  return `${size.toFixed(1)} TiB`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// The server's error as one line: FastAPI sends {"detail": "..."} or a list of validation errors.
async function errorMessage(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (Array.isArray(body.detail)) {
      detail = body.detail.map((d) => String(d.msg).replace(/^Value error, /, "")).join("; ");
    } else if (body.detail) {
      detail = String(body.detail);
    }
  } catch (_) {
    // not JSON: keep the status text
  }
  return `${detail} (HTTP ${response.status})`;
}

// The access token, when the service asks for one: opened as /?token=..., kept for this tab only.
const TOKEN = (() => {
  const given = new URLSearchParams(window.location.search).get("token");
  if (given) {
    sessionStorage.setItem("coda-db-token", given);
    window.history.replaceState(null, "", window.location.pathname);  // not left in the address bar
  }
  return sessionStorage.getItem("coda-db-token");
})();

async function api(path, options = {}) {
  if (TOKEN) options.headers = { ...(options.headers || {}), Authorization: `Bearer ${TOKEN}` };
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "secondary";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function select(doc) {
  selectedId = doc ? doc.id : null;
  $("ask-button").disabled = !doc;
  $("selected").textContent = doc
    ? `Asking document #${doc.id} “${doc.label}” (${doc.tokens.toLocaleString()} tokens, ` +
      `state ${formatBytes(doc.state_bytes)} in place of a ${formatBytes(doc.full_cache_bytes)} full cache).`
    : "No document selected: pick one in the list.";
  for (const row of document.querySelectorAll("#documents tbody tr")) {
    row.classList.toggle("selected", Number(row.dataset.id) === selectedId);
  }
}

async function refresh(pickId) {
  const docs = await (await api("/api/documents")).json();
  const body = document.querySelector("#documents tbody");
  body.replaceChildren();
  for (const doc of docs) {
    const row = body.insertRow();
    row.dataset.id = doc.id;
    const pick = row.insertCell();
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "document";
    radio.id = `doc-${doc.id}`;
    radio.value = doc.id;
    radio.addEventListener("change", () => select(doc));
    const label = document.createElement("label");
    label.htmlFor = radio.id;
    label.textContent = ` ${doc.label}`;
    pick.append(radio, label);
    cell(row, String(doc.id), "num");
    cell(row, doc.tokens.toLocaleString(), "num");
    cell(row, formatBytes(doc.state_bytes), "num state-size");
    cell(row, formatBytes(doc.full_cache_bytes), "num full-cache-size");
    cell(row, doc.created.replace("T", " ").slice(0, 19));
    const actions = row.insertCell();
    actions.className = "actions";
    actions.append(
      button("Export", `Export the state of ${doc.label}`, () => exportState(doc).catch((e) => showError(e.message))),
      button("Delete", `Delete ${doc.label}`, () => remove(doc).catch((e) => showError(e.message))),
    );
  }
  $("documents").hidden = docs.length === 0;
  $("empty").hidden = docs.length > 0;
  const wanted = docs.find((d) => d.id === (pickId ?? selectedId));
  if (wanted) $(`doc-${wanted.id}`).checked = true;
  select(wanted || null);
}

// An ingest with ?progress=1: the status counts the tokens read as the service reports them (a long document on a
// CPU reads for minutes); resolves to the stored document, or throws the service's reason.
async function ingestWithProgress(path, options) {
  const response = await api(`${path}?progress=1`, options);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const event = JSON.parse(buffered.slice(0, end));
      buffered = buffered.slice(end + 1);
      if (event.status === undefined) {
        const share = event.total ? Math.floor((100 * event.read) / event.total) : 0;
        $("ingest-status").textContent =
          `Reading the document through the model: ${event.read.toLocaleString()} of ` +
          `${event.total.toLocaleString()} tokens (${share}%)…`;
      } else if (event.status >= 400) {
        throw new Error(event.detail);
      } else {
        return event.document;
      }
    }
  }
  throw new Error("The service closed the connection before the document was stored.");
}

// askedLabel: the label the user gave (or the file's name); a document already stored keeps its first label
async function afterIngest(doc, askedLabel) {
  const relabel = askedLabel && askedLabel !== doc.label ? ` It keeps that label, not “${askedLabel}”.` : "";
  $("ingest-status").textContent = doc.duplicate
    ? `Already stored as #${doc.id} “${doc.label}”.${relabel}`
    : `Stored #${doc.id} “${doc.label}”: ${doc.tokens.toLocaleString()} tokens, ` +
      `state ${formatBytes(doc.state_bytes)} (the full cache would be ${formatBytes(doc.full_cache_bytes)}).`;
  await refresh(doc.id);
}

async function withBusy(form, status, work) {
  showError("");
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  if (status) $("ingest-status").textContent = status;
  try {
    await work();
  } catch (e) {
    if (status) $("ingest-status").textContent = "";
    showError(e.message);
  } finally {
    submit.disabled = form.id === "ask-form" && selectedId === null;
  }
}

$("paste-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  withBusy(form, "Reading the document through the model…", async () => {
    const text = $("paste-text").value;
    if (!text.trim()) throw new Error("The text is empty: paste a document first.");
    const label = $("paste-label").value.trim() || null;
    const doc = await ingestWithProgress("/api/documents", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, label }),
    });
    // cleared only if still what was sent: what the user typed while it read stays
    if ($("paste-text").value === text && ($("paste-label").value.trim() || null) === label) form.reset();
    await afterIngest(doc, label);
  });
});

$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  withBusy(form, "Uploading and reading the document through the model…", async () => {
    const data = new FormData();
    const file = $("upload-file").files[0];
    data.append("file", file);
    const label = $("upload-label").value.trim();
    if (label) data.append("label", label);
    const doc = await ingestWithProgress("/api/documents/upload", { method: "POST", body: data });
    if ($("upload-file").files[0] === file && $("upload-label").value.trim() === label) form.reset();
    await afterIngest(doc, label || file?.name);
  });
});

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const answer = $("answer");
  withBusy(form, null, async () => {
    if (selectedId === null) throw new Error("Pick a document first.");
    answer.textContent = "";
    answer.setAttribute("aria-busy", "true");
    try {
      const response = await api(`/api/documents/${selectedId}/ask`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          question: $("question").value,
          max_new_tokens: Number($("max-new-tokens").value) || 96,
        }),
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        answer.textContent += decoder.decode(value, { stream: true });
      }
      answer.textContent += decoder.decode();
      if (!answer.textContent) answer.textContent = "(the model answered with nothing)";
    } finally {
      answer.setAttribute("aria-busy", "false");
    }
  });
});

async function exportState(doc) {
  showError("");
  const response = await api(`/api/documents/${doc.id}/export`, { method: "POST" });
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${doc.id}-${doc.label.replace(/[^A-Za-z0-9._-]+/g, "-")}.state`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function remove(doc) {
  if (!window.confirm(`Delete document #${doc.id} “${doc.label}” and its state?`)) return;
  showError("");
  await api(`/api/documents/${doc.id}`, { method: "DELETE" });
  if (selectedId === doc.id) selectedId = null;
  await refresh();
}

refresh().catch((e) => showError(`Could not load the documents: ${e.message}`));
