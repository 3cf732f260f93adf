// Sign-in: POST the credentials as JSON; the session cookie is set HttpOnly by the server.
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    username: document.getElementById("username").value,
    password: document.getElementById("password").value,
  };
  const r = await fetch("/read/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (r.status === 204) {
    location.href = "/read/";
  } else {
    const detail = await r.json().catch(() => ({}));
    document.getElementById("error").textContent = detail.detail || `error ${r.status}`;
  }
});
