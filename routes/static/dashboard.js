// The dashboard's script, served by the service itself (the CSP allows no inline script).
//
// Every value that comes from the API is written with textContent or as an SVG attribute, never
// as HTML: customers write the message texts and the names shown here. The API key lives in
// this tab's sessionStorage and travels only in the Authorization header.
"use strict";

(() => {
  const KEY_STORAGE = "msync-key";
  const PAGES_EVERY_MS = 2000;
  const INBOX_EVERY_MS = 5000;
  const CHART_EVERY_MS = 30000;
  const CHART_MINUTES = 60;
  const SYNC_CALL_MS = 2000; // each sync call returns within this, so progress shows as it goes
  const FEED_MAX = 200;
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    me: null,
    pages: new Map(), // pageId -> page as the API gives it
    cards: new Map(), // pageId -> {root, parts}
    runs: new Map(), // pageId -> the dashboard's own "sync to the end" run
    active: new Map(), // pageId -> a live lease from /api/sync/active (when pages carry no sync status)
    stats: new Map(), // pageId -> /api/sync/stats (likewise)
    selected: sessionStorage.getItem("msync-page") || "",
    polledAt: 0, // when the last successful poll of /api/pages began
    chartData: null, // {pageId, buckets, at}: the last activity answer, redrawn on resize
    timers: [],
    streamAbort: null,
    browser: { cursor: null, conversation: null, eventsCursor: null, generation: 0, pagedOn: false },
  };

  // ---- small helpers ------------------------------------------------------------------------

  function text(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  function el(tag, className, content) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = text(content);
    return node;
  }

  function when(ms) {
    return ms ? new Date(ms).toLocaleString() : "–";
  }

  // A time of today as a time; of another day with its date.
  function clock(ms) {
    if (!ms) return "";
    const date = new Date(ms);
    return date.toDateString() === new Date().toDateString() ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function ago(ms) {
    if (!ms) return "–";
    const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (seconds < 90) return seconds + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return when(ms);
  }

  function count(n) {
    return typeof n === "number" ? n.toLocaleString() : "–";
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error) || "HTTP " + status);
      this.status = status;
      this.code = (body && body.code) || "";
      this.body = body || {};
    }
  }

  async function api(path, options = {}) {
    const headers = { Authorization: "Bearer " + state.key };
    const init = { method: options.method || "GET", headers, cache: "no-store" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (response.status === 401) signOut("The API key was refused: " + text(body && body.error));
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  function describe(err) {
    if (err instanceof ApiError) return err.code ? `${err.message} (${err.code})` : err.message;
    return "Network error: " + text(err && err.message);
  }

  // ---- errors that stay until dismissed --------------------------------------------------------

  const errors = new Map(); // message -> {node, countNode, n}

  function showError(context, err) {
    const message = context + ": " + (typeof err === "string" ? err : describe(err));
    const known = errors.get(message);
    if (known) {
      known.n += 1;
      known.countNode.textContent = " ×" + known.n;
      return;
    }
    const node = el("div", "error");
    node.setAttribute("role", "alert");
    const body = el("span", "message", message);
    const countNode = el("span", "count");
    body.append(countNode);
    const close = el("button", "", "×");
    close.type = "button";
    close.title = "Dismiss";
    close.setAttribute("aria-label", "Dismiss this error");
    close.addEventListener("click", () => {
      node.remove();
      errors.delete(message);
    });
    node.append(body, close);
    $("errors").append(node);
    errors.set(message, { node, countNode, n: 1 });
  }

  // ---- signing in and out ------------------------------------------------------------------------

  async function signIn() {
    stopAll();
    try {
      state.me = await api("/api/me");
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) showError("Signing in", err);
      return;
    }
    $("login").hidden = true;
    $("app").hidden = false;
    $("who").hidden = false;
    $("who-user").textContent = "Signed in as " + state.me.user;
    $("who-admin").hidden = !state.me.admin;
    $("inbox-card").hidden = !state.me.admin;
    await refreshPages();
    every(refreshPages, PAGES_EVERY_MS);
    if (state.me.admin) {
      refreshInbox();
      every(refreshInbox, INBOX_EVERY_MS);
    }
    every(refreshChart, CHART_EVERY_MS);
  }

  function signOut(reason) {
    stopAll();
    state.key = "";
    state.me = null;
    sessionStorage.removeItem(KEY_STORAGE);
    $("key").value = "";
    $("login").hidden = false;
    $("app").hidden = true;
    $("who").hidden = true;
    $("inbox-card").hidden = true;
    for (const card of state.cards.values()) card.root.remove();
    state.cards.clear();
    state.pages.clear();
    state.runs.clear();
    state.active.clear();
    state.stats.clear();
    state.selected = "";
    state.chartData = null;
    state.browser.conversation = null;
    // Nothing of the last key's data stays in the page for the next one.
    for (const id of ["page-select", "feed", "conversations", "events", "chart", "inbox-errors"]) {
      $(id).replaceChildren();
    }
    for (const id of ["chart-caption", "reg-result", "replay-result", "feed-status"]) $(id).textContent = "";
    if (reason) showError("Signed out", reason);
  }

  // A poll that is still waiting for its answer is not started again.
  function every(fn, ms) {
    let busy = false;
    state.timers.push(setInterval(async () => {
      if (busy) return;
      busy = true;
      try {
        await fn();
      } finally {
        busy = false;
      }
    }, ms));
  }

  function stopAll() {
    for (const timer of state.timers) clearInterval(timer);
    state.timers = [];
    if (state.streamAbort) state.streamAbort.abort();
    state.streamAbort = null;
  }

  // ---- pages: phase and progress, polled ----------------------------------------------------

  async function refreshPages() {
    const polledAt = Date.now();
    let pages;
    try {
      pages = (await api("/api/pages")).pages;
    } catch (err) {
      if (state.key) showError("Loading pages", err);
      return;
    }
    // A page without its own sync status: the live leases and the sync statistics stand in.
    if (pages.some((p) => !p.sync)) {
      try {
        const [active, stats] = await Promise.all([api("/api/sync/active"), api("/api/sync/stats")]);
        state.active = new Map(active.activeSyncs.map((a) => [a.pageId, a]));
        state.stats = new Map(stats.statistics.map((s) => [s.pageId, s]));
      } catch (err) {
        showError("Loading sync status", err);
      }
    }
    const seen = new Set();
    for (const page of pages) {
      seen.add(page.pageId);
      state.pages.set(page.pageId, page);
    }
    for (const [pageId, card] of state.cards) {
      if (!seen.has(pageId)) {
        card.root.remove();
        state.cards.delete(pageId);
        state.pages.delete(pageId);
      }
    }
    state.polledAt = polledAt;
    for (const page of pages) renderPage(page);
    $("no-pages").hidden = pages.length > 0;
    for (const id of ["activity-card", "feed-card", "browser-card"]) $(id).hidden = pages.length === 0;
    $("pages-status").textContent = "updated " + new Date().toLocaleTimeString();
    renderPageSelect(pages);
  }

  function pageLabel(page) {
    return page.name || page.facebookPageId || page.pageId;
  }

  function cardFor(page) {
    let card = state.cards.get(page.pageId);
    if (card) return card;
    const root = $("page-template").content.firstElementChild.cloneNode(true);
    const q = (cls) => root.querySelector("." + cls);
    const parts = {};
    for (const name of [
      "page-name", "phase", "token", "running", "fb-id", "conversations-count", "progress-text",
      "last-complete", "next-run", "until-row", "until-label", "until", "last-error", "sync-button",
      "browse-button", "run", "run-bar", "run-text", "run-dismiss",
    ]) parts[name] = q(name);
    root.dataset.pageId = page.pageId;
    parts["sync-button"].addEventListener("click", () => syncToEnd(page.pageId));
    parts["browse-button"].addEventListener("click", () => selectPage(page.pageId, true));
    parts["run-dismiss"].addEventListener("click", () => {
      state.runs.delete(page.pageId);
      renderPage(state.pages.get(page.pageId));
    });
    $("pages").append(root);
    card = { root, parts };
    state.cards.set(page.pageId, card);
    return card;
  }

  const PHASES = {
    backfilling: ["backfilling", "busy"],
    idle: ["idle", "ok"],
    paused_token_invalid: ["paused: token invalid", "bad"],
    rate_limited: ["rate limited", "warn"],
    error: ["error", "bad"],
  };

  // A page's sync status as the API gives it (`page.sync`, from the scheduler). Where a page carries
  // none, /api/sync/stats and /api/sync/active stand in for what they can tell.
  function statusOf(page) {
    const sync = page.sync;
    if (sync) {
      return {
        phase: sync.phase,
        until: sync.until,
        conversations: sync.conversations,
        running: Boolean(sync.running),
        progress: sync.progress || null,
        lastCompleteSync: sync.lastCompleteSync,
        nextRun: sync.nextRun,
        lastError: sync.lastError,
      };
    }
    const stats = state.stats.get(page.pageId) || {};
    const lease = state.active.get(page.pageId);
    const hasSession = typeof stats.totalSynced === "number";
    return {
      phase: "",
      until: null,
      conversations: stats.conversations,
      running: Boolean(lease),
      progress: lease
        ? { synced: lease.totalSynced || 0, complete: false }
        : hasSession ? { synced: stats.totalSynced, complete: Boolean(stats.isComplete) } : null,
      lastCompleteSync: stats.completedAt,
      nextRun: null,
      lastError: stats.lastError,
    };
  }

  function renderPage(page) {
    if (!page) return;
    const { root, parts } = cardFor(page);
    const status = statusOf(page);
    root.classList.toggle("selected", page.pageId === state.selected);
    parts["page-name"].textContent = pageLabel(page);
    parts["fb-id"].textContent = page.facebookPageId;

    const [phaseText, phaseClass] = PHASES[status.phase] || [text(status.phase), ""];
    parts.phase.textContent = phaseText;
    parts.phase.className = "badge phase " + phaseClass;
    parts.phase.hidden = !phaseText;
    parts.token.textContent = "token " + text(page.tokenStatus);
    parts.token.className = "badge token " + (page.tokenStatus === "valid" ? "ok" : "bad");
    parts.running.hidden = !status.running;

    parts["conversations-count"].textContent = count(status.conversations);
    const progress = status.progress;
    const stage = progress && (progress.complete ? "complete" : status.running ? "in progress" : "unfinished");
    parts["progress-text"].textContent = progress ? `${count(progress.synced)} synced, ${stage}` : "–";
    parts["last-complete"].textContent = when(status.lastCompleteSync);
    parts["next-run"].textContent = when(status.nextRun);
    parts["until-row"].hidden = !status.until;
    if (status.until) {
      parts["until-label"].textContent = status.phase === "error" ? "Next try" : "Until";
      parts.until.textContent = when(status.until);
    }
    parts["last-error"].hidden = !status.lastError;
    parts["last-error"].textContent = status.lastError ? "Last error: " + status.lastError : "";

    renderRun(page, parts, status);
  }

  // ---- "sync to the end" -----------------------------------------------------------------------

  function renderRun(page, parts, status) {
    const run = state.runs.get(page.pageId);
    parts["sync-button"].disabled = Boolean(run && run.state === "running");
    parts.run.hidden = !run;
    if (!run) return;
    // The other sync is over once a poll that began after our 409 no longer sees its lease.
    if (run.state === "held" && !status.running && state.polledAt > run.finishedAt) {
      run.state = "held-done";
      run.heldFinishedAt = Date.now();
    }
    parts.run.className = "run " + { running: "", done: "done", failed: "failed", held: "held", "held-done": "done" }[run.state];
    parts.run.dataset.state = run.state;
    parts.run.dataset.synced = String(run.synced);
    parts["run-bar"].hidden = !(run.state === "running" || run.state === "held");
    parts["run-dismiss"].hidden = run.state === "running";
    const totals = `${count(run.synced)} synced (${count(run.inserted)} new, ${count(run.updated)} updated, ` +
      `${count(run.unchanged)} unchanged, ${count(run.skipped)} skipped; ${count(run.events)} events)`;
    const seconds = ((run.finishedAt || Date.now()) - run.startedAt) / 1000;
    let message;
    if (run.state === "running") {
      message = `Syncing… call ${run.calls + 1}: ${totals}`;
    } else if (run.state === "done") {
      message = `Done at ${clock(run.finishedAt)}: ${totals} in ${run.calls} call${run.calls === 1 ? "" : "s"}, ` +
        `${seconds.toFixed(1)} s. The page is synced to the end.`;
    } else if (run.state === "failed") {
      message = `Stopped after ${run.calls} call${run.calls === 1 ? "" : "s"}: ${run.error}. So far: ${totals}`;
    } else if (run.state === "held") {
      const synced = status.running && status.progress ? status.progress.synced : null;
      message = "Another sync holds this page: the scheduler's, or another client's (sync_in_progress)" +
        (run.expiresAt ? `, its lease runs to ${clock(run.expiresAt)}` : "") +
        (typeof synced === "number" ? `. Its progress: ${count(synced)} synced.` : ". Waiting for it to finish.");
    } else {
      const progress = status.progress;
      message = `The other sync finished at ${clock(run.heldFinishedAt)}` +
        (progress ? `: ${count(progress.synced)} synced${progress.complete ? ", complete" : ""}.` : ".");
    }
    parts["run-text"].textContent = message;
  }

  async function syncToEnd(pageId) {
    const page = state.pages.get(pageId);
    if (!page) return;
    const run = {
      state: "running", calls: 0, synced: 0, inserted: 0, updated: 0, unchanged: 0, skipped: 0, events: 0,
      startedAt: Date.now(), finishedAt: 0, error: "", session: "",
    };
    state.runs.set(pageId, run);
    renderPage(page);
    let resume = null;
    for (;;) {
      const body = { pageId, facebookPageId: page.facebookPageId, maxDurationMs: SYNC_CALL_MS };
      if (resume) body.resumeSession = resume;
      let result;
      try {
        result = await api("/api/conversations/sync", { method: "POST", body });
      } catch (err) {
        if (err instanceof ApiError && err.code === "sync_in_progress") {
          run.state = "held";
          run.expiresAt = err.body.expiresAt || 0;
        } else {
          run.state = "failed";
          run.error = describe(err);
          showError("Sync of " + pageLabel(page), err);
        }
        run.finishedAt = Date.now();
        renderPage(state.pages.get(pageId));
        return;
      }
      if (state.runs.get(pageId) !== run) return; // signed out or dismissed meanwhile
      run.calls += 1;
      run.synced += result.synced || 0;
      run.inserted += result.inserted || 0;
      run.updated += result.updated || 0;
      run.unchanged += result.unchanged || 0;
      run.skipped += result.skipped || 0;
      run.events += result.eventsInserted || 0;
      run.session = result.syncSessionId || run.session;
      if (!result.hasMore) {
        run.state = "done";
        run.finishedAt = Date.now();
        renderPage(state.pages.get(pageId));
        refreshPages();
        if (pageId === state.selected) {
          loadConversations(true);
          refreshChart();
        }
        return;
      }
      resume = result.resumeSession;
      renderPage(state.pages.get(pageId));
    }
  }

  // ---- registering a page -----------------------------------------------------------------------

  async function register(event) {
    event.preventDefault();
    const facebookPageId = $("reg-page-id").value.trim();
    const accessToken = $("reg-token").value.trim();
    const name = $("reg-name").value.trim();
    const result = $("reg-result");
    result.className = "small muted";
    result.textContent = "Verifying the token with Graph…";
    $("reg-submit").disabled = true;
    try {
      const body = { facebookPageId, accessToken };
      if (name) body.name = name;
      const page = await api("/api/pages", { method: "POST", body });
      for (const id of ["reg-page-id", "reg-token", "reg-name"]) $(id).value = "";
      result.className = "small good";
      result.textContent = `Registered ${pageLabel(page)} (pageId ${page.pageId}).`;
      state.selected = state.selected || page.pageId;
      await refreshPages();
    } catch (err) {
      result.className = "small bad";
      result.textContent = "Not registered: " + describe(err);
      showError("Registering page " + facebookPageId, err);
    } finally {
      $("reg-submit").disabled = false;
    }
  }

  // ---- the selected page: chart, live feed, conversation browser ---------------------------------

  function renderPageSelect(pages) {
    const select = $("page-select");
    const options = pages.map((p) => {
      const option = new Option(pageLabel(p), p.pageId);
      return option;
    });
    const same = select.options.length === options.length &&
      options.every((o, i) => select.options[i].value === o.value && select.options[i].text === o.text);
    if (!same) select.replaceChildren(...options);
    if (!state.pages.has(state.selected)) state.selected = pages.length ? pages[0].pageId : "";
    if (state.selected && (select.value !== state.selected || !state.streamAbort)) {
      selectPage(state.selected, false);
    }
  }

  function selectPage(pageId, scroll) {
    const changed = pageId !== state.selected || !state.streamAbort;
    state.selected = pageId;
    sessionStorage.setItem("msync-page", pageId);
    $("page-select").value = pageId;
    for (const [id, card] of state.cards) card.root.classList.toggle("selected", id === pageId);
    if (changed) {
      stream(pageId);
      refreshChart();
      $("conversations").replaceChildren();
      loadConversations(true);
    }
    if (scroll) $("browser-card").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // The chart: one bar per minute, drawn with DOM calls; numbers only, from the API.
  async function refreshChart() {
    const pageId = state.selected;
    const chart = $("chart");
    if (!pageId) {
      state.chartData = null;
      chart.replaceChildren();
      $("chart-caption").textContent = "";
      return;
    }
    let data;
    try {
      data = await api(`/api/pages/${encodeURIComponent(pageId)}/activity?minutes=${CHART_MINUTES}`);
    } catch (err) {
      showError("Loading activity", err);
      return;
    }
    if (pageId !== state.selected) return;
    state.chartData = { pageId, buckets: data.perMinute || [], at: Date.now() };
    drawChart();
  }

  function drawChart() {
    const chart = $("chart");
    const data = state.chartData;
    if (!data || data.pageId !== state.selected) return;
    const buckets = data.buckets;
    // Drawn at the size it shows, so text is not stretched; redrawn when the window resizes.
    const width = Math.max(200, Math.round(chart.clientWidth || 600));
    const height = 130, top = 16, bottom = 18, left = 2, right = 2;
    const max = Math.max(1, ...buckets.map((b) => b.events));
    const slot = (width - left - right) / Math.max(1, buckets.length);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    const title = document.createElementNS(SVG, "title");
    title.textContent = "Events stored per minute";
    svg.append(title);
    const base = height - bottom;
    buckets.forEach((b, i) => {
      const h = b.events ? Math.max(2, ((base - top) * b.events) / max) : 1;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(left + i * slot + 0.5));
      rect.setAttribute("y", String(base - h));
      rect.setAttribute("width", String(Math.max(1, slot - (slot > 4 ? 1.5 : 0.5))));
      rect.setAttribute("height", String(h));
      rect.setAttribute("class", b.events ? "bar" : "bar zero");
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = `${clock(b.minute)}: ${b.events} event${b.events === 1 ? "" : "s"}`;
      rect.append(tip);
      svg.append(rect);
    });
    const axis = document.createElementNS(SVG, "line");
    axis.setAttribute("x1", "0");
    axis.setAttribute("x2", String(width));
    axis.setAttribute("y1", String(base + 0.5));
    axis.setAttribute("y2", String(base + 0.5));
    axis.setAttribute("class", "axis");
    svg.append(axis);
    const label = (x, y, anchor, content) => {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", String(x));
      t.setAttribute("y", String(y));
      t.setAttribute("text-anchor", anchor);
      t.textContent = content;
      svg.append(t);
    };
    label(left, height - 4, "start", `${buckets.length} min ago`);
    label(width - right, height - 4, "end", "now");
    const total = buckets.reduce((sum, b) => sum + b.events, 0);
    label(left, 11, "start", total ? `peak ${max} per minute` : "no events");
    chart.replaceChildren(svg);
    $("chart-caption").textContent =
      `${count(total)} event${total === 1 ? "" : "s"} stored in the last ${buckets.length} minutes ` +
      `for ${pageLabel(state.pages.get(data.pageId) || {})}; refreshed every 30 s (${clock(data.at)}).`;
  }

  // The live feed. EventSource cannot send an Authorization header, so the stream is read with
  // fetch() and a ReadableStream reader, resuming with Last-Event-ID after a disconnect.
  async function stream(pageId) {
    if (state.streamAbort) state.streamAbort.abort();
    $("feed").replaceChildren();
    $("feed-empty").hidden = false;
    if (!pageId) return;
    const abort = new AbortController();
    state.streamAbort = abort;
    let lastId = "";
    while (!abort.signal.aborted) {
      try {
        const headers = { Authorization: "Bearer " + state.key, Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch("/api/events/stream?pageId=" + encodeURIComponent(pageId), {
          headers, signal: abort.signal, cache: "no-store",
        });
        if (!response.ok) {
          let body = null;
          try { body = await response.json(); } catch (_) { body = null; }
          throw new ApiError(response.status, body);
        }
        $("feed-status").textContent = "live";
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const message = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const data = [];
            for (const line of message.split("\n")) {
              if (line.startsWith(":")) continue; // a keep-alive comment
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              let content = colon < 0 ? "" : line.slice(colon + 1);
              if (content.startsWith(" ")) content = content.slice(1);
              if (field === "id") lastId = content;
              if (field === "data") data.push(content);
            }
            if (data.length && !abort.signal.aborted) showEvent(JSON.parse(data.join("\n")));
          }
        }
        if (abort.signal.aborted) return;
        $("feed-status").textContent = "reconnecting…";
      } catch (err) {
        if (abort.signal.aborted) return;
        $("feed-status").textContent = "reconnecting: " + describe(err);
        if (err instanceof ApiError && err.status !== 503) showError("Live events", err);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  function eventItem(event, withConversation) {
    const item = el("li");
    item.append(el("span", "when", clock(event.eventTimestamp)), el("span", "type", event.eventType));
    item.append(el("span", "conv", withConversation ? "conversation #" + event.conversationId : ""));
    if (event.content !== null && event.content !== undefined && event.content !== "") {
      item.append(el("span", "content", event.content));
    }
    return item;
  }

  let listRefresh = 0;

  function showEvent(event) {
    const feed = $("feed");
    feed.prepend(eventItem(event, true));
    $("feed-empty").hidden = true;
    while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
    // New activity moves a conversation to the top: reload the list's first page (once a second
    // at most), unless the reader is in a conversation or has paged further down.
    if (!listRefresh && !state.browser.conversation && !state.browser.pagedOn) {
      listRefresh = setTimeout(() => {
        listRefresh = 0;
        if (!state.browser.conversation && !state.browser.pagedOn) loadConversations(true);
      }, 1000);
    }
  }

  // Conversations newest first, "More" through nextCursor; then one conversation's events.
  async function loadConversations(fresh) {
    const pageId = state.selected;
    const browser = state.browser;
    if (fresh) {
      browser.generation += 1;
      browser.cursor = null;
      browser.pagedOn = false;
      showConversationList();
    } else {
      browser.pagedOn = true;
    }
    const generation = browser.generation;
    if (!pageId) return;
    const query = new URLSearchParams({ pageId, limit: "25" });
    if (browser.cursor) query.set("cursor", browser.cursor);
    let data;
    try {
      data = await api("/api/conversations?" + query);
    } catch (err) {
      showError("Loading conversations", err);
      return;
    }
    if (generation !== browser.generation) return;
    const items = data.conversations.map(conversationItem);
    // A fresh list replaces the old one only once the answer is in, so a reload does not flicker.
    if (fresh) $("conversations").replaceChildren(...items);
    else $("conversations").append(...items);
    browser.cursor = data.nextCursor;
    $("conversations-more").hidden = !data.nextCursor;
    $("conversations-empty").hidden = $("conversations").childElementCount > 0;
    $("browser-title").textContent = "Conversations of " + pageLabel(state.pages.get(pageId) || {});
  }

  function conversationItem(conversation) {
    const item = el("li");
    item.tabIndex = 0;
    item.dataset.conversationId = String(conversation.id);
    const line1 = el("div", "line1");
    line1.append(
      el("span", "sender", conversation.senderName || conversation.senderId),
      el("span", "when muted small", when(conversation.lastMessageTime)),
    );
    item.append(line1, el("span", "last", conversation.lastMessage));
    const open = () => openConversation(conversation);
    item.addEventListener("click", open);
    item.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        open();
      }
    });
    return item;
  }

  function showConversationList() {
    state.browser.conversation = null;
    $("conversations-view").hidden = false;
    $("events-view").hidden = true;
    $("back").hidden = true;
    $("browser-title").textContent = "Conversations of " + pageLabel(state.pages.get(state.selected) || {});
  }

  async function openConversation(conversation) {
    const browser = state.browser;
    browser.conversation = conversation;
    browser.eventsCursor = null;
    $("conversations-view").hidden = true;
    $("events-view").hidden = false;
    $("back").hidden = false;
    $("events").replaceChildren();
    $("browser-title").textContent = conversation.senderName || conversation.senderId;
    $("conversation-meta").textContent =
      `Conversation #${conversation.id} · ${count(conversation.messageCount)} messages · ` +
      `last message ${when(conversation.lastMessageTime)}`;
    await loadEvents();
  }

  async function loadEvents() {
    const conversation = state.browser.conversation;
    if (!conversation) return;
    const query = new URLSearchParams({ limit: "50" });
    if (state.browser.eventsCursor) query.set("cursor", state.browser.eventsCursor);
    let data;
    try {
      data = await api(`/api/conversations/${encodeURIComponent(conversation.id)}/events?` + query);
    } catch (err) {
      showError("Loading events", err);
      return;
    }
    if (state.browser.conversation !== conversation) return;
    for (const event of data.events) $("events").append(eventItem(event, false));
    state.browser.eventsCursor = data.nextCursor;
    $("events-more").hidden = !data.nextCursor;
    $("events-empty").hidden = $("events").childElementCount > 0;
  }

  // ---- inbox health (admin keys only) --------------------------------------------------------------

  async function refreshInbox() {
    let health;
    try {
      health = await api("/api/admin/inbox");
    } catch (err) {
      showError("Loading the inbox", err);
      return;
    }
    for (const name of ["pending", "failed", "invalid", "applied", "ignored"]) {
      $("inbox-" + name).textContent = count(health[name]);
    }
    $("inbox-failed").className = health.failed ? "bad" : "";
    $("inbox-invalid").className = health.invalid ? "bad" : "";
    $("inbox-oldest").textContent = health.oldestPendingAt ? ago(health.oldestPendingAt) : "none";
    const list = $("inbox-errors");
    list.replaceChildren(...health.recentErrors.map((e) => {
      const item = el("li");
      item.append(
        el("span", "status bad", e.status),
        el("span", "muted", `#${e.id} · ${when(e.receivedAt)} · `),
        el("span", "", e.error || "(no message)"),
      );
      return item;
    }));
    $("inbox-no-errors").hidden = health.recentErrors.length > 0;
    $("inbox-status").textContent = "updated " + new Date().toLocaleTimeString();
  }

  async function replay() {
    const button = $("replay");
    button.disabled = true;
    try {
      const result = await api("/api/admin/inbox/replay", { method: "POST" });
      $("replay-result").textContent =
        `${count(result.requeued)} row${result.requeued === 1 ? "" : "s"} back to pending at ${clock(Date.now())}.`;
      await refreshInbox();
    } catch (err) {
      showError("Replaying the inbox", err);
    } finally {
      button.disabled = false;
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = $("key").value.trim();
      if (!state.key) return;
      sessionStorage.setItem(KEY_STORAGE, state.key);
      signIn();
    });
    $("forget").addEventListener("click", () => signOut(""));
    $("register-form").addEventListener("submit", register);
    $("page-select").addEventListener("change", (e) => selectPage(e.target.value, false));
    $("conversations-more").addEventListener("click", () => loadConversations(false));
    $("conversations-refresh").addEventListener("click", () => loadConversations(true));
    $("events-more").addEventListener("click", loadEvents);
    $("back").addEventListener("click", () => loadConversations(true));
    $("replay").addEventListener("click", replay);
    let resize = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resize);
      resize = setTimeout(drawChart, 150);
    });
    if (state.key) signIn();
  });
})();
