// solidflow ui: keeps the runs list and the run page live with server-sent events.
// Plain script, no build step. Text from runs is only ever set with textContent (or
// comes as server-escaped HTML), so a log line is never interpreted as markup.
(function () {
  "use strict";

  var LEVELS = { DEBUG: 0, INFO: 1, WARNING: 2, ERROR: 3 };

  function byId(id) { return document.getElementById(id); }
  function readJson(id) {
    var el = byId(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmtDuration(ms) {
    ms = Math.max(0, ms);
    if (ms < 1000) return ms + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.floor(ms / 60000) + " m " + String(Math.floor(ms / 1000) % 60).padStart(2, "0") + " s";
    return Math.floor(ms / 3600000) + " h " + String(Math.floor(ms / 60000) % 60).padStart(2, "0") + " m";
  }
  function clock(t) {
    var d = new Date(t);
    return d.toISOString().substring(11, 23);
  }

  // --- runs list -------------------------------------------------------------------
  var rows = byId("runs-rows");
  if (rows && rows.dataset.stream) {
    var list = new EventSource(rows.dataset.stream);
    list.addEventListener("rows", function (e) { rows.innerHTML = e.data; });
  }

  // --- run page --------------------------------------------------------------------
  var root = byId("run");
  if (root) runPage(root);

  function runPage(root) {
    var runId = root.dataset.runId;
    var started = Number(root.dataset.started);
    var ended = root.dataset.status !== "STARTED";
    var states = readJson("step-states") || {};
    var timeline = readJson("timeline-data") || { start: started, end: null, attempts: [] };
    var nodes = {};
    document.querySelectorAll("svg.dag g.step").forEach(function (g) { nodes[g.dataset.step] = g; });
    var counts = {};
    document.querySelectorAll("#dag-counts .count").forEach(function (el) {
      counts[el.dataset.state] = el.querySelector(".n");
    });
    var bars = {};
    timeline.attempts.forEach(function (a, i) { bars[a.step + "#" + a.attempt] = i; });
    var entries = [];
    var selected = null;

    // Step states and the DAG.
    function setState(step, st) {
      var old = states[step] || "pending";
      if (old === st) return;
      states[step] = st;
      [[old, -1], [st, 1]].forEach(function (p) {
        var n = counts[p[0]];
        if (n) n.textContent = String(Number(n.textContent) + p[1]);
      });
      var g = nodes[step];
      if (g) {
        g.setAttribute("class", "step " + st + (step === selected ? " selected" : ""));
        var title = g.querySelector("title");
        if (title) title.textContent = step + " — " + st;
      }
    }

    // The timeline: one bar per attempt, lanes by worker/host, packed into rows.
    var gantt = byId("gantt");
    var ganttDirty = true;
    function drawGantt() {
      ganttDirty = false;
      var attempts = timeline.attempts;
      if (!attempts.length) {
        gantt.innerHTML = '<p class="explain">No step has started yet.</p>';
        return;
      }
      var now = Date.now();
      var t0 = timeline.start || attempts[0].start_ms;
      var t1 = timeline.end || (ended ? 0 : now);
      attempts.forEach(function (a) { t1 = Math.max(t1, a.end_ms || now); });
      var span = Math.max(1, t1 - t0);
      var lanes = [], laneOf = {};
      attempts.slice().sort(function (a, b) { return a.start_ms - b.start_ms; }).forEach(function (a) {
        var lane = laneOf[a.lane];
        if (!lane) { lane = laneOf[a.lane] = { name: a.lane, rows: [], bars: [] }; lanes.push(lane); }
        var end = a.end_ms || now, r = 0;
        while (r < lane.rows.length && lane.rows[r] > a.start_ms) r++;
        lane.rows[r] = end;
        lane.bars.push([a, r]);
      });
      var W = Math.max(400, gantt.clientWidth || 900), L = 150, RH = 16, y = 22;
      var x = function (t) { return L + (t - t0) / span * (W - L - 40); };
      var out = [];
      for (var k = 0; k <= 5; k++) {
        var tx = x(t0 + span * k / 5);
        out.push('<line class="tick" x1="' + tx + '" x2="' + tx + '" y1="14" y2="100%"></line>' +
          '<text class="tick" x="' + tx + '" y="11">' + esc(fmtDuration(span * k / 5)) + "</text>");
      }
      lanes.forEach(function (lane) {
        var h = lane.rows.length * RH;
        out.push('<text class="lane" x="4" y="' + (y + 12) + '">' + esc(lane.name) + "</text>");
        out.push('<line class="lane-sep" x1="0" x2="' + W + '" y1="' + (y + h + 2) + '" y2="' + (y + h + 2) + '"></line>');
        lane.bars.forEach(function (br) {
          var a = br[0], bx = x(a.start_ms), bw = Math.max(2, x(a.end_ms || now) - bx), by = y + br[1] * RH;
          var label = a.step.replace(/\.compute$/, "") + (a.attempt > 1 ? " #" + a.attempt : "");
          out.push('<g class="bar ' + esc(a.outcome) + '" data-step="' + esc(a.step) + '" data-attempt="' + a.attempt + '">' +
            "<title>" + esc(a.step + " attempt " + a.attempt + ": " + a.outcome + ", " +
              fmtDuration((a.end_ms || now) - a.start_ms) + " on " + a.host + " pid " + a.pid +
              (a.worker ? " worker " + a.worker : "")) + "</title>" +
            '<rect x="' + bx + '" y="' + by + '" width="' + bw + '" height="' + (RH - 3) + '" rx="2"></rect>' +
            (bw > 50 ? '<text x="' + (bx + 3) + '" y="' + (by + 10) + '">' + esc(label) + "</text>" : "") + "</g>");
        });
        y += h + 6;
      });
      gantt.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" class="gantt-svg" width="' + W + '" height="' + (y + 4) + '">' + out.join("") + "</svg>";
    }
    function setBar(b) {
      var key = b.step + "#" + b.attempt;
      if (key in bars) timeline.attempts[bars[key]] = b;
      else { bars[key] = timeline.attempts.length; timeline.attempts.push(b); }
      ganttDirty = true;
    }

    // The log: every event is kept, but only the rows in view are in the DOM (fixed-height
    // rows in a tall canvas), so a run with 100,000 lines scrolls and filters smoothly.
    var logRows = byId("log-rows"), logScroll = byId("log-scroll"), logInfo = byId("log-info");
    var logCanvas = byId("log-canvas"), logTable = logCanvas.querySelector("table");
    var fStep = byId("log-step"), fLevel = byId("log-level"), fText = byId("log-text");
    // `follow`: the view is at the newest line and stays there as lines arrive, until
    // the reader scrolls up.
    var view = [], rowHeight = 0, window0 = -1, window1 = -1, follow = true;
    function matches(e) {
      var step = fStep.value.trim();
      if (step && e.step !== step && e.step !== step + ".compute") return false;
      if ((LEVELS[e.level] || 0) < (LEVELS[fLevel.value] || 0)) return false;
      var text = fText.value.trim().toLowerCase();
      return !text || e.msg.toLowerCase().indexOf(text) >= 0 || (e.step || "").toLowerCase().indexOf(text) >= 0;
    }
    function row(e) {
      var tr = document.createElement("tr");
      tr.className = "lvl-" + e.level.toLowerCase() + (e.stream ? " " + e.stream : "");
      tr.dataset.id = e.id;
      var cells = [clock(e.t), e.level, e.step || "", e.type, e.msg];
      cells.forEach(function (c, i) {
        var td = document.createElement("td");
        if (i === 2 && c) {
          var a = document.createElement("a");
          a.href = "#"; a.className = "step-link"; a.dataset.step = c; a.textContent = c.replace(/\.compute$/, "");
          td.appendChild(a);
        } else if (i === 4 && e.stream) {
          var s = document.createElement("span");
          s.className = "stream " + e.stream; s.textContent = e.stream;
          td.appendChild(s);
          td.appendChild(document.createTextNode(" " + c.replace(/^\[(stdout|stderr)\] /, "")));
        } else {
          td.textContent = c;
        }
        if (i === 4) td.title = c;
        tr.appendChild(td);
      });
      return tr;
    }
    function info() {
      logInfo.textContent = view.length + " of " + entries.length + " events match";
    }
    // Within a row of the end counts as at the end (a scroll bar appearing takes less).
    function atBottom() {
      return logScroll.scrollTop + logScroll.clientHeight >= logScroll.scrollHeight - unit() - 4;
    }
    var setTop = -1;
    function toBottom() {
      logScroll.scrollTop = logScroll.scrollHeight;
      setTop = logScroll.scrollTop;
      follow = true;
    }
    // Draws the rows in (and a little around) the visible part of the scroll box.
    function unit() {
      if (!rowHeight && view.length) {
        logRows.replaceChildren(row(view[0]));
        rowHeight = logRows.firstElementChild.getBoundingClientRect().height;
        window0 = window1 = -1;
      }
      return rowHeight || 20;
    }
    function drawWindow(force) {
      var h = unit();
      logCanvas.style.height = (view.length * h) + "px";
      var first = Math.max(0, Math.floor(logScroll.scrollTop / h) - 20);
      var last = Math.min(view.length, Math.ceil((logScroll.scrollTop + logScroll.clientHeight) / h) + 20);
      if (!force && first === window0 && last === window1) return;
      window0 = first; window1 = last;
      var frag = document.createDocumentFragment();
      for (var i = first; i < last; i++) frag.appendChild(row(view[i]));
      logRows.replaceChildren(frag);
      logTable.style.top = (first * h) + "px";
    }
    function renderLog() {
      view = entries.filter(matches);
      info();
      drawWindow(true);
      toBottom();
      drawWindow(false);
    }
    function appendLog(batch) {
      var added = false;
      batch.forEach(function (e) {
        if (matches(e)) { view.push(e); added = true; }
      });
      info();
      if (!added) return;
      logCanvas.style.height = (view.length * unit()) + "px";
      if (follow) toBottom();
      drawWindow(follow || window1 >= view.length - batch.length);
    }
    logScroll.addEventListener("scroll", function () {
      // Only the reader's own scrolling decides whether to follow.
      if (logScroll.scrollTop !== setTop) follow = atBottom();
      drawWindow(false);
    });
    [fStep, fText].forEach(function (el) { el.addEventListener("input", renderLog); });
    fLevel.addEventListener("change", renderLog);
    byId("log-clear").addEventListener("click", function () {
      fStep.value = ""; fText.value = ""; fLevel.value = "DEBUG"; renderLog();
    });

    // Clicking a step filters the log to it and shows its detail.
    // The detail panel follows the selected step live: a new event of that step reloads
    // it (at most one request in flight, and one more after it if events kept coming).
    var detail = byId("step-detail"), detailBusy = false, detailAgain = false;
    function loadDetail() {
      if (!selected) return;
      if (detailBusy) { detailAgain = true; return; }
      detailBusy = true;
      var step = selected;
      fetch("/runs/" + encodeURIComponent(runId) + "/steps/" + encodeURIComponent(step) + "?fragment=1")
        .then(function (r) { return r.text(); })
        .then(function (html) { if (selected === step) detail.innerHTML = html; })
        .catch(function () { detail.textContent = "Could not load the step detail."; })
        .then(function () {
          detailBusy = false;
          if (detailAgain) { detailAgain = false; loadDetail(); }
        });
    }
    function selectStep(step) {
      if (selected && nodes[selected]) nodes[selected].classList.remove("selected");
      selected = step;
      if (nodes[step]) nodes[step].classList.add("selected");
      fStep.value = step;
      renderLog();
      loadDetail();
    }
    document.addEventListener("click", function (ev) {
      var target = ev.target.closest ? ev.target.closest("[data-step]") : null;
      if (!target || !root.contains(target) || target.closest(".step-panel")) return;
      ev.preventDefault();
      selectStep(target.dataset.step);
    });
    document.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && ev.target.matches && ev.target.matches("g.step")) selectStep(ev.target.dataset.step);
    });

    // When the run ends, refresh the header and actions from the server.
    function refreshHeader() {
      fetch(location.href).then(function (r) { return r.text(); }).then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        [".run-header", ".actions"].forEach(function (sel) {
          var fresh = doc.querySelector(sel), old = document.querySelector(sel);
          if (fresh && old) old.replaceWith(fresh);
        });
      }).catch(function () {});
    }

    // Events: batched per frame so thousands of them never block the page.
    // A reconnecting EventSource resumes after the last id it saw (`Last-Event-ID`); the
    // id check also keeps a line from ever being shown twice.
    var queue = [], scheduled = false, lastId = 0;
    function flush() {
      scheduled = false;
      var batch = queue; queue = [];
      var endedNow = false, fresh = [], selectedChanged = false;
      batch.forEach(function (d) {
        if (d.id <= lastId) return;
        lastId = d.id;
        if (selected && (d.step === selected || d.end)) selectedChanged = true;
        if (d.step && d.state) setState(d.step, d.state);
        if (d.bar) setBar(d.bar);
        if (d.end) { endedNow = true; timeline.end = d.t; }
        var entry = { id: d.id, t: d.t, type: d.type, step: d.step, level: d.level, msg: d.msg, stream: d.stream };
        entries.push(entry);
        fresh.push(entry);
      });
      appendLog(fresh);
      if (selectedChanged) loadDetail();
      if (endedNow && !ended) { ended = true; refreshHeader(); }
      if (ganttDirty) drawGantt();
    }
    var source = new EventSource("/runs/" + encodeURIComponent(runId) + "/events");
    source.onmessage = function (e) {
      queue.push(JSON.parse(e.data));
      if (!scheduled) { scheduled = true; setTimeout(flush, 30); }
    };
    source.addEventListener("end", function () { source.close(); });

    drawGantt();
    renderLog();
    setInterval(function () {
      if (ended) return;
      var dur = byId("run-duration");
      if (dur) dur.textContent = fmtDuration(Date.now() - started);
      drawGantt();
    }, 500);
    window.addEventListener("resize", drawGantt);
  }
})();
