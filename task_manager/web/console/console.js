// The Task Manager's web console: plain JavaScript over the gateway's own HTTP API
// (POST /rpc/task_manager.v1.TaskManager/<Method>, JSON) and its watch (Server-Sent
// Events). No build step, no dependencies: the gateway serves these files as they are.
//
// Live: one EventSource follows every change. It reconnects by itself and sends the
// id of the last event it saw (Last-Event-ID, a revision), so the gateway resumes the
// watch right after it: a reconnect misses nothing and repeats nothing. If that
// revision was compacted away meanwhile, the gateway ends the stream with an `error`
// event (OUT_OF_RANGE); the console then lists again and watches from now.
"use strict";

const RPC = "/rpc/task_manager.v1.TaskManager/";
const PAGE_SIZE = 50;
const STATUSES = [
  "CREATED", "SCHEDULED_IN_MANAGER", "SENT", "MACHINE_RECEIPT", "ACK", "WILCO", "EXECUTING",
  "WAITING_FOR_UPDATE", "DONE_OK", "DONE_NOT_OK", "CANCEL_REQUESTED", "COMPLETE_REQUESTED",
];

const state = {
  token: sessionStorage.getItem("tm-token") || "",
  view: "",
  pageTokens: [""],   // the token of each page seen (oldest tasks first): "Previous" pops one
  nextPageToken: "",
  rows: new Map(),    // task id -> the task shown in the table
  taskId: "",         // the task the task page shows
  watch: null,
  agentsTimer: null,
  listing: null,      // the tasks listing in flight: {changes: tasks the watch brought meanwhile}
  listings: 0,        // listings applied (body[data-listings] tells a test)
};

// -- the API ------------------------------------------------------------------------

async function rpc(method, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const answer = await fetch(RPC + method, { method: "POST", headers, body: JSON.stringify(body) });
  const json = await answer.json();
  if (!answer.ok) throw new Error(`${method}: ${json.status || answer.status}: ${json.message}`);
  return json;
}

function watch(after) {
  // after: the last revision seen, to resume from when EventSource gave up (below).
  if (state.watch) state.watch.close();
  const request = { heartbeatIntervalMs: 5000 };
  if (after) request.startRevision = String(Number(after) + 1);
  let url = RPC + "WatchTasks?request=" + encodeURIComponent(JSON.stringify(request));
  if (state.token) url += "&access_token=" + encodeURIComponent(state.token);
  const source = new EventSource(url);
  const live = document.getElementById("live");
  let lastId = after || "";
  const seen = (message) => { if (message.lastEventId) lastId = message.lastEventId; };
  source.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
  source.onerror = () => {
    live.textContent = "reconnecting";
    live.classList.remove("on");
    // EventSource retries by itself after a lost connection, but gives up for good on
    // an answer that is not a stream (503 while the gateway stops, 429 over a limit):
    // then a new one, from the last revision seen, a little later.
    if (source.readyState === EventSource.CLOSED && state.watch === source) {
      setTimeout(() => { if (state.watch === source) watch(lastId); }, 2000);
    }
  };
  source.addEventListener("event", (message) => {
    seen(message);
    const task = JSON.parse(message.data).event.task;
    if (state.listing) state.listing.changes.push(task);
    changed(task);
  });
  // A new watch from now says where it starts at once (a heartbeat): list again then,
  // so that a change between the first listing and the watch's start is not missed.
  // (body[data-synced] then tells a test that rows and watch agree.)
  let listed = Boolean(after);
  source.addEventListener("heartbeat", async (message) => {
    seen(message);
    if (listed) return;
    listed = true;
    await route();
    document.body.dataset.synced = "true";
  });
  source.addEventListener("error", (message) => {
    // Without data: the connection's own error. With: the gateway ended the stream
    // (stopping, or this watch fell behind); either way EventSource reconnects and
    // resumes after the last id, unless that revision is gone: then list again.
    if (message.data && JSON.parse(message.data).status === "OUT_OF_RANGE") {
      watch();
    }
  });
  state.watch = source;
}

// -- views --------------------------------------------------------------------------

async function route() {
  const [, view, id] = location.hash.split("/");
  state.view = view || "tasks";
  for (const name of ["tasks", "agents", "task"]) {
    document.getElementById(`${name}-view`).hidden = name !== state.view;
  }
  clearInterval(state.agentsTimer);
  problem("");
  if (state.view === "task") return showTask(decodeURIComponent(id || ""));
  if (state.view === "agents") {
    state.agentsTimer = setInterval(showAgents, 5000);
    return showAgents();
  }
  return showTasks();
}

function query() {
  const status = document.getElementById("filter-status").value;
  const sessionId = document.getElementById("filter-session").value.trim();
  const request = { pageSize: PAGE_SIZE, pageToken: state.pageTokens[state.pageTokens.length - 1] };
  if (status) request.statusFilter = { status: [`STATUS_${status}`] };
  if (sessionId) request.sessionId = sessionId;
  return request;
}

async function showTasks() {
  // A change the watch brings while the listing is in flight may be newer than what the
  // listing read: it is applied again over the listing. (One that came before the
  // request is in it: it was committed before the gateway read the page.) Only the
  // latest listing is shown.
  const listing = { changes: [] };
  state.listing = listing;
  try {
    const page = await rpc("QueryTasks", query());
    if (state.listing !== listing) return;
    state.nextPageToken = page.pageToken || "";
    state.rows = new Map((page.tasks || []).filter(shown).map((task) => [task.version.taskId, task]));
    renderTasks();
    for (const task of listing.changes) changed(task);
    document.body.dataset.listings = String(++state.listings);
  } catch (error) { problem(error.message); } finally {
    if (state.listing === listing) state.listing = null;
  }
}

function shown(task) {
  // The filters QueryTasks has no field for: on the page shown.
  const agent = document.getElementById("filter-agent").value.trim();
  const text = document.getElementById("filter-text").value.trim().toLowerCase();
  if (agent && agentOf(task) !== agent) return false;
  if (text && !JSON.stringify(task).toLowerCase().includes(text)) return false;
  const status = document.getElementById("filter-status").value;
  return !status || task.status.status === `STATUS_${status}`;
}

function renderTasks() {
  const body = document.querySelector("#tasks tbody");
  body.replaceChildren(...[...state.rows.values()].map(taskRow));
  document.getElementById("next-page").disabled = !state.nextPageToken;
  document.getElementById("previous-page").disabled = state.pageTokens.length < 2;
  document.getElementById("page-label").textContent = `page ${state.pageTokens.length}`;
}

function taskRow(task) {
  const row = document.createElement("tr");
  row.dataset.taskId = task.version.taskId;
  const link = element("a", task.displayName || task.version.taskId);
  link.href = `#/task/${encodeURIComponent(task.version.taskId)}`;
  row.append(
    cell(link),
    cell(element("span", short(task.status.status), "status")),
    cell(agentOf(task)),
    cell(String(task.attempt || 0)),
    cell(lastError(task), "error"),
    cell(age(task.createTime)),
  );
  return row;
}

function changed(task) {
  const id = task.version.taskId;
  if (state.view === "task" && id === state.taskId) showTask(id);
  if (state.view !== "tasks") return;
  const isNew = !state.rows.has(id);
  // A new task belongs on the last page (tasks are listed oldest first).
  if (isNew && (state.nextPageToken || state.rows.size >= PAGE_SIZE)) return;
  if (!shown(task)) { if (state.rows.delete(id)) renderTasks(); return; }
  state.rows.set(id, task);
  renderTasks();
}

async function showTask(id) {
  state.taskId = id;
  try {
    const [{ task }, history] = await Promise.all([
      rpc("GetTask", { taskId: id }),
      rpc("GetTaskHistory", { taskId: id, pageSize: 1000 }),
    ]);
    document.getElementById("task-title").textContent = task.displayName || id;
    const facts = [
      ["id", id], ["status", short(task.status.status)], ["agent", agentOf(task)],
      ["last error", lastError(task)], ["created", when(task.createTime)],
      ["updated", when(task.lastUpdateTime)], ["session", task.sessionId || ""],
      ["progress", task.status.progress ? JSON.stringify(task.status.progress) : ""],
      ["specification", task.specification ? JSON.stringify(task.specification) : ""],
    ];
    document.getElementById("task-facts").replaceChildren(
      ...facts.filter(([, value]) => value).flatMap(([name, value]) => [element("dt", name), element("dd", value)]),
    );
    const done = ["STATUS_DONE_OK", "STATUS_DONE_NOT_OK"].includes(task.status.status);
    document.getElementById("cancel-task").disabled = done;
    document.getElementById("complete-task").disabled = done;
    const inputs = (task.inputs || []).map((input) => {
      const item = document.createElement("li");
      item.append(payloadLink(input, id));
      return item;
    });
    document.getElementById("inputs").replaceChildren(...(inputs.length ? inputs : [element("li", "none", "none")]));
    document.querySelector("#attempts tbody").replaceChildren(...(task.attempts || []).map((attempt) => {
      const row = document.createElement("tr");
      const outputs = document.createElement("span");
      for (const output of attempt.outputs || []) {
        if (outputs.childNodes.length) outputs.append(", ");
        outputs.append(payloadLink(output, id));
      }
      row.append(
        cell(String(attempt.number)), cell(attempt.entityId || ""), cell(when(attempt.startTime)),
        cell(when(attempt.endTime)), cell(short(attempt.outcome || "")),
        cell(attempt.error ? attempt.error.message || short(attempt.error.code) : "", "error"),
        cell(outputs, "outputs"),
      );
      return row;
    }));
    document.getElementById("timeline").replaceChildren(...(history.entries || []).map((entry) => {
      const item = document.createElement("li");
      item.dataset.revision = entry.revision;
      const error = entry.status.taskError ? ` — ${entry.status.taskError.message || short(entry.status.taskError.code)}` : "";
      item.append(
        element("span", `${when(entry.time)} `, "when"),
        element("span", short(entry.status.status), "status"),
        ` by ${authorOf(entry.author)}${entry.reason ? ` (${entry.reason})` : ""}${error}`,
      );
      return item;
    }));
  } catch (error) { problem(error.message); }
}

async function showAgents() {
  try {
    const { agents = [] } = await rpc("ListAgents", {});
    document.querySelector("#agents tbody").replaceChildren(...agents.map((agent) => {
      const row = document.createElement("tr");
      row.append(
        cell(agent.entityId), cell(short(agent.state || "").replace("AGENT_STATE_", "")),
        cell(String(agent.streamsOpen || 0)), cell(String(agent.tasksInFlight || 0)),
        cell(when(agent.lastSeen)),
      );
      return row;
    }));
  } catch (error) { problem(error.message); }
}

async function operatorRequest(method) {
  try {
    await rpc(method, { taskId: state.taskId, reason: "from the console" });
    await showTask(state.taskId);
  } catch (error) { problem(error.message); }
}

// -- bits ---------------------------------------------------------------------------

function element(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

function cell(content, className) {
  const node = document.createElement("td");
  if (className) node.className = className;
  node.append(content);
  return node;
}

function payloadLink(named, taskId) {
  // A task's input or an attempt's output (a NamedPayload): a link to its bytes
  // (GET /payloads/<sha256>), saved under its name. A link cannot send a header, so the
  // token goes in the URL (?access_token=), as the watch's does.
  const shown = document.createElement("span");
  shown.className = "payload";
  if (!named.payload) {
    shown.append(`${named.name} (not attached yet)`);
    return shown;
  }
  const query = new URLSearchParams({ task_id: taskId });
  if (state.token) query.set("access_token", state.token);
  const link = element("a", named.name);
  link.href = `/payloads/${encodeURIComponent(named.payload.sha256)}?${query}`;
  link.download = named.name;
  link.title = `sha256 ${named.payload.sha256}`;
  shown.append(link, element("span", ` (${byteCount(named.payload.size)})`, "size"));
  return shown;
}

function byteCount(size) {
  // A uint64, which JSON gives as a string (and leaves out when 0).
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = Number(size || 0);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
}

function short(status) { return String(status).replace(/^STATUS_/, ""); }

function agentOf(task) {
  const assignee = (task.relations || {}).assignee || {};
  return (assignee.system || assignee.team || {}).entityId || "";
}

function authorOf(author) {
  if (!author) return "the task manager";
  if (author.user) return author.user.userId;
  const system = author.system || author.team || {};
  return system.entityId || system.serviceName || "?";
}

function lastError(task) {
  const error = task.status.taskError;
  if (error) return error.message || short(error.code || "");
  const failed = [...(task.attempts || [])].reverse().find((attempt) => attempt.error);
  return failed ? failed.error.message || "" : "";
}

function when(stamp) { return stamp ? new Date(stamp).toLocaleString() : ""; }

function age(stamp) {
  const seconds = Math.max(0, (Date.now() - new Date(stamp).getTime()) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function problem(text) {
  const banner = document.getElementById("problem");
  banner.textContent = text;
  banner.hidden = !text;
}

// -- wiring -------------------------------------------------------------------------

function start() {
  const select = document.getElementById("filter-status");
  for (const status of STATUSES) select.append(new Option(status, status));
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.pageTokens = [""];
    showTasks();
  });
  document.getElementById("next-page").addEventListener("click", () => {
    state.pageTokens.push(state.nextPageToken);
    showTasks();
  });
  document.getElementById("previous-page").addEventListener("click", () => {
    state.pageTokens.pop();
    showTasks();
  });
  document.getElementById("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = document.getElementById("token").value.trim();
    sessionStorage.setItem("tm-token", state.token);
    document.getElementById("signed-in").textContent = state.token ? "signed in" : "";
    route();
    watch();
  });
  document.getElementById("signed-in").textContent = state.token ? "signed in" : "";
  document.getElementById("cancel-task").addEventListener("click", () => operatorRequest("CancelTask"));
  document.getElementById("complete-task").addEventListener("click", () => operatorRequest("CompleteTask"));
  window.addEventListener("hashchange", route);
  route();
  watch();
}

start();
