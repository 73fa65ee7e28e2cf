// clustermail console: the only script. Refreshes the dashboard's live part
// every 5 seconds from the server-rendered fragment (the pages work without it).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  var url = live.getAttribute("data-refresh");
  var busy = false;
  window.setInterval(function () {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(url, { credentials: "same-origin", redirect: "manual" })
      .then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401) { window.location = "/login"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null) { live.innerHTML = html; } })
      .catch(function () {})
      .then(function () { busy = false; });
  }, 5000);
})();
