// Calls to the Tuneforge API with the key kept in localStorage; a failed call throws the API's own message.

import { TERMINAL_STATUSES } from "./job_states.js"; // made by the server from its job state machine

const KEY = "tuneforge.apiKey";
const TERMINAL = new Set(TERMINAL_STATUSES);

export const getKey = () => localStorage.getItem(KEY);
export const setKey = (key) => localStorage.setItem(KEY, key);
export const clearKey = () => localStorage.removeItem(KEY);
export const isTerminal = (status) => TERMINAL.has(status);

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    // not JSON (a proxy's page, say): the status line says enough
  }
  return `${response.status} ${response.statusText}`.trim();
}

export async function request(path, { method = "GET", body, signal, accept, key = getKey() } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (accept) headers.Accept = accept;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`cannot reach the server (${error.message})`, 0);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
  return response;
}

export const getJSON = async (path, options) => (await request(path, options)).json();
export const postJSON = async (path, body, options) =>
  (await request(path, { ...options, method: "POST", body })).json();

/** Every item of a paginated list (`{data, has_more}`); `cursor(item)` is what `after` takes to go on. */
export async function listAll(path, { cursor = (item) => item.id, limit = 100, signal, after = null } = {}) {
  const items = [];
  const join = path.includes("?") ? "&" : "?";
  for (;;) {
    const query = `${join}limit=${limit}` + (after === null ? "" : `&after=${encodeURIComponent(after)}`);
    const page = await getJSON(path + query, { signal });
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = cursor(page.data[page.data.length - 1]);
  }
}

/** The server-sent events of one response, parsed: `{id, event, data}` with `data` decoded from JSON.
 * (EventSource cannot send the Authorization header, so the stream is read from fetch's body.) */
export async function* serverSentEvents(path, { signal } = {}) {
  const response = await request(path, { signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = { id: null, event: "message", data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "data") message.data.push(text);
          else if (field === "id") message.id = Number(text);
          else if (field === "event") message.event = text;
        }
        if (message.data.length) {
          yield { id: message.id, event: message.event, data: JSON.parse(message.data.join("\n")) };
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/** Follows a job's events after seq `after` until the job has ended: `onEvent(event)` for each one, in order,
 * once each (a dropped connection resumes after the last seq seen). `onState(live)` says whether a stream is open. */
export async function followJob(jobId, after, { onEvent, onState = () => {}, signal }) {
  const id = encodeURIComponent(jobId);
  while (!signal.aborted) {
    try {
      onState(true);
      for await (const message of serverSentEvents(`/jobs/${id}/events?stream=true&after=${after}`, { signal })) {
        after = Math.max(after, message.id);
        onEvent(message.data);
      }
      onState(false);
      const job = await getJSON(`/jobs/${id}`, { signal });
      if (isTerminal(job.status)) return job;
      await sleep(500, signal); // the server ends a stream after an hour: go on where it stopped
    } catch (error) {
      onState(false);
      if (signal.aborted || error.name === "AbortError") return null;
      if (error.status === 401 || error.status === 404) throw error;
      await sleep(2000, signal); // the server restarted or the network blinked: reconnect
    }
  }
  return null;
}

/** Saves an adapter's archive: fetched with the key (a plain link could not send it), then saved from a blob URL. */
export async function downloadArtifact(artifactId) {
  const response = await request(`/adapters/${encodeURIComponent(artifactId)}/download`);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${artifactId}.tar.gz`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
