// The explorer's only script: Ctrl/Cmd+Enter in the SQL box runs the query. Pages work without it.
document.addEventListener("keydown", function (e) {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target && e.target.id === "sql-q") {
    e.preventDefault();
    e.target.form.submit();
  }
});
