// small4 chat: a single page over the server's own /v1/chat/completions (streamed SSE through fetch).
// No dependencies and no inline script, so the strict Content-Security-Policy the server sends holds.
// The conversation lives in localStorage only; the API key (when the server has one) in sessionStorage.
"use strict";

const STORE_KEY = "small4.conversation";
const KEY_KEY = "small4.apiKey";
const $ = (id) => document.getElementById(id);

const state = { messages: loadConversation(), attachments: [], controller: null, model: null };

function loadConversation() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    return Array.isArray(saved) ? saved : [];
  } catch (_) {
    return [];
  }
}

function saveConversation() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.messages));
  } catch (_) {
    showError("The conversation is too large for local storage; it will not survive a reload.");
  }
}

// ---- markdown: escape everything first, then add a few tags back; no raw HTML ever reaches innerHTML ----

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(s) {
  // s is already escaped: code spans first (their content stays literal), then bold / italics
  const parts = s.split(/(`[^`\n]+`)/g);
  return parts
    .map((p, i) => {
      if (i % 2 === 1) return "<code>" + p.slice(1, -1) + "</code>";
      return p.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>").replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    })
    .join("");
}

function renderMarkdown(text) {
  const out = [];
  const chunks = escapeHtml(text).split(/^```/m); // odd chunks are fenced code (an unclosed fence still renders)
  chunks.forEach((chunk, i) => {
    if (i % 2 === 1) {
      const nl = chunk.indexOf("\n");
      const lang = nl < 0 ? "" : chunk.slice(0, nl).trim().replace(/[^\w+-]/g, "");
      const code = nl < 0 ? "" : chunk.slice(nl + 1).replace(/\n$/, "");
      out.push('<pre><code class="lang-' + lang + '">' + code + "</code></pre>");
      return;
    }
    for (const block of chunk.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.split("\n");
      const heading = /^(#{1,4}) (.*)$/.exec(lines[0]);
      if (heading && lines.length === 1) {
        const level = heading[1].length + 2; // h3..h6: the page's own h1 stays the only top heading
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (lines.every((l) => /^\s*[-*] /.test(l))) {
        out.push("<ul>" + lines.map((l) => "<li>" + inline(l.replace(/^\s*[-*] /, "")) + "</li>").join("") + "</ul>");
      } else if (lines.every((l) => /^\s*\d+\. /.test(l))) {
        out.push("<ol>" + lines.map((l) => "<li>" + inline(l.replace(/^\s*\d+\. /, "")) + "</li>").join("") + "</ol>");
      } else {
        out.push("<p>" + lines.map(inline).join("<br>") + "</p>");
      }
    }
  });
  return out.join("");
}

// ---- rendering the conversation ----

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderMessage(m, streaming) {
  const box = el("article", "msg " + m.role);
  box.append(el("div", "role", m.role === "user" ? "You" : "Assistant"));
  for (const url of m.images || []) {
    const img = el("img");
    img.src = url;
    img.alt = "attached image";
    box.append(img);
  }
  if (m.reasoning) {
    const d = el("details", "reasoning");
    // open while it streams, closed after, unless the user chose (a click on the summary is remembered)
    d.open = typeof m.reasoningOpen === "boolean" ? m.reasoningOpen : Boolean(streaming);
    const summary = el("summary", null, streaming && !m.content ? "Reasoning…" : "Reasoning");
    summary.addEventListener("click", () => (m.reasoningOpen = !d.open));
    d.append(summary, el("div", "text", m.reasoning));
    box.append(d);
  }
  const body = el("div", "content");
  if (m.role === "assistant") body.innerHTML = renderMarkdown(m.content || "");
  else body.textContent = m.content || "";
  box.append(body);
  for (const call of m.toolCalls || []) box.append(renderToolCall(call, streaming));
  if (m.error) box.append(el("div", "error-inline error", m.error));
  if (m.stats) box.append(el("div", "stats", m.stats));
  return box;
}

// A card per call; once the answer is done the user plays the tool: the result typed here goes back as a "tool"
// message and the model continues from it.
function renderToolCall(call, streaming) {
  const card = el("section", "tool-call");
  card.setAttribute("aria-label", "tool call " + (call.name || ""));
  card.append(el("div", "name", "Tool call: " + (call.name || "?")));
  let args = call.arguments || "";
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch (_) {
    /* still streaming or not JSON: show as it came */
  }
  card.append(el("pre", "args", args));
  if (typeof call.result === "string") {
    card.append(el("div", "muted", "Result"), el("pre", "result", call.result));
  } else if (!streaming && call.id) {
    const form = el("form", "tool-result");
    const id = "result-" + call.id.replace(/[^\w-]/g, "");
    const label = el("label", null, "Result of " + (call.name || "the tool"));
    label.htmlFor = id;
    const input = el("textarea");
    input.id = id;
    input.rows = 2;
    const button = el("button", null, "Send result");
    button.type = "submit";
    form.append(label, input, button);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (state.controller) return;
      call.result = input.value;
      saveConversation();
      renderAll();
      if (state.messages[state.messages.length - 1].toolCalls.every((c) => typeof c.result === "string")) generate();
    });
    card.append(form);
  }
  return card;
}

function renderAll() {
  const main = $("messages");
  main.replaceChildren(...state.messages.map((m, i) => renderMessage(m, state.controller && i === state.messages.length - 1)));
  main.scrollTop = main.scrollHeight;
}

// Re-renders the answer being streamed (it is always the last message); follows it down unless the user scrolled up.
function rerenderLast(message, streaming) {
  if (state.messages[state.messages.length - 1] !== message) return; // "New chat" dropped it meanwhile
  const main = $("messages");
  const following = main.scrollHeight - main.scrollTop - main.clientHeight < 80;
  const last = main.lastElementChild;
  const fresh = renderMessage(message, streaming);
  if (last) last.replaceWith(fresh);
  else main.append(fresh);
  if (following) main.scrollTop = main.scrollHeight;
}

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
}

// ---- the request ----

function apiHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function numberSetting(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function apiMessages() {
  const out = [];
  const system = $("system-prompt").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of state.messages) {
    if (m.role === "user") {
      const images = (m.images || []).map((url) => ({ type: "image_url", image_url: { url } }));
      out.push({ role: "user", content: images.length ? [...images, { type: "text", text: m.content }] : m.content });
    } else if ((m.toolCalls || []).length && m.toolCalls.every((c) => c.id && typeof c.result === "string")) {
      const calls = m.toolCalls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }));
      out.push({ role: "assistant", content: m.content || null, tool_calls: calls });
      for (const c of m.toolCalls) out.push({ role: "tool", tool_call_id: c.id, content: c.result });
    } else if (m.content) {
      out.push({ role: "assistant", content: m.content }); // tool calls without a result are not sent back
    }
  }
  return out;
}

function requestBody() {
  const body = {
    messages: apiMessages(),
    stream: true,
    stream_options: { include_usage: true },
    reasoning_effort: $("effort").value,
    temperature: numberSetting("temperature"),
    top_p: numberSetting("top-p"),
    max_tokens: numberSetting("max-tokens"),
  };
  if ($("ignore-eos").checked) body.ignore_eos = true;
  if (state.model) body.model = state.model;
  const tools = $("tools").value.trim();
  if (tools) body.tools = JSON.parse(tools); // a SyntaxError is shown to the user by send()
  return body;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return (j.error && j.error.message) || resp.statusText;
  } catch (_) {
    return resp.statusText || "request failed";
  }
}

function applyDelta(m, delta) {
  if (delta.content) m.content += delta.content;
  if (delta.reasoning_content) m.reasoning = (m.reasoning || "") + delta.reasoning_content;
  for (const t of delta.tool_calls || []) {
    m.toolCalls = m.toolCalls || [];
    const slot = (m.toolCalls[t.index || 0] = m.toolCalls[t.index || 0] || { name: "", arguments: "" });
    if (t.id) slot.id = t.id;
    if (t.function && t.function.name) slot.name += t.function.name;
    if (t.function && t.function.arguments) slot.arguments += t.function.arguments;
  }
  return Boolean(delta.content || delta.reasoning_content || delta.tool_calls);
}

// Reads `data: ...` events off the body; calls onEvent with each parsed JSON object, stops at [DONE].
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("send").disabled = busy;
  $("messages").setAttribute("aria-busy", String(busy)); // screen readers read the answer once, not per chunk
}

function send() {
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return;
  state.messages.push({ role: "user", content: text, images: state.attachments.slice() });
  if (!generate()) {
    state.messages.pop();
    return;
  }
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
}

// Streams one answer to the conversation as it stands; false (nothing sent) when the settings are not valid.
function generate() {
  showError("");
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError("Tools must be a JSON list: " + e.message);
    return false;
  }
  stream(body);
  return true;
}

async function stream(body) {
  const answer = { role: "assistant", content: "", reasoning: "", toolCalls: [] };
  state.messages.push(answer);
  state.controller = new AbortController();
  setBusy(true);
  renderAll();
  const t0 = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!resp.ok) {
      const msg = await errorText(resp);
      if (resp.status === 401) askForKey();
      throw new Error(resp.status + ": " + msg);
    }
    await readSSE(resp, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (applyDelta(answer, choice.delta || {})) {
          chunks += 1;
          if (first === null) first = performance.now();
        }
        if (choice.finish_reason) answer.finish = choice.finish_reason;
      }
      rerenderLast(answer, true);
    });
  } catch (e) {
    if (e.name === "AbortError") answer.finish = "stopped";
    else {
      answer.error = e.message;
      showError(e.message);
    }
  } finally {
    const end = performance.now();
    answer.stats = stats(t0, first, end, usage ? usage.completion_tokens : chunks, answer.finish);
    state.controller = null;
    setBusy(false);
    rerenderLast(answer, false);
    saveConversation();
  }
}

function stats(t0, first, end, tokens, finish) {
  const parts = [];
  if (first !== null) {
    parts.push("TTFT " + ((first - t0) / 1000).toFixed(2) + " s");
    const secs = (end - first) / 1000;
    if (tokens > 1 && secs > 0) parts.push(((tokens - 1) / secs).toFixed(1) + " tok/s");
    parts.push(tokens + " tokens");
  }
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

// ---- images: file picker, paste, drag and drop; all become data URLs ----

function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => {
      state.attachments.push(reader.result);
      renderAttachments();
    };
    reader.readAsDataURL(f);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren(
    ...state.attachments.map((url, i) => {
      const fig = el("figure");
      const img = el("img");
      img.src = url;
      img.alt = "image to send " + (i + 1);
      const remove = el("button", null, "×");
      remove.type = "button";
      remove.setAttribute("aria-label", "remove image " + (i + 1));
      remove.addEventListener("click", () => {
        state.attachments.splice(i, 1);
        renderAttachments();
      });
      fig.append(img, remove);
      return fig;
    }),
  );
}

// ---- the API key ----

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

async function probe() {
  // /v1/models tells whether the key works (and the model's name) without spending a generation
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: apiHeaders() });
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return;
  }
  if (resp.status === 401) {
    askForKey();
    if (sessionStorage.getItem(KEY_KEY)) showError("The API key was refused: " + (await errorText(resp)));
    return;
  }
  if (!resp.ok) {
    showError("The server answered " + resp.status + ": " + (await errorText(resp)));
    return;
  }
  $("key-form").hidden = true;
  showError("");
  const models = await resp.json();
  state.model = models.data && models.data[0] ? models.data[0].id : null;
  $("model-name").textContent = state.model || "";
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!state.controller) send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (!state.controller) send();
    }
  });
  $("prompt").addEventListener("paste", (e) => addFiles(e.clipboardData ? e.clipboardData.files : []));
  const composer = $("composer");
  composer.addEventListener("dragover", (e) => {
    e.preventDefault();
    composer.classList.add("dragging");
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  composer.addEventListener("drop", (e) => {
    e.preventDefault();
    composer.classList.remove("dragging");
    addFiles(e.dataTransfer ? e.dataTransfer.files : []);
  });
  $("image-input").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    saveConversation();
    renderAll();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_KEY, $("api-key").value);
    probe();
  });
}

wire();
renderAll();
probe();
