"""``fed-nessa view RUN_DIR``: a local, read-only web page of one run folder (Starlette + uvicorn).

Read-only: only GET (and HEAD) routes exist. It serves the page, its live fragment, three charts
drawn on the server, and the run folder's own files of a few harmless kinds (``file/...``), each
resolved and refused unless it lies inside the run folder (``..``, an absolute path or a link
that leads out is a 404). It binds to 127.0.0.1 unless told otherwise. A per-page nonce in the
Content-Security-Policy lets only the page's own script run.
"""

from __future__ import annotations

import secrets
import socket
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from fed_nessa.evaluation.run_folder import SUMMARY_FILE
from fed_nessa.privacy.ledger import FEDERATION_LEDGER_NAME
from fed_nessa.view import charts
from fed_nessa.view.page import fragment, page
from fed_nessa.view.run_state import DeviceLedgers, read_run

DEFAULT_HOST = "127.0.0.1"
#: The run folder's files the viewer serves, by suffix, with the type it serves them as (text stays text).
SERVED_TYPES = {".png": "image/png", ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8",
                ".md": "text/plain; charset=utf-8", ".pem": "text/plain; charset=utf-8"}
_SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def inside(run_dir: Path, relative: str) -> Path | None:
    """The file ``relative`` names inside ``run_dir``, or None when it is outside, absent or not served."""
    root = run_dir.resolve()
    try:
        target = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if target == root or not target.is_relative_to(root) or not target.is_file():
        return None
    return target if target.suffix in SERVED_TYPES else None


def _stamp(run_dir: Path) -> str:
    """Changes whenever the summary or the federation ledger does (charts are re-fetched then)."""
    parts = []
    for name in (SUMMARY_FILE, FEDERATION_LEDGER_NAME):
        try:
            st = (run_dir / name).stat()
            parts.append(f"{st.st_size}-{st.st_mtime_ns}")
        except OSError:
            parts.append("0")
    return "-".join(parts)


def create_app(run_dir: Path) -> Starlette:
    """The viewer of ``run_dir`` (the folder may not exist yet: a run about to start)."""
    ledgers = DeviceLedgers()
    name = run_dir.name

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        html = page(read_run(run_dir, ledgers), name, _stamp(run_dir), nonce)
        csp = (f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
               f"script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'")
        return HTMLResponse(html, headers={**_SECURITY, "Content-Security-Policy": csp})

    async def live(request: Request) -> Response:
        return HTMLResponse(fragment(read_run(run_dir, ledgers), name, _stamp(run_dir)), headers=_SECURITY)

    async def chart(request: Request) -> Response:
        draw = charts.CHARTS.get(request.path_params["name"])
        if draw is None:
            return PlainTextResponse("no such chart", status_code=404, headers=_SECURITY)
        return Response(draw(read_run(run_dir, ledgers)), media_type="image/svg+xml", headers=_SECURITY)

    async def run_file(request: Request) -> Response:
        target = inside(run_dir, request.path_params["path"])
        if target is None:
            return PlainTextResponse("not a file of this run folder", status_code=404, headers=_SECURITY)
        return FileResponse(target, media_type=SERVED_TYPES[target.suffix], headers=_SECURITY)

    return Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/fragment", live, methods=["GET"]),
        Route("/chart/{name}.svg", chart, methods=["GET"]),
        Route("/file/{path:path}", run_file, methods=["GET"]),
    ])


def serve(run_dir: Path, host: str = DEFAULT_HOST, port: int = 0) -> None:
    """Serve ``run_dir`` until interrupted; prints the address first (port 0: a free one)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listen before the address is printed: a browser that connects at once is queued until the
    # server accepts, never refused (uvicorn starts accepting only after its start-up).
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"fed-nessa view: http://{shown}:{bound}/ (run folder {run_dir}; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(create_app(run_dir), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    sys.stdout.flush()
