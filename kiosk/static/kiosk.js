// Patient kiosk: on-screen keypad, scanner focus, and the idle timeout back to the start.
(function () {
  "use strict";
  var idle = Number(document.body.dataset.idle || 60) * 1000;
  var timer = null;
  function reset() {
    if (timer) clearTimeout(timer);
    timer = setTimeout(function () { window.location.replace("/reset"); }, idle);
  }
  ["pointerdown", "keydown", "input"].forEach(function (e) { document.addEventListener(e, reset, true); });
  reset();
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
