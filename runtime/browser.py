"""Run a WebGPU artifact in headless Chromium and read its result: `llamac run ART --browser`.

The artifact's page does the work (tvmjs + WebGPU); here we serve the artifact on a free localhost port, start
Debian's chromium through npm playwright-core with a fresh profile, call the page's window.llamacGenerate and
return what it reports. Only the standard library on the Python side (the runtime imports no compiler code).

Chromium flags: --enable-unsafe-webgpu turns WebGPU on under Linux (headless, that is SwiftShader: f32 compute,
no shader-f16); the others keep a machine without internet quiet and the profile disposable.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from llamac.errors import InputError

from .tvm_backend import sha256_file

CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT_CORE = "1.65.1"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# The node side: launch chromium, open the page, wait for it to load, generate, print one JSON line.
_DRIVER = r"""
const { chromium } = require('playwright-core');
const cfg = JSON.parse(process.argv[2]);
const logs = [];
(async () => {
  const ctx = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, headless: true, args: cfg.args });
  const page = await ctx.newPage();
  const status = async () => { try { return await page.evaluate(() => document.getElementById('status').textContent); }
                               catch (_) { return ''; } };
  let out;
  try {
    page.on('console', (m) => logs.push(m.type() + ': ' + m.text()));
    page.on('pageerror', (e) => logs.push('pageerror: ' + e.message));
    await page.goto(cfg.url);
    await page.waitForFunction(() => window.llamacReady || window.llamacError, null, { timeout: cfg.timeout_ms });
    out = await page.evaluate(() => ({ error: window.llamacError || null }));
    if (!out.error && cfg.ui) {
      // drive the page like a person: the automation elements #prompt, #max-tokens, #generate, #output
      await page.fill('#prompt', cfg.ui.prompt);
      await page.fill('#max-tokens', String(cfg.ui.max_tokens));
      await page.click('#generate');
      await page.waitForFunction(() => window.llamacResult || window.llamacError, null, { timeout: cfg.timeout_ms });
      out = await page.evaluate(() => ({ result: window.llamacResult || null, error: window.llamacError || null,
                                         output: document.getElementById('output').textContent }));
    } else if (!out.error && cfg.request) {
      page.setDefaultTimeout(cfg.timeout_ms);
      out = await page.evaluate(async (req) => {
        try { return { result: await window.llamacGenerate(req) }; }
        catch (e) { return { error: String(e && e.message || e) }; }
      }, cfg.request);
    }
  } catch (e) {
    out = { error: 'driver: ' + (e && e.message || e) + ' (page status: ' + (await status()) + ')' };
  }
  out.status = await status();
  out.logs = logs.slice(-50);
  console.log(JSON.stringify(out));
  await ctx.close();
})().catch((e) => { console.log(JSON.stringify({ error: 'driver: ' + (e && e.message || e), logs })); });
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript", ".json": "application/json"}

    def log_message(self, format, *args):  # noqa: A002 - keep stdout clean for --json
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


class ArtifactServer:
    """Serves a directory on localhost in a background thread (`with ArtifactServer(dir) as url:`)."""

    def __init__(self, root: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        # the address family of the host (an IPv6 address like ::1 needs AF_INET6; the server class assumes IPv4)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
        self.httpd = server((host, port), handler)
        name = f"[{host}]" if ":" in host else host
        self.url = f"http://{name}:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def node_modules() -> Path:
    """playwright-core, installed with npm into llamac's cache on first use."""
    base = os.environ.get("LLAMAC_CACHE")
    d = (Path(base) / "web" if base else Path.home() / ".cache" / "llamac" / "web") / "node"
    mods = d / "node_modules"
    if not (mods / "playwright-core" / "package.json").exists():
        if shutil.which("npm") is None:
            raise InputError("--browser needs node and npm (apt-get install -y nodejs npm)")
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "package.json").exists():
            (d / "package.json").write_text('{"name": "llamac-web-tools", "private": true}\n')
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"playwright-core@{PLAYWRIGHT_CORE}"],
                              cwd=d, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"npm install playwright-core failed: {proc.stderr[-2000:]}")
    return mods


def _check_artifact(art: Path) -> dict:
    manifest_path = art / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{art} is not an artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{manifest_path}: unreadable manifest ({e})") from None
    target = manifest.get("target") if isinstance(manifest, dict) else None
    if not isinstance(target, dict) or target.get("name") != "webgpu":
        raise InputError(f"{art} was compiled for {target.get('name') if isinstance(target, dict) else None!r}; "
                         f"--browser needs a webgpu artifact (llamac compile --target webgpu)")
    verify_web_files(art, manifest)
    return manifest


def verify_web_files(art: Path, manifest: dict) -> None:
    """Every file a WebGPU manifest lists ({path: sha256}) is inside the artifact, present and unchanged (a missing
    wasm came back as the server's 404 page, a flipped weight byte ran unnoticed)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InputError(f"{art}/manifest.json: malformed manifest (files)")
    root = Path(art).resolve()
    for name, digest in files.items():
        f = (root / name).resolve()
        if root not in f.parents:
            raise InputError(f"{art}: manifest lists a file outside the artifact ({name})")
        if not f.is_file():
            raise InputError(f"{art}: {name} is missing")
        if sha256_file(f) != digest:
            raise InputError(f"{art}: {name} does not match its checksum (corrupt or modified artifact)")


def open_page(art: Path, request: dict | None, *, webgpu: bool = True, timeout_s: float = 300.0,
              chromium: str = CHROMIUM, ui: dict | None = None) -> dict:
    """Opens the artifact's page in headless Chromium; with a request, runs window.llamacGenerate(request).

    Returns {"result": ..., "error": str|None, "logs": [...], "status": str}. webgpu=False leaves out
    --enable-unsafe-webgpu (the page then reports that no WebGPU adapter is available). With ui={"prompt": ...,
    "max_tokens": N} the page's own form is filled and #generate clicked; "output" then holds #output's text.
    """
    if not Path(chromium).exists():
        raise InputError(f"--browser needs Chromium at {chromium} (apt-get install -y chromium)")
    mods = node_modules()
    node = shutil.which("node")
    if node is None:
        raise InputError("--browser needs node (apt-get install -y nodejs)")
    with tempfile.TemporaryDirectory(prefix="llamac-chromium-") as profile, ArtifactServer(art) as url:
        cfg = {"url": url + "index.html", "chromium": chromium, "profile": profile, "request": request, "ui": ui,
               "timeout_ms": int(timeout_s * 1000),
               "args": CHROMIUM_ARGS + (["--enable-unsafe-webgpu"] if webgpu else [])}
        driver = Path(profile) / "driver.js"
        driver.write_text(_DRIVER)
        env = dict(os.environ, NODE_PATH=str(mods))
        # own process group: on timeout we end node and the chromium it started, nothing else
        proc = subprocess.Popen([node, str(driver), json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=2 * timeout_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"the browser did not finish within {2 * timeout_s + 60:.0f} s") from None
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"the browser driver failed (exit {proc.returncode}): {stderr[-2000:]}")
    return json.loads(lines[-1])


def run_in_browser(art: Path, ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                   timeout_s: float = 300.0, prompt: str | None = None) -> dict:
    """Generates in headless Chromium; returns the page's result: prompt_tokens, tokens, text, stop_reason,
    prefill_tok_s, decode_tok_s (and adapter). Give token ids, or prompt text for the page's own tokenizer."""
    art = Path(art)
    manifest = _check_artifact(art)
    request: dict = {"maxNewTokens": int(max_new_tokens), "temperature": float(temperature), "seed": int(seed)}
    if prompt is not None and not ids:
        request["prompt"] = prompt
    else:
        if not ids:
            raise InputError("give the prompt as token ids or text")
        request["ids"] = [int(i) for i in ids]
    if len(request.get("ids", [])) > manifest.get("max_seq_len", 1 << 30):
        raise InputError(f"prompt of {len(request['ids'])} tokens does not fit the compiled context "
                         f"({manifest['max_seq_len']})")
    out = open_page(art, request, timeout_s=timeout_s)
    if out.get("error"):
        if "does not fit" in out["error"] or "the prompt has" in out["error"]:   # the page's own prompt check
            raise InputError(f"in the browser: {out['error']}")
        raise RuntimeError(f"in the browser: {out['error']}")
    return out["result"]
