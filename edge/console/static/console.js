// Live states on the Today page: poll a small signature list, fetch only rows that changed.
(function () {
  "use strict";
  var body = document.body;
  if (body.dataset.page !== "today" || !body.dataset.refresh) return;
  var every = parseFloat(body.dataset.refresh) * 1000;
  // The unmatched studies and boxes as rendered: a change after that (even before the first poll) reloads.
  var shown = document.getElementById("visits");
  var known = {}, unmatched = shown ? shown.dataset.unmatched : null, boxes = shown ? shown.dataset.boxes : null;
  document.querySelectorAll("tr[data-order]").forEach(function (tr) { known[tr.dataset.order] = tr.dataset.sig; });

  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "SELECT" || el.tagName === "INPUT");
  }

  function replaceRows(ids) {
    return fetch("/api/rows?ids=" + ids.join(","), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : {}; })
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
    fetch("/api/today", { credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { window.location = "/login"; throw new Error("logged out"); }
        return r.json();
      })
      .then(function (data) {
        var u = data.unmatched.join(","), b = data.boxes;
        if ((unmatched !== null && u !== unmatched) || (boxes !== null && b !== boxes)) {
          if (!busy()) { window.location.reload(); return; }
          // busy: keep what is shown as the baseline, so the reload comes once the field is left
        } else {
          unmatched = u; boxes = b;
        }
        var changed = [];
        Object.keys(data.visits).forEach(function (id) {
          if (known[id] !== data.visits[id]) changed.push(id);
        });
        document.getElementById("count").textContent = data.order.length;
        if (changed.length) return replaceRows(changed);
      })
      .catch(function () {})
      .then(function () { setTimeout(poll, every); });
  }
  setTimeout(poll, every);
})();
