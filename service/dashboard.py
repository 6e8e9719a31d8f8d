"""The dashboard page: one static HTML file that asks for your token (kept in the browser tab's
sessionStorage, sent as a Bearer header) and renders ``GET /v1/dashboard`` every few seconds.
No template engine, no cookies, nothing a user could see of another's."""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tether</title>
<style>
 body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
 table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:left}
 .on{color:#0a7d2c;font-weight:600}.off{color:#b00020}.muted{color:#777}code{font-size:.85em}
 #login{display:none}input{width:28rem;padding:.3rem}
</style></head><body>
<h1>Tether</h1>
<p class="muted">API: <a href="/docs">/docs</a> · <a href="/openapi.json">/openapi.json</a> ·
<a href="/healthz">/healthz</a> · <a href="/metrics">/metrics</a></p>
<div id="login"><p>Paste your token (<code>token</code> in <code>$TETHER_HOME/service.json</code>):</p>
<form id="f"><input id="tok" type="password" autocomplete="off"> <button>Sign in</button></form></div>
<div id="main" style="display:none">
<h2>Endpoints</h2><table id="eps"></table>
<h2>Tasks</h2><table id="counts"></table>
<h2>Recent failures</h2><table id="fails"></table>
<p><button id="out">Sign out</button> <span class="muted" id="when"></span></p></div>
<script>
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
function row(cells, th) { const t = th ? "th" : "td"; return "<tr>" + cells.map((c) => `<${t}>${c}</${t}>`).join("") + "</tr>"; }
async function refresh() {
  const token = sessionStorage.getItem("tether-token");
  if (!token) { $("login").style.display = "block"; $("main").style.display = "none"; return; }
  const r = await fetch("/v1/dashboard", {headers: {Authorization: "Bearer " + token}});
  if (r.status === 401) { sessionStorage.removeItem("tether-token"); return refresh(); }
  const d = await r.json();
  $("login").style.display = "none"; $("main").style.display = "block";
  $("eps").innerHTML = row(["name", "id", "state", "workers (idle/total)", "queued", "running", "python"], true) +
    d.endpoints.map((e) => { const c = e.status.capacity || {}, v = e.status.versions || {};
      return row([esc(e.name), `<code>${esc(e.endpoint_id)}</code>`,
        e.online ? '<span class="on">online</span>' : '<span class="off">offline</span>',
        `${esc(c.workers_idle ?? "-")}/${esc(c.workers_total ?? "-")}`, esc(c.tasks_queued ?? "-"),
        esc(c.tasks_running ?? "-"), esc(v.python ?? "-")]); }).join("");
  $("counts").innerHTML = row(Object.keys(d.task_counts).map(esc), true) + row(Object.values(d.task_counts).map(esc));
  $("fails").innerHTML = row(["when", "task", "error"], true) + d.recent_failures.map((f) =>
    row([esc(new Date(f.ts * 1000).toLocaleString()), `<code>${esc(f.task_id)}</code>`, esc(f.error)])).join("");
  $("when").textContent = "updated " + new Date().toLocaleTimeString();
}
$("f").onsubmit = (e) => { e.preventDefault(); sessionStorage.setItem("tether-token", $("tok").value.trim()); refresh(); };
$("out").onclick = () => { sessionStorage.removeItem("tether-token"); refresh(); };
refresh(); setInterval(refresh, 5000);
</script></body></html>
"""
