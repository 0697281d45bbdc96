// The explorer's only script; every page works without it.
// Ctrl/Cmd+Enter in the SQL box runs the query.
document.addEventListener("keydown", function (e) {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target && e.target.id === "sql-q") {
    e.preventDefault();
    e.target.form.submit();
  }
});
// Sections marked data-src (a unit's neighbours) are filled in from the server after the page
// shows; the HTML comes from the same templates (escaped there). On failure the link stays.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-src]").forEach(function (el) {
    fetch(el.getAttribute("data-src"))
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { el.outerHTML = html; })
      .catch(function () { var s = el.querySelector(".loading"); if (s) { s.textContent = "(could not load: follow the link)"; } });
  });
});
