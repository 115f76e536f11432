// Patient kiosk: on-screen keypad, scanner focus, and the idle timeout back to the start,
// with a countdown before it ("touch the screen to stay") so a slow reader is not cut off.
(function () {
  "use strict";
  var body = document.body;
  var idle = Number(body.dataset.idle || 60) * 1000;
  var warning = Math.min(Number(body.dataset.warning || 0) * 1000, idle);
  var overlay = document.getElementById("idle-warning");
  var seconds = document.getElementById("idle-seconds");
  var resetAt = 0, ticker = null;
  function leave() { window.location.replace("/reset"); }
  function tick() {
    var left = resetAt - Date.now();
    if (left <= 0) { clearInterval(ticker); leave(); return; }
    if (overlay && warning > 0 && left <= warning) {
      if (overlay.hidden) { overlay.hidden = false; body.dataset.countdown = "on"; }
      if (seconds) seconds.textContent = String(Math.ceil(left / 1000));
    }
  }
  function stay() {
    resetAt = Date.now() + idle;
    if (overlay && !overlay.hidden) { overlay.hidden = true; delete body.dataset.countdown; }
  }
  ["pointerdown", "keydown", "input"].forEach(function (e) { document.addEventListener(e, stay, true); });
  stay();
  ticker = setInterval(tick, 250);
  var field = document.querySelector("input.field");
  if (!field) return;
  field.focus();
  // The barcode scanner types like a keyboard: keep the field focused so its digits land there.
  document.addEventListener("pointerup", function () { setTimeout(function () { field.focus(); }, 0); });
  document.querySelectorAll(".keypad button[data-key]").forEach(function (b) {
    b.addEventListener("click", function (ev) {
      ev.preventDefault();
      var key = b.dataset.key;
      if (key === "back") field.value = field.value.slice(0, -1);
      else if (field.value.length < (field.maxLength > 0 ? field.maxLength : 32)) field.value += key;
      field.focus();
    });
  });
})();
