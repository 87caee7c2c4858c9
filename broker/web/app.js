// brokerd's page: poll the JSON endpoints once a second (?html=1 adds the sections, rendered
// and escaped by brokerd) and swap them in; the action buttons POST to /api/queues/<name>/<action>.
(function () {
  "use strict";
  var body = document.body;
  var page = body.getAttribute("data-page");
  if (page === "login") return;  // the login form is a plain form: nothing to poll yet
  var statusEl = document.getElementById("status");
  var summaryEl = document.getElementById("summary");
  var filter = document.getElementById("task-filter");
  var qfilter = document.getElementById("queue-filter");
  var params = new URLSearchParams(window.location.search);
  var qoffset = parseInt(params.get("offset") || "0", 10) || 0;  // the page of queues shown
  var busy = false;
  var polls = 0;  // polls so far (the graphs are fetched on every tenth)
  // the task list's page and order (the pager's and the column heads' links set them)
  // (?toffset=&tsort=&torder=&tlimit=&tq= in the page's address open the list that way: a link to it)
  var tasks = {offset: parseInt(params.get("toffset") || "0", 10) || 0, sort: params.get("tsort") || "received",
               order: params.get("torder") || "desc", limit: parseInt(params.get("tlimit") || "50", 10) || 50};

  function swap(name, markup) {
    var el = document.querySelector('[data-section="' + name + '"]');
    if (el && el.innerHTML !== markup) el.innerHTML = markup;
  }

  function getJSON(url) {
    return fetch(url, {headers: {"Accept": "application/json"}, cache: "no-store"}).then(function (r) {
      if (r.status === 401) window.location.assign("/login");  // the session idled out: log in again
      if (!r.ok && r.status !== 404) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  function taskQuery() {
    var q = "/api/tasks?html=1&limit=" + tasks.limit + "&offset=" + tasks.offset + "&sort=" + encodeURIComponent(tasks.sort) +
      "&order=" + encodeURIComponent(tasks.order);
    if (filter) {
      var st = filter.elements.state.value, nm = filter.elements.name.value.trim();
      var search = filter.elements.q ? filter.elements.q.value.trim() : "";
      if (st) q += "&state=" + encodeURIComponent(st);
      if (nm) q += "&name=" + encodeURIComponent(nm);
      if (search) q += "&q=" + encodeURIComponent(search);
    }
    return q;
  }

  function overviewQuery() {
    var q = "/api/overview?html=1&offset=" + qoffset;
    var name = qfilter ? qfilter.elements.q.value.trim() : "";
    if (name) q += "&q=" + encodeURIComponent(name);
    return q;
  }

  function localTimes() {
    var els = document.querySelectorAll("time[data-ts]");
    for (var i = 0; i < els.length; i++) {
      var d = new Date(parseFloat(els[i].getAttribute("data-ts")) * 1000);
      els[i].textContent = d.toLocaleTimeString();
      els[i].title = d.toISOString();
    }
  }

  function poll() {
    if (busy) return;
    busy = true;
    var work;
    if (page === "worker") {  // the worker page: its own HTML again, the worker section swapped in
      work = fetch(window.location.pathname, {cache: "no-store"}).then(function (r) {
        if (r.status === 401) window.location.assign("/login");
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      }).then(function (text) {
        var el = new DOMParser().parseFromString(text, "text/html").querySelector('[data-section="worker"]');
        if (el) swap("worker", el.innerHTML);
      });
    } else if (page === "task") {
      work = getJSON("/api/task/" + encodeURIComponent(body.getAttribute("data-task")) + "?html=1").then(function (d) {
        swap("task", d.html.task);
      });
    } else {
      // a user without results-read gets no task list (brokerd says so in its place): not polled
      var noGrant = document.querySelector('[data-section="tasks"] .no-grant');
      var taskList = noGrant ? Promise.resolve(null) : getJSON(taskQuery());
      // the graphs move in 10 s steps: fetched on the first poll and every tenth after it
      var graphs = noGrant || polls++ % 10 ? Promise.resolve(null) : getJSON("/api/graphs?html=1");
      work = Promise.all([getJSON(overviewQuery()), taskList, graphs]).then(function (res) {
        var h = res[0].html;
        swap("queues", h.queues); swap("workers", h.workers); swap("dead", h.dead); swap("schedules", h.schedules);
        if (h.limits !== undefined) swap("limits", h.limits);
        if (h.tenants !== undefined) swap("tenants", h.tenants);
        if (h.replication !== undefined) swap("replication", h.replication);
        summaryEl.innerHTML = h.summary;
        if (res[1]) swap("tasks", res[1].html.tasks);
        if (res[2]) swap("graphs", res[2].html.graphs);
      });
    }
    work.then(function () {
      localTimes();
      body.setAttribute("data-live", "ok");
      statusEl.textContent = "live · " + new Date().toLocaleTimeString();
      statusEl.className = "ok";
    }).catch(function (e) {
      body.setAttribute("data-live", "error");
      statusEl.textContent = "not updating: " + e.message;
      statusEl.className = "err";
    }).then(function () { busy = false; });
  }

  // Actions: the buttons sit in plain forms (POST without JavaScript too); here they go by fetch.
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a[data-offset]") : null;
    if (a) {  // the queue pager: another page of queues, in place
      ev.preventDefault();
      qoffset = parseInt(a.getAttribute("data-offset"), 10) || 0;
      busy = false; poll();
      return;
    }
    var t = ev.target.closest ? ev.target.closest("a[data-task-offset], a[data-sort]") : null;
    if (t) {  // the task list: another page, or another order (back to its first page)
      ev.preventDefault();
      if (t.hasAttribute("data-sort")) {
        tasks.sort = t.getAttribute("data-sort"); tasks.order = t.getAttribute("data-order"); tasks.offset = 0;
      } else {
        tasks.offset = parseInt(t.getAttribute("data-task-offset"), 10) || 0;
      }
      busy = false; poll();
      return;
    }
    // the limits panel's "set rate": its action is the typed task name and limit
    var rs = ev.target.closest ? ev.target.closest("button[data-rate-set]") : null;
    if (rs && rs.form) {
      rs.setAttribute("data-action", "/api/rates/task/" + encodeURIComponent(rs.form.elements.task.value.trim()) +
                      "?limit=" + encodeURIComponent(rs.form.elements.limit.value.trim()));
    }
    var b = ev.target.closest ? ev.target.closest("button[data-action]") : null;
    if (!b) return;
    ev.preventDefault();
    var msg = b.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) return;
    b.disabled = true;
    // brokerd with users: the form's hidden CSRF token (tied to this session) goes in a header
    var headers = {"Accept": "application/json"};
    var token = b.form && b.form.elements.csrf;
    if (token) headers["X-CSRF-Token"] = token.value;
    fetch(b.getAttribute("data-action"), {method: "POST", headers: headers})
      .then(function (r) { return r.json(); })
      .then(function (d) {
        statusEl.textContent = d.message || d.error;
        var reply = document.getElementById("reply");  // the worker page shows the worker's answer
        if (reply) reply.textContent = d.message || d.error;
        if (d.ok && d.new_task && d.next) window.location.assign(d.next);  // a retry: to the new task's page
      })
      .catch(function (e) { statusEl.textContent = "action failed: " + e.message; })
      .then(function () { busy = false; poll(); });
  });
  if (filter && filter.elements.q && params.get("tq")) filter.elements.q.value = params.get("tq");
  if (filter) {
    var refilterTasks = function () { tasks.offset = 0; poll(); };  // a new filter starts at its first page
    filter.addEventListener("input", refilterTasks);
    filter.addEventListener("change", refilterTasks);
    // the page's CSP allows no inline handlers: Enter in the filter must not leave the page
    filter.addEventListener("submit", function (ev) { ev.preventDefault(); poll(); });
  }
  if (qfilter) {
    var refilter = function () { qoffset = 0; poll(); };
    qfilter.addEventListener("input", refilter);
    qfilter.addEventListener("submit", function (ev) { ev.preventDefault(); refilter(); });
  }
  localTimes();
  poll();
  setInterval(poll, 1000);
})();
