// The dashboard: a hash router over its views (jobs, one job, adapters, Tinker training runs, one run, sweeps, one
// sweep, playground),
// built from the REST API.

import {
  ApiError,
  clearKey,
  downloadArtifact,
  followJob,
  getJSON,
  getKey,
  isTerminal,
  listAll,
  postJSON,
  setKey,
} from "./api.js";
import { LineChart } from "./chart.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const changeKey = document.getElementById("change-key");
const toast = document.getElementById("toast");
const LIST_REFRESH_MS = 5000;
const MAX_EVENT_ROWS = 1000;

// --- small helpers ---------------------------------------------------------------------------------------------

/** An element with attributes and children (strings become text: nothing from the API is parsed as HTML). */
function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    // Through the CSSOM: the page's Content-Security-Policy (style-src 'self') refuses style attributes.
    else if (name === "style") node.style.cssText = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return node;
}

const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "—");
const number = (value, digits = 4) => (typeof value === "number" ? String(Number(value.toPrecision(digits))) : "—");

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** A table head; the columns named in `numeric` are right-aligned. */
const head = (columns, numeric = []) =>
  h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: numeric.includes(c) ? "num" : undefined }, c))));

const statusBadge = (status) => h("span", { class: `status status-${status}`, "data-field": "status" }, status);

function progressText(job) {
  const { step, total_steps: total } = job.progress;
  return total ? `${step}/${total}` : `${step}`;
}

function showError(message) {
  toast.textContent = message;
  toast.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => (toast.hidden = true), 8000);
}

/** A link that downloads an adapter or checkpoint archive with the key (see `downloadArtifact`). */
function downloadLink(artifactId, text = "Download") {
  return h(
    "a",
    {
      href: `/adapters/${encodeURIComponent(artifactId)}/download`,
      class: "download",
      "data-download": artifactId,
      onclick: async (event) => {
        event.preventDefault();
        try {
          await downloadArtifact(artifactId);
        } catch (error) {
          showError(error.message);
        }
      },
    },
    text,
  );
}

const playgroundLink = (artifactId, base) =>
  h("a", { href: `#/playground?adapter=${encodeURIComponent(artifactId)}&base=${encodeURIComponent(base)}` }, "Try");

// --- routing ---------------------------------------------------------------------------------------------------

let current = null; // the view on screen: aborted (its requests, streams and timers) when another replaces it

function route() {
  current?.abort();
  current = new AbortController();
  const signal = current.signal;
  toast.hidden = true;
  if (!getKey()) {
    nav.hidden = changeKey.hidden = true;
    keyForm();
    return;
  }
  nav.hidden = changeKey.hidden = false;
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  const section = parts[0] || "jobs";
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", link.dataset.nav === section);
  let rendered;
  if (parts[0] === "jobs" && parts[1]) rendered = jobView(parts[1], signal);
  else if (parts[0] === "adapters") rendered = adaptersView(signal);
  else if (parts[0] === "runs" && parts[1]) rendered = runView(parts[1], signal);
  else if (parts[0] === "runs") rendered = runsView(signal);
  else if (parts[0] === "sweeps" && parts[1]) rendered = sweepView(parts[1], signal);
  else if (parts[0] === "sweeps") rendered = sweepsView(signal);
  else if (parts[0] === "playground") rendered = playgroundView(params, signal);
  else rendered = jobsView(signal);
  rendered.catch((error) => {
    if (signal.aborted || error.name === "AbortError") return;
    if (error instanceof ApiError && error.status === 401) {
      clearKey();
      keyForm(error.message);
      return;
    }
    view.replaceChildren(h("div", { class: "card" }, h("p", { class: "error", role: "alert" }, error.message)));
  });
}

window.addEventListener("hashchange", route);
changeKey.addEventListener("click", () => {
  clearKey();
  route();
});

// --- the API key -----------------------------------------------------------------------------------------------

function keyForm(message) {
  const input = h("input", { type: "password", id: "api-key", name: "key", autocomplete: "off", required: true });
  const error = h("p", { class: "error", id: "key-error", role: "alert" }, message || "");
  const form = h(
    "form",
    { class: "card login", id: "key-form" },
    h("h1", {}, "Tuneforge"),
    h("p", { class: "muted" }, "Enter an API key (", h("code", {}, "tuneforge keys create --tenant NAME"), ")."),
    h("label", {}, "API key", input),
    h("p", {}, h("button", { type: "submit" }, "Continue")),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    try {
      await getJSON("/jobs?limit=1", { key }); // proves the key before it is kept
    } catch (failure) {
      error.textContent = failure.message;
      return;
    }
    setKey(key);
    route();
  });
  view.replaceChildren(form);
  input.focus();
}

// --- jobs ------------------------------------------------------------------------------------------------------

async function jobsView(signal) {
  const body = h("tbody");
  const more = h("button", { type: "button", class: "quiet", hidden: true }, "Load more");
  view.replaceChildren(
    h("h1", {}, "Jobs"),
    h(
      "div",
      { class: "card" },
      h(
        "table",
        { id: "jobs" },
        head(["Job", "Status", "Base model", "Method", "Step", "Created", "Adapter"], ["Step"]),
        body,
      ),
      h("p", { class: "muted", id: "jobs-empty", hidden: true }, "No jobs yet: create one with POST /jobs."),
      more,
    ),
  );
  const row = (job) =>
    h(
      "tr",
      { "data-job-id": job.id },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, job.base_model),
      h("td", {}, job.method),
      h("td", { class: "num" }, progressText(job)),
      h("td", {}, when(job.created_at)),
      h("td", {}, job.adapter_id ? downloadLink(job.adapter_id, job.adapter_id) : "—"),
    );
  let shown = 0;
  let after = null;
  const load = async (append) => {
    const limit = append ? 50 : Math.min(100, Math.max(50, shown));
    const page = await getJSON(`/jobs?limit=${limit}` + (append && after ? `&after=${after}` : ""), { signal });
    const rows = page.data.map(row);
    if (append) body.append(...rows);
    else body.replaceChildren(...rows);
    shown = body.children.length;
    after = page.data.length ? page.data[page.data.length - 1].id : after;
    more.hidden = !page.has_more;
    document.getElementById("jobs-empty").hidden = shown > 0;
  };
  more.addEventListener("click", () => load(true).catch((error) => showError(error.message)));
  await load(true);
  const timer = setInterval(() => load(false).catch(() => {}), LIST_REFRESH_MS); // statuses change as jobs run
  signal.addEventListener("abort", () => clearInterval(timer));
}

// --- one job ---------------------------------------------------------------------------------------------------

function fact(name, ...value) {
  return h("div", {}, h("dt", {}, name), h("dd", { "data-fact": name.toLowerCase() }, ...value));
}

function renderFacts(job, facts, title) {
  title.replaceChildren("Job ", h("code", {}, job.id), statusBadge(job.status));
  const { step, total_steps: total } = job.progress;
  const share = total ? Math.min(100, (100 * step) / total) : 0;
  const adapter = job.adapter_id
    ? [
        h("code", {}, job.adapter_id),
        " ",
        downloadLink(job.adapter_id),
        " · ",
        playgroundLink(job.adapter_id, job.base_model),
      ]
    : ["—"];
  const items = [
    fact("Base model", job.base_model),
    fact("Method", job.method),
    fact(
      "Progress",
      `step ${progressText(job)}, epoch ${job.progress.epoch}`,
      h("div", { class: "progress" }, h("span", { style: `width:${share}%` })),
    ),
    fact("Device", job.device ? `${job.device} (${job.dtype})` : "—"),
    fact("Created", when(job.created_at)),
    fact("Started", when(job.started_at)),
    fact("Finished", when(job.finished_at)),
    fact("Adapter", ...adapter),
  ];
  if (job.error) items.push(fact("Error", h("span", { class: "error" }, `${job.error.code}: ${job.error.message}`)));
  facts.replaceChildren(...items);
}

function eventRow(event) {
  return h(
    "tr",
    { "data-seq": event.seq, class: `level-${event.level}` },
    h("td", { class: "num" }, String(event.seq)),
    h("td", { class: "nowrap" }, new Date(event.created_at * 1000).toLocaleTimeString()),
    h("td", {}, event.type),
    h("td", {}, event.message),
  );
}

const CHECKPOINT_COLUMNS = ["Checkpoint", "Step", "Epoch", "Train loss", "Valid loss", "Size", ""];

function checkpointRow(checkpoint, job) {
  const m = checkpoint.metrics || {};
  return h(
    "tr",
    { "data-checkpoint-id": checkpoint.id },
    h("td", { class: "mono nowrap" }, checkpoint.id),
    h("td", { class: "num" }, String(checkpoint.step_number)),
    h("td", { class: "num" }, String(checkpoint.epoch)),
    h("td", { class: "num" }, number(m.train_loss)),
    h("td", { class: "num" }, number(m.valid_loss)),
    h("td", { class: "num" }, bytes(checkpoint.size_bytes)),
    h("td", {}, downloadLink(checkpoint.id), " · ", playgroundLink(checkpoint.id, job.base_model)),
  );
}

async function jobView(jobId, signal) {
  const id = encodeURIComponent(jobId);
  const title = h("h1", {}, "Job ", h("code", {}, jobId));
  const facts = h("dl", { class: "facts" });
  const live = h("span", { class: "live", id: "live" }, "");
  const chartBox = h("div", { id: "loss-chart" });
  const checkpoints = h("tbody");
  const events = h("tbody");
  const eventsScroll = h(
    "div",
    { class: "scroll" },
    h("table", { id: "events" }, head(["Seq", "Time", "Type", "Message"], ["Seq"]), events),
  );
  const cancel = h("button", { type: "button", class: "quiet", id: "cancel", hidden: true }, "Cancel job");
  const settings = h("pre", { class: "output", id: "hyperparameters" });
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    title,
    h(
      "div",
      { class: "card" },
      facts,
      h("details", {}, h("summary", { class: "muted" }, "Hyperparameters"), settings),
      h("p", {}, cancel),
    ),
    h("div", { class: "card" }, h("h2", {}, "Loss ", live), chartBox),
    h(
      "div",
      { class: "card" },
      h("h2", {}, "Checkpoints"),
      h("table", { id: "checkpoints" }, head(CHECKPOINT_COLUMNS, CHECKPOINT_COLUMNS.slice(1, 6)), checkpoints),
      h("p", { class: "muted", id: "no-checkpoints" }, "None yet: one is saved at each epoch end."),
    ),
    h("div", { class: "card" }, h("h2", {}, "Events"), eventsScroll),
  );

  let job = await getJSON(`/jobs/${id}`, { signal });
  const chart = new LineChart(chartBox, {
    series: [
      { name: "train_loss", label: "train loss", color: "var(--train)" },
      { name: "valid_loss", label: "validation loss", color: "var(--valid)" },
    ],
    empty: "No points yet: the curves fill in as the job trains.",
  });
  const showJob = () => {
    renderFacts(job, facts, title);
    settings.textContent = JSON.stringify(job.hyperparameters, null, 2);
    chart.setXMax(job.progress.total_steps || 0);
    cancel.hidden = isTerminal(job.status);
  };
  const refreshJob = async () => {
    job = await getJSON(`/jobs/${id}`, { signal });
    showJob();
  };
  const refreshCheckpoints = async () => {
    const list = await getJSON(`/jobs/${id}/checkpoints`, { signal });
    checkpoints.replaceChildren(...list.data.map((c) => checkpointRow(c, job)));
    document.getElementById("no-checkpoints").hidden = list.data.length > 0;
  };
  const addEvent = (event) => {
    const atBottom = eventsScroll.scrollTop + eventsScroll.clientHeight >= eventsScroll.scrollHeight - 4;
    events.append(eventRow(event));
    while (events.children.length > MAX_EVENT_ROWS) events.firstElementChild.remove();
    if (atBottom) eventsScroll.scrollTop = eventsScroll.scrollHeight;
  };
  cancel.addEventListener("click", async () => {
    try {
      job = await postJSON(`/jobs/${id}/cancel`, undefined, { signal });
      showJob();
    } catch (error) {
      showError(error.message);
    }
  });
  showJob();

  // The log so far (its last seq is where the stream starts), the curves so far, then everything new as it comes.
  // Only the latest events are shown: read from there, not the whole log of a long job.
  const from = Math.max(0, (job.last_event_seq || 0) - MAX_EVENT_ROWS);
  const past = await listAll(`/jobs/${id}/events`, { cursor: (e) => e.seq, limit: 1000, after: from, signal });
  past.slice(-MAX_EVENT_ROWS).forEach(addEvent);
  const lastSeq = past.length ? past[past.length - 1].seq : from;
  const metrics = await getJSON(`/jobs/${id}/metrics`, { signal });
  chart.set("train_loss", metrics.curves.train_loss || []);
  chart.set("valid_loss", metrics.curves.valid_loss || []);
  await refreshCheckpoints();
  if (isTerminal(job.status)) return;

  followJob(job.id, lastSeq, {
    signal,
    onState: (open) => {
      live.textContent = open ? "live" : "";
      live.classList.toggle("on", open);
    },
    onEvent: (event) => {
      addEvent(event);
      const data = event.data || {};
      if (event.type === "metrics") {
        chart.add("train_loss", data.step, data.train_loss);
        if (Number.isInteger(data.step)) job.progress.step = data.step;
        if (Number.isInteger(data.epoch)) job.progress.epoch = data.epoch;
        showJob();
      } else if (event.type === "eval") {
        chart.add("valid_loss", data.step, data.valid_loss);
      } else if (event.type === "checkpoint") {
        refreshCheckpoints().catch(() => {});
      } else if (event.type === "status") {
        refreshJob().catch(() => {});
      }
    },
  })
    .then(async (ended) => {
      if (!ended) return;
      job = ended;
      showJob();
      await refreshCheckpoints();
    })
    .catch((error) => {
      if (!signal.aborted) showError(error.message);
    });
}

// --- adapters --------------------------------------------------------------------------------------------------

async function adaptersView(signal) {
  const adapters = await listAll("/adapters", { signal });
  const body = h(
    "tbody",
    {},
    adapters.map((a) =>
      h(
        "tr",
        { "data-adapter-id": a.id },
        h("td", { class: "mono" }, a.id),
        h("td", {}, a.name || "—"),
        h("td", {}, a.base_model),
        h("td", {}, a.method),
        h(
          "td",
          {},
          a.job_id
            ? h("a", { href: `#/jobs/${encodeURIComponent(a.job_id)}`, class: "mono" }, a.job_id)
            : h("span", { class: "mono", title: "Sampler weights of a Tinker training run" }, a.tinker_path),
        ),
        h("td", { class: "num" }, bytes(a.size_bytes)),
        h("td", {}, when(a.created_at)),
        h("td", {}, downloadLink(a.id), " · ", playgroundLink(a.id, a.base_model)),
      ),
    ),
  );
  view.replaceChildren(
    h("h1", {}, "Adapters"),
    h(
      "div",
      { class: "card" },
      h(
        "table",
        { id: "adapters" },
        head(["Adapter", "Name", "Base model", "Method", "Job or run", "Size", "Created", ""], ["Size"]),
        body,
      ),
      adapters.length ? null : h("p", { class: "muted" }, "No adapters yet: a job that succeeds publishes one."),
    ),
  );
}

// --- Tinker training runs --------------------------------------------------------------------------------------

const runLink = (run) => h("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "mono" }, run.id);
const lastLoss = (run) => (run.loss.length ? run.loss[run.loss.length - 1][1] : undefined);

async function runsView(signal) {
  const body = h("tbody");
  const empty = h(
    "p",
    { class: "muted", id: "runs-empty", hidden: true },
    "No training runs yet: the tinker client makes them (see the README's “Tinker's training API”).",
  );
  view.replaceChildren(
    h("h1", {}, "Training runs"),
    h(
      "div",
      { class: "card" },
      h(
        "table",
        { id: "runs" },
        head(["Run", "Base model", "LoRA rank", "Steps", "Tokens", "Last loss", "Last request"], ["Steps", "Tokens"]),
        body,
      ),
      empty,
    ),
  );
  const load = async () => {
    const runs = await listAll("/training_runs", { signal });
    body.replaceChildren(
      ...runs.map((run) =>
        h(
          "tr",
          { "data-run-id": run.id },
          h("td", {}, runLink(run)),
          h("td", {}, run.base_model),
          h("td", { class: "num" }, String(run.lora_rank)),
          h("td", { class: "num", "data-field": "steps" }, String(run.steps)),
          h("td", { class: "num" }, String(run.trained_tokens)),
          h("td", { class: "num" }, number(lastLoss(run))),
          h("td", {}, when(run.last_request_at)),
        ),
      ),
    );
    empty.hidden = runs.length > 0;
  };
  await load();
  const timer = setInterval(() => load().catch(() => {}), LIST_REFRESH_MS); // runs step while they are open
  signal.addEventListener("abort", () => clearInterval(timer));
}

async function runView(runId, signal) {
  const id = encodeURIComponent(runId);
  const facts = h("dl", { class: "facts" });
  const chartBox = h("div", { id: "loss-chart" });
  const saved = h("tbody");
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/runs" }, "← Training runs")),
    h("h1", {}, "Training run ", h("code", {}, runId)),
    h("div", { class: "card" }, facts),
    h("div", { class: "card" }, h("h2", {}, "Loss"), chartBox),
    h(
      "div",
      { class: "card" },
      h("h2", {}, "Saved weights"),
      h("table", { id: "saved-weights" }, head(["Path", "Kind", "Adapter", "Size", "Saved", ""], ["Size"]), saved),
    ),
  );
  const chart = new LineChart(chartBox, {
    series: [{ name: "loss", label: "loss per token", color: "var(--train)" }],
    empty: "No steps yet: the curve fills in as the client calls optim_step.",
  });
  const show = (run) => {
    facts.replaceChildren(
      fact("Base model", run.base_model),
      fact("LoRA", `rank ${run.lora_rank}`, h("code", {}, ` ${JSON.stringify(run.lora_config)}`)),
      fact("Steps", String(run.steps)),
      fact("Trained tokens", String(run.trained_tokens)),
      fact("Created", when(run.created_at)),
      fact("Last request", when(run.last_request_at)),
    );
    chart.setXMax(run.steps);
    chart.set("loss", run.loss);
    saved.replaceChildren(
      ...run.checkpoints.map((c) =>
        h(
          "tr",
          { "data-path": c.tinker_path },
          h("td", { class: "mono" }, c.tinker_path),
          h("td", {}, c.kind),
          h("td", { class: "mono" }, c.adapter_id || "—"),
          h("td", { class: "num" }, bytes(c.size_bytes)),
          h("td", {}, when(c.created_at)),
          h(
            "td",
            {},
            c.adapter_id ? [downloadLink(c.adapter_id), " · ", playgroundLink(c.adapter_id, run.base_model)] : "",
          ),
        ),
      ),
    );
  };
  show(await getJSON(`/training_runs/${id}`, { signal }));
  const timer = setInterval(
    () =>
      getJSON(`/training_runs/${id}`, { signal })
        .then(show)
        .catch(() => {}),
    LIST_REFRESH_MS,
  );
  signal.addEventListener("abort", () => clearInterval(timer));
}

// --- sweeps -----------------------------------------------------------------------------------------------------

const sweepLink = (sweep) => h("a", { href: `#/sweeps/${encodeURIComponent(sweep.id)}`, class: "mono" }, sweep.id);
// One colour per configuration on the shared chart, in rank order.
const SWEEP_TRIAL_ENDS = ["succeeded", "failed", "cancelled", "skipped", "evaluating"]; // its curve is final
const PALETTE = ["#2563eb", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#0c8599", "#5c940d", "#862e9c", "#495057"];

async function sweepsView(signal) {
  const body = h("tbody");
  const empty = h("p", { class: "muted", id: "sweeps-empty", hidden: true }, "No sweeps yet: POST /sweeps or `tuneforge sweep create`.");
  view.replaceChildren(
    h("h1", {}, "Sweeps"),
    h(
      "div",
      { class: "card" },
      h("table", { id: "sweeps" }, head(["Sweep", "Name", "Status", "Configurations", "Winner", "Created"], ["Configurations"]), body),
      empty,
    ),
  );
  const load = async () => {
    const sweeps = await listAll("/sweeps", { signal });
    body.replaceChildren(
      ...sweeps.map((sweep) =>
        h(
          "tr",
          { "data-sweep-id": sweep.id },
          h("td", {}, sweepLink(sweep)),
          h("td", {}, sweep.name || "—"),
          h("td", {}, statusBadge(sweep.status)),
          h("td", { class: "num" }, String(sweep.results.length)),
          h("td", {}, sweep.winner ? `${sweep.winner.method} (${number(sweep.winner.objective)})` : "—"),
          h("td", {}, when(sweep.created_at)),
        ),
      ),
    );
    empty.hidden = sweeps.length > 0;
  };
  await load();
  const timer = setInterval(() => load().catch(() => {}), LIST_REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

async function sweepView(sweepId, signal) {
  const id = encodeURIComponent(sweepId);
  const facts = h("dl", { class: "facts" });
  const rows = h("tbody");
  const chartBox = h("div", { id: "sweep-chart" });
  const compare = h("p", { id: "sweep-compare" });
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/sweeps" }, "← Sweeps")),
    h("h1", {}, "Sweep ", h("code", {}, sweepId)),
    h("div", { class: "card" }, facts, compare),
    h(
      "div",
      { class: "card" },
      h("h2", {}, "Configurations, best first"),
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          { id: "sweep-results" },
          head(
            ["Rank", "Method", "Hyperparameters", "Objective", "Status", "Stopped at", "Steps", "Trainable", "Peak memory", "Tokens/s", "Wall s", "Job", ""],
            ["Rank", "Objective", "Steps", "Trainable", "Peak memory", "Tokens/s", "Wall s"],
          ),
          rows,
        ),
      ),
    ),
    h("div", { class: "card" }, h("h2", {}, "Validation loss"), chartBox),
  );
  let chart = null;
  const curves = new Map(); // job id -> its validation curve, once its job has ended
  const show = async (sweep) => {
    facts.replaceChildren(
      fact("Status", statusBadge(sweep.status)),
      fact("Objective", sweep.objective.type === "eval" ? `pass rate of “${sweep.objective.testing_criteria}” (higher is better)` : "validation loss (lower is better)"),
      fact("Early elimination", sweep.early_elimination.rule === "none" ? "none" : `successive halving, eta ${sweep.early_elimination.eta}, rungs at steps ${sweep.rungs.join(", ")}`),
      fact("Steps trained", `${sweep.savings.steps_trained} of ${sweep.savings.steps_without_elimination} without elimination (saved ${Math.round(sweep.savings.saved_fraction * 100)}%)`),
      fact("Winner", sweep.winner ? h("code", {}, sweep.winner.adapter_id || sweep.winner.job_id || "—") : "—"),
      fact("Created", when(sweep.created_at)),
    );
    rows.replaceChildren(
      ...sweep.results.map((r) =>
        h(
          "tr",
          { "data-position": String(r.position), "data-job-id": r.job_id || "" },
          h("td", { class: "num", "data-field": "rank" }, r.rank ? String(r.rank) : "—"),
          h("td", { "data-field": "method" }, r.method),
          h("td", { class: "mono" }, JSON.stringify(r.hyperparameters)),
          h("td", { class: "num", "data-field": "objective" }, number(r.objective)),
          h("td", {}, statusBadge(r.status)),
          h("td", { class: "num", "data-field": "stopped" }, r.stopped_at_step ? String(r.stopped_at_step) : ""),
          h("td", { class: "num" }, `${r.steps}/${r.planned_steps}`),
          h("td", { class: "num" }, String(r.trainable_parameters)),
          h("td", { class: "num" }, r.peak_memory_bytes ? bytes(r.peak_memory_bytes) : "—"),
          h("td", { class: "num" }, number(r.tokens_per_second)),
          h("td", { class: "num" }, number(r.wall_seconds)),
          h("td", {}, r.job_id ? h("a", { href: `#/jobs/${encodeURIComponent(r.job_id)}`, class: "mono" }, r.job_id) : "—"),
          h("td", {}, r.adapter_id ? downloadLink(r.adapter_id) : ""),
        ),
      ),
    );
    const [first, second] = sweep.results.filter((r) => r.adapter_id && r.rank);
    compare.replaceChildren(
      first && second
        ? h(
            "a",
            { id: "compare-top-two", href: `#/playground?adapter=${encodeURIComponent(first.adapter_id)}&compare=${encodeURIComponent(second.adapter_id)}` },
            "Compare the top two in the playground",
          )
        : "",
    );
    const series = sweep.results
      .filter((r) => r.job_id)
      .map((r) => ({ name: r.job_id, label: `#${r.rank || "—"} ${r.method}`, color: PALETTE[r.position % PALETTE.length] }));
    if (!chart || JSON.stringify(chart.series) !== JSON.stringify(series)) {
      chart = new LineChart(chartBox, { series, empty: "No evaluations yet: each job adds its curve as it evaluates." });
      curves.clear();
    }
    chart.setXMax(Math.max(0, ...sweep.results.map((r) => r.planned_steps)));
    for (const r of sweep.results.filter((r) => r.job_id)) {
      if (!curves.has(r.job_id)) {
        const metrics = await getJSON(`/jobs/${encodeURIComponent(r.job_id)}/metrics`, { signal });
        if (SWEEP_TRIAL_ENDS.includes(r.status)) curves.set(r.job_id, metrics.curves.valid_loss || []);
        chart.set(r.job_id, metrics.curves.valid_loss || []);
      } else {
        chart.set(r.job_id, curves.get(r.job_id));
      }
    }
  };
  let sweep = await getJSON(`/sweeps/${id}`, { signal });
  await show(sweep);
  if (sweep.status !== "running") return;
  const timer = setInterval(async () => {
    sweep = await getJSON(`/sweeps/${id}`, { signal }).catch(() => sweep);
    await show(sweep).catch(() => {});
    if (sweep.status !== "running") clearInterval(timer);
  }, LIST_REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

// --- playground ------------------------------------------------------------------------------------------------

function outputPanel(id, heading) {
  const text = h("pre", { class: "output", "data-output": id });
  const meta = h("p", { class: "muted", "data-meta": id });
  const title = h("h2", {}, heading);
  const panel = h("section", { class: "card", id: `output-${id}`, "data-state": "idle" }, title, text, meta);
  return { panel, title, text, meta };
}

async function playgroundView(params, signal) {
  const models = await getJSON("/v1/models", { signal });
  const options = models.data.filter((m) => m.parent).map((m) => ({ id: m.id, base: m.parent, name: m.name }));
  const wanted = params.get("adapter");
  if (wanted && !options.some((o) => o.id === wanted)) {
    options.unshift({ id: wanted, base: params.get("base"), name: null }); // a checkpoint, from a job page
  }
  const select = h(
    "select",
    { id: "pg-adapter", required: true },
    options.map((o) =>
      h("option", { value: o.id, selected: o.id === wanted }, `${o.id}${o.name ? ` (${o.name})` : ""} on ${o.base}`),
    ),
  );
  const mode = h(
    "select",
    { id: "pg-mode" },
    h("option", { value: "prompt" }, "Raw prompt"),
    h("option", { value: "chat" }, "Chat message (chat template)"),
  );
  const prompt = h("textarea", { id: "pg-prompt", required: true, placeholder: "Type a prompt…" });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, max: 4096, value: 64 });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const compareWith = params.get("compare");
  const against = h(
    "select",
    { id: "pg-compare" },
    h("option", { value: "" }, "Its base model"),
    options.map((o) => h("option", { value: o.id, selected: o.id === compareWith }, `${o.id}${o.name ? ` (${o.name})` : ""}`)),
  );
  const run = h("button", { type: "submit", id: "pg-run", disabled: options.length === 0 }, "Generate");
  const adapterOut = outputPanel("adapter", "With the adapter");
  const baseOut = outputPanel("base", "Base model");
  const form = h(
    "form",
    { class: "card", id: "playground" },
    h(
      "div",
      { class: "row" },
      h("label", { class: "grow" }, "Adapter", select),
      h("label", { class: "grow" }, "Compare with", against),
      h("label", {}, "Input", mode),
    ),
    h("label", {}, "Prompt", prompt),
    h(
      "div",
      { class: "row", style: "margin-top:12px" },
      h("label", {}, "Max tokens", maxTokens),
      h("label", {}, "Temperature", temperature),
      run,
    ),
    options.length ? null : h("p", { class: "muted" }, "No adapters yet: a job that succeeds publishes one."),
  );
  view.replaceChildren(h("h1", {}, "Playground"), form, h("div", { class: "grid2" }, adapterOut.panel, baseOut.panel));

  const generate = async (out, body) => {
    out.panel.dataset.state = "running";
    out.text.textContent = "…";
    out.meta.textContent = "";
    const started = performance.now();
    try {
      const result = await postJSON("/generate", body, { signal });
      out.text.textContent = result.text;
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      out.meta.textContent = `${result.usage.completion_tokens} tokens, ${result.finish_reason}, ${seconds} s`;
      out.panel.dataset.state = "done";
    } catch (error) {
      if (signal.aborted) return;
      out.text.textContent = "";
      out.meta.replaceChildren(h("span", { class: "error" }, error.message));
      out.panel.dataset.state = "error";
    }
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const choice = options.find((o) => o.id === select.value);
    const input =
      mode.value === "chat" ? { messages: [{ role: "user", content: prompt.value }] } : { prompt: prompt.value };
    const common = { ...input, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    adapterOut.title.replaceChildren("With ", h("code", {}, choice.id));
    const other = options.find((o) => o.id === against.value);
    if (other) baseOut.title.replaceChildren("With ", h("code", {}, other.id));
    else baseOut.title.replaceChildren("Base model ", h("code", {}, choice.base || "(default)"));
    run.disabled = true;
    await Promise.all([
      generate(adapterOut, { ...common, adapter_id: choice.id }),
      generate(baseOut, other ? { ...common, adapter_id: other.id } : choice.base ? { ...common, base_model: choice.base } : common),
    ]);
    run.disabled = false;
  });
}

route();
