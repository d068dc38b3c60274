"""`llamac serve ART`: serve a WebGPU artifact's page on localhost (WebGPU and Cache Storage need a secure origin,
which localhost is)."""

from __future__ import annotations

import json
from pathlib import Path

from llamac.errors import InputError
from llamac.runtime.browser import ArtifactServer, verify_web_files


def serve(art: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Blocks serving art until interrupted (Ctrl-C)."""
    art = Path(art)
    manifest = art / "manifest.json"
    if not manifest.is_file() or not (art / "index.html").is_file():
        raise InputError(f"{art} is not a WebGPU artifact (needs manifest.json and index.html)")
    try:
        m = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{manifest}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("target"), dict) or m["target"].get("name") != "webgpu":
        raise InputError(f"{art} is not a WebGPU artifact (compile with --target webgpu)")
    verify_web_files(art, m)
    try:
        server = ArtifactServer(art, port=port, host=host)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    print(f"serving {art} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
