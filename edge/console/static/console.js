// Live states on the Today page: poll a small signature list, fetch only rows that changed.
// A refresh that fails (node stopped, no answer within the deadline, an error page) shows
// "Lost contact with the node — retrying" over the now-old states, until a refresh works again.
(function () {
  "use strict";
  var body = document.body;
  if (body.dataset.page !== "today" || !body.dataset.refresh) return;
  var every = parseFloat(body.dataset.refresh) * 1000;
  // The unmatched studies and boxes as rendered: a change after that (even before the first poll) reloads.
  var shown = document.getElementById("visits");
  var known = {}, unmatched = shown ? shown.dataset.unmatched : null, boxes = shown ? shown.dataset.boxes : null;
  var printer = shown ? shown.dataset.printer : null;
  var deadline = Math.max(4000, every), retryEvery = Math.min(every, 2000), lastContact = new Date(), lost = null;
  document.querySelectorAll("tr[data-order]").forEach(function (tr) { known[tr.dataset.order] = tr.dataset.sig; });

  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "SELECT" || el.tagName === "INPUT");
  }

  // fetch with a deadline: a node that hangs must read as lost, not as "nothing changed".
  function ask(url) {
    var abort = new AbortController();
    var timer = setTimeout(function () { abort.abort(); }, deadline);
    return fetch(url, { credentials: "same-origin", signal: abort.signal })
      .finally(function () { clearTimeout(timer); });
  }

  function two(n) { return (n < 10 ? "0" : "") + n; }

  function showLost() {
    if (!lost) {
      lost = document.createElement("p");
      lost.id = "lost-contact";
      lost.className = "lost-contact";
      lost.setAttribute("role", "alert");
      document.querySelector("main").prepend(lost);
    }
    lost.textContent = "Lost contact with the node — retrying. What you see is from " +
      two(lastContact.getHours()) + ":" + two(lastContact.getMinutes()) + ":" + two(lastContact.getSeconds()) + ".";
    body.classList.add("stale");
  }

  function contactBack() {
    lastContact = new Date();
    if (lost) { lost.remove(); lost = null; }
    body.classList.remove("stale");
  }

  function replaceRows(ids) {
    return ask("/api/rows?ids=" + ids.join(","))
      .then(function (r) { if (!r.ok) throw new Error("rows: " + r.status); return r.json(); })
      .then(function (rows) {
        var tbody = document.querySelector("table.visits tbody");
        Object.keys(rows).forEach(function (id) {
          var tmp = document.createElement("tbody");
          tmp.innerHTML = rows[id].html;
          var fresh = tmp.firstElementChild;
          var old = tbody.querySelector('tr[data-order="' + id + '"]');
          if (old) { old.replaceWith(fresh); } else { tbody.insertBefore(fresh, tbody.firstElementChild); }
          known[id] = rows[id].sig;
        });
      });
  }

  function poll() {
    var ok = false;
    ask("/api/today")
      .then(function (r) {
        if (r.status === 401) { window.location = "/login"; throw new Error("logged out"); }
        if (!r.ok) throw new Error("today: " + r.status);
        return r.json();
      })
      .then(function (data) {
        var u = data.unmatched.join(","), b = data.boxes, p = data.printer;
        if ((unmatched !== null && u !== unmatched) || (boxes !== null && b !== boxes) ||
            (printer !== null && p !== printer)) {
          if (!busy()) { window.location.reload(); return; }
          // busy: keep what is shown as the baseline, so the reload comes once the field is left
        } else {
          unmatched = u; boxes = b; printer = p;
        }
        var changed = [];
        Object.keys(data.visits).forEach(function (id) {
          if (known[id] !== data.visits[id]) changed.push(id);
        });
        document.getElementById("count").textContent = data.order.length;
        if (changed.length) return replaceRows(changed);
      })
      .then(function () { ok = true; contactBack(); },
            function (err) { if (!(err && err.message === "logged out")) showLost(); })
      .then(function () { setTimeout(poll, ok ? every : retryEvery); });
  }
  setTimeout(poll, every);
})();
