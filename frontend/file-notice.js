// Opened from disk (file://), the page cannot work: browsers do not run its module scripts from files,
// and everything it does goes through its server. Show how to open it from the server instead, and keep
// the form from reloading the page (and wiping the prompt) when Run is pressed.
// A classic script, because a classic script still runs from file://.
if (location.protocol === "file:") {
  document.getElementById("file-notice").hidden = false;
  document.getElementById("run-form").addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("run-button").disabled = true;
  document.getElementById("status").textContent = "Not connected: open the page from its server (see above).";
}
