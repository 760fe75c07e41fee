// The page of edgekt serve: plain JavaScript, no build step, no third-party code.
// Labels are shown with textContent only (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
let health = null;
let lastPhoto = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = sessionStorage.getItem("edgekt-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function call(method, url, body, contentType) {
  const init = { method: method, headers: headers(contentType ? { "Content-Type": contentType } : {}) };
  if (body !== undefined) init.body = body;
  const res = await fetch(url, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const msg = data && data.error ? data.error.message : res.status + " " + res.statusText;
    throw new Error(msg);
  }
  return data;
}

function show(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function refreshHealth() {
  try {
    health = await call("GET", "/healthz");
    const caps = Object.keys(health.capabilities).filter((k) => health.capabilities[k]);
    let text = "model version " + health.version + " · " + caps.join(", ");
    if (health.mqtt && !health.mqtt.connected) text += " · MQTT broker unreachable";
    show($("status"), text, false);
    $("status").classList.toggle("degraded", health.status !== "ok");
    $("token-section").hidden = !health.auth_required;
    $("enroll-section").hidden = !health.capabilities.fewshot;
    $("classes-section").hidden = !health.capabilities.fewshot;
    $("predict-title").hidden = !health.capabilities.predict;
    if (health.capabilities.fewshot) await refreshClasses();
  } catch (e) {
    show($("status"), "service unreachable: " + e.message, true);
  }
}

async function refreshClasses() {
  const list = $("classes");
  try {
    const data = await call("GET", "/v1/fewshot/labels");
    list.replaceChildren();
    for (const item of data.labels) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = item.label + " (" + item.shots + " photo" + (item.shots === 1 ? "" : "s") + ")";
      const btn = document.createElement("button");
      btn.type = "button";
      btn.textContent = "Remove";
      btn.dataset.label = item.label;
      btn.addEventListener("click", () => removeClass(item.label));
      li.append(name, btn);
      list.append(li);
    }
    show($("classes-status"), data.labels.length ? "" : "No class enrolled yet.", false);
    $("fewshot-title").hidden = data.labels.length === 0;
    return data.labels.length;
  } catch (e) {
    show($("classes-status"), e.message, true);
    return 0;
  }
}

async function predict(file) {
  lastPhoto = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const type = file.type || "application/octet-stream";
  show($("predict-result"), "…", false);
  show($("fewshot-result"), "", false);
  if (health && health.capabilities.predict) {
    try {
      const r = await call("POST", "/v1/predict", file, type);
      show($("predict-result"), r.label + " (" + Math.round(100 * r.scores[0].score) + "%, " +
        r.latency_ms.total.toFixed(1) + " ms)", false);
    } catch (e) { show($("predict-result"), e.message, true); }
  } else {
    show($("predict-result"), "", false);
  }
  if (health && health.capabilities.fewshot && $("classes").children.length) {
    try {
      const r = await call("POST", "/v1/fewshot/predict", file, type);
      show($("fewshot-result"), r.label === null ? "unknown (nearest: " + r.nearest + ")" : r.label, false);
      $("fewshot-result").dataset.label = r.label === null ? "" : r.label;
    } catch (e) { show($("fewshot-result"), e.message, true); }
  }
}

async function enroll() {
  const label = $("enroll-label").value.trim();
  const files = $("enroll-files").files;
  if (!label) return show($("enroll-status"), "Give the class a name.", true);
  if (!files.length) return show($("enroll-status"), "Choose a few photos.", true);
  const form = new FormData();
  form.append("label", label);
  for (const f of files) form.append("images", f, f.name);
  show($("enroll-status"), "enrolling…", false);
  $("enroll-button").disabled = true;
  try {
    const r = await call("POST", "/v1/fewshot/enroll", form);
    $("enroll-files").value = "";
    await refreshClasses();
    show($("enroll-status"), "Enrolled \u201c" + r.label + "\u201d from " + r.shots + " photo" +
      (r.shots === 1 ? "" : "s") + ".", false);
    if (lastPhoto) await predict(lastPhoto);
  } catch (e) {
    show($("enroll-status"), e.message, true);
  } finally {
    $("enroll-button").disabled = false;
  }
}

async function removeClass(label) {
  try {
    await call("DELETE", "/v1/fewshot/labels/" + encodeURIComponent(label));
    await refreshClasses();
    show($("classes-status"), "Removed \u201c" + label + "\u201d.", false);
  } catch (e) {
    show($("classes-status"), e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("edgekt-token") || "";
  $("token").addEventListener("change", () => sessionStorage.setItem("edgekt-token", $("token").value.trim()));
  $("predict-file").addEventListener("change", (ev) => { if (ev.target.files.length) predict(ev.target.files[0]); });
  $("enroll-button").addEventListener("click", enroll);
  refreshHealth();
});
