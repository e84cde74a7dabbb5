"""The neural database over HTTP: a JSON API, a streamed answer endpoint and the web page (docs/neural_database.md).

``create_app(db)`` builds the FastAPI app; ``serve(db)`` runs it with uvicorn on 127.0.0.1.
The OpenAPI schema is at ``/docs``. Endpoints::

    GET    /api/documents                  every document (JSON list)
    GET    /api/documents/{id}             one document, 404 if missing
    POST   /api/documents                  ingest {"text": ..., "label": ...}
    POST   /api/documents/upload           ingest a UTF-8 text file (multipart "file", optional "label")
                                           (either ingest with ?progress=1: JSON lines of tokens read, then the
                                           outcome; the web page shows them)
    DELETE /api/documents/{id}             remove a document
    POST   /api/documents/{id}/ask         {"question": ...}: the answer as streamed text/plain
    POST   /api/documents/{id}/export      the document's state file, as a download
    GET    /                               the web page (static/index.html)

The engine is not safe for concurrent ingests, so ingests take one lock; deletes (the index and one file)
and questions run beside them, each question on its own fork of the stored state. An ingest stops, storing
nothing, once its client disconnects.

Protection (a laptop is a hostile place for a local service): requests must name an allowed host
(the loopback names by default, so a DNS-rebinding page cannot reach the API through another name);
a state-changing request that carries an ``Origin`` must come from the service's own page, the same
host and port as its ``Host`` (another site's page cannot post to it, nor a sandboxed frame, whose
Origin is ``null``; curl and the CLI send no Origin); and with ``token=`` set, every ``/api``
request needs ``Authorization: Bearer <token>`` (the page takes it from its address, ``/?token=...``,
and passes it on). ``serve`` refuses to bind anything but loopback without a token. ``/docs`` serves
its Swagger UI assets from the ``swagger-ui-bundle`` package, so it works offline.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from ..version import __version__
from .engine import DocumentNotFound, NeuralDatabase, NeuralDBError, check_label
from .errors import IngestCancelled
from .limits import MAX_NEW_TOKENS, MAX_QUESTION_CHARS, MAX_TEMPERATURE
from .store import DocumentInfo, export_file_name

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
UPLOAD_PATH = "/api/documents/upload"
# room for the multipart boundary and headers around the file when checking Content-Length
MULTIPART_SLACK = 64 * 1024
MAX_DOCUMENT_ID = 2**62  # SQLite integers are 64-bit: a larger id is a 422, never an overflow
DocumentId = Annotated[int, PathParam(ge=1, le=MAX_DOCUMENT_ID, description="the document's id")]


class DocumentOut(BaseModel):
    """One stored document; sizes in bytes, ``full_cache_bytes`` is the KV cache its state replaces."""

    id: int
    label: str
    source_sha256: str
    model_fingerprint: str
    config: dict[str, Any]
    tokens: int
    created: str
    state_bytes: int
    file_bytes: int
    full_cache_bytes: int
    duplicate: bool = False

    @classmethod
    def of(cls, info: DocumentInfo) -> DocumentOut:
        return cls.model_validate(info.to_dict())  # the state file's name inside the store is left out


class IngestRequest(BaseModel):
    text: str = Field(description="the document, as plain text")
    label: str | None = Field(default=None, description="a name for the document (default: chosen by the engine)")

    @field_validator("text")
    @classmethod
    def _not_empty(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("the document text is empty: paste some text to ingest")
        return text


class AskRequest(BaseModel):
    question: str = Field(description="the question about the document", max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int = Field(default=96, ge=1, le=MAX_NEW_TOKENS, description="longest answer, in tokens")
    temperature: float = Field(
        default=0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 is greedy decoding"
    )

    @field_validator("question")
    @classmethod
    def _not_empty(cls, question: str) -> str:
        if not question.strip():
            raise ValueError("the question is empty: type a question about the document")
        return question


class _BodyTooLarge(BaseException):
    """Raised while a body is read; a BaseException so that no body parser turns it into a 400 on the way."""


class _BodyLimit:
    """Refuse a request body over the limit before it is parsed: by its declared Content-Length at once,
    and by counting while it is read (a chunked body declares none)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit + MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": _too_large(self.limit - MULTIPART_SLACK)}, status_code=413)(
                scope, receive, send
            )
            return
        seen = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await JSONResponse({"detail": _too_large(self.limit - MULTIPART_SLACK)}, status_code=413)(
                    scope, receive, send
                )


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or an origin's netloc, without port or IPv6 brackets, lower case."""
    host = urlsplit(f"//{value}").hostname
    return (host or "").lower()


class _Guard:
    """Host, Origin and token checks before any route runs (see the module docstring)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None, token: str | None) -> None:
        self.app, self.allowed_hosts, self.token = app, allowed_hosts, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, detail = refusal
            await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = _host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return 403, f"this service answers to {', '.join(sorted(self.allowed_hosts))}, not to host {host!r}"
        origin = headers.get("origin")
        if origin is not None and scope["method"] in STATE_CHANGING and not _same_origin(origin, headers.get("host")):
            # "null" too: a sandboxed frame of any site sends it, and a form post needs no preflight
            return 403, f"requests from another page ({origin}) may not change this database"
        if self.token is not None and scope["path"].startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return 401, "this service needs its access token: Authorization: Bearer <token> (the page: /?token=...)"
        return None


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` (an ``Origin`` header) is this service's own page: http(s) on the very host and port the
    request's ``Host`` header names (the page's own requests carry exactly that)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host is not None and parts.netloc.lower() == host.strip().lower()


def _too_large(limit: int) -> str:
    return f"the document is larger than this server accepts ({limit:,} bytes)"


ProgressFlag = Annotated[
    bool,
    Query(
        description='stream the ingest as JSON lines: {"read", "total"} (tokens) before the read and after every '
        'chunk, then {"status": 201 or 200, "document": ...} or {"status": 4xx/5xx, "detail": ...}'
    ),
]


async def _progress_lines(db: NeuralDatabase, lock: threading.Lock, text: str, label: str | None) -> AsyncIterator[str]:
    """An ingest as JSON lines (``ProgressFlag``), read on a worker thread under ``lock``. A client that leaves
    mid-read closes this generator: the ingest stops after its chunk and stores nothing."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = threading.Event()

    def report(read: int, total: int) -> None:
        loop.call_soon_threadsafe(events.put_nowait, {"read": read, "total": total})

    def read() -> None:
        outcome: dict[str, Any]
        try:
            with lock:
                info = db.ingest(text, label=label, should_stop=gone.is_set, on_progress=report)
        except IngestCancelled as err:
            log.info("%s", err)
            outcome = {"status": 499, "detail": str(err)}
        except NeuralDBError as err:
            outcome = {"status": 400, "detail": str(err)}
        except Exception:  # the stream has begun: the status line is the only way left to say so
            log.exception("ingest failed")
            outcome = {"status": 500, "detail": "the ingest failed; the service's log says why"}
        else:
            outcome = {"status": 200 if info.duplicate else 201, "document": DocumentOut.of(info).model_dump()}
        loop.call_soon_threadsafe(events.put_nowait, outcome)

    worker = loop.run_in_executor(None, read)
    try:
        while True:
            event = await events.get()
            yield json.dumps(event) + "\n"
            if "status" in event:
                break
        await worker
    finally:
        gone.set()  # stops an ingest still reading (its client left); a no-op after the last line


async def _watch_disconnect(request: Request, gone: threading.Event, every_s: float = 0.2) -> None:
    """Set ``gone`` once the client of ``request`` (whose body is read) has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    gone.set()


async def _stream_on_one_thread(pieces: Iterator[str]) -> AsyncIterator[str]:
    """Drive a generator from one worker thread of its own.

    The engine's generator holds ``torch.inference_mode()`` across its yields; that mode is
    per thread, so every step, and the final close, must run on the thread that entered it.
    """
    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coda-db-ask")
    try:
        while (piece := await loop.run_in_executor(worker, next, pieces, None)) is not None:
            yield piece
    finally:
        # also when the client went away mid-answer: stop generating, on that thread, without waiting
        close = getattr(pieces, "close", None)
        if close is not None:
            worker.submit(close)
        worker.shutdown(wait=False)


def create_app(
    db: NeuralDatabase,
    *,
    max_upload_bytes: int = 5_000_000,
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
    token: str | None = None,
) -> FastAPI:
    """The HTTP service over ``db``; texts over ``max_upload_bytes`` (UTF-8) are refused with 413.

    ``allowed_hosts``: the host names requests may address (``None``: any, for a service bound to a
    public address, where ``token`` protects it); ``token``: required on every ``/api`` request."""
    app = FastAPI(
        title="coda-db",
        version=__version__,
        description="A neural database: each document is kept as a fixed-size model state you can question.",
        docs_url=None,
    )
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts, token=token)
    write_lock = threading.Lock()

    @app.exception_handler(DocumentNotFound)
    async def _not_found(request: Request, err: DocumentNotFound) -> JSONResponse:
        detail = "no such document" if err.ref is None else f"no document {err.ref!r}"  # not the store's folder
        return JSONResponse({"detail": detail}, status_code=404)

    @app.exception_handler(NeuralDBError)
    async def _bad_request(request: Request, err: NeuralDBError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # the offending input is left out: a NaN or a lone surrogate in it would break the JSON answer itself
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in err.errors()]  # fmt: skip
        return JSONResponse({"detail": errors}, status_code=422)

    async def ingest(request: Request, text: str, label: str | None, response: Response, progress: bool) -> Any:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise HTTPException(400, f"the text holds a character that is not valid Unicode at {err.start}") from err
        if size > max_upload_bytes:
            raise HTTPException(413, _too_large(max_upload_bytes))
        if progress:
            if label:
                check_label(label)  # a bad label is a 400 before the stream starts, not a line in it
            lines = _progress_lines(db, write_lock, text, label or None)
            return StreamingResponse(lines, media_type="application/x-ndjson")
        gone = threading.Event()  # the client went away (closed the page, Ctrl-C in curl): stop reading, store nothing

        def read() -> DocumentInfo:
            with write_lock:
                return db.ingest(text, label=label or None, should_stop=gone.is_set)

        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, read)
        except IngestCancelled as err:
            log.info("%s", err)
            return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
        finally:
            watcher.cancel()
        response.status_code = 200 if info.duplicate else 201
        return DocumentOut.of(info)

    @app.get("/api/documents", summary="List documents")
    def list_documents() -> list[DocumentOut]:
        return [DocumentOut.of(info) for info in db.list()]

    @app.get("/api/documents/{doc_id}", summary="Show one document", responses={404: {"description": "no such id"}})
    def show_document(doc_id: DocumentId) -> DocumentOut:
        return DocumentOut.of(db.show(doc_id))

    @app.post(
        "/api/documents",
        status_code=201,
        summary="Ingest pasted text",
        responses={200: {"description": "already stored: the existing document, duplicate=true"}},
    )
    async def ingest_text(
        request: Request, body: IngestRequest, response: Response, progress: ProgressFlag = False
    ) -> DocumentOut:
        return await ingest(request, body.text, body.label, response, progress)  # type: ignore[no-any-return]

    @app.post(
        UPLOAD_PATH,
        status_code=201,
        summary="Ingest an uploaded UTF-8 text file",
        responses={400: {"description": "not UTF-8 text"}, 413: {"description": "over the size limit"}},
    )
    async def ingest_upload(
        request: Request,
        response: Response,
        file: Annotated[UploadFile, File(description="a UTF-8 text file")],
        label: Annotated[str | None, Form(description="a name (default: the file's name)")] = None,
        progress: ProgressFlag = False,
    ) -> DocumentOut:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, _too_large(max_upload_bytes))
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise HTTPException(
                400, f"{file.filename or 'the file'} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
        if not text.strip():
            raise HTTPException(400, f"{file.filename or 'the file'} is empty")
        label = label or (Path(file.filename).name if file.filename else None)
        return await ingest(request, text, label, response, progress)  # type: ignore[no-any-return]

    @app.delete("/api/documents/{doc_id}", status_code=204, summary="Delete a document")
    def delete_document(doc_id: DocumentId) -> Response:
        # no write lock: a delete touches one index row (SQLite serialises it) and one file, not the model, so it
        # need not wait behind another document's ingest (84.7 s behind 20K tokens on a 2-core CPU, with the lock)
        db.delete(doc_id)
        return Response(status_code=204)

    @app.post(
        "/api/documents/{doc_id}/ask",
        summary="Ask a question; the answer streams as text/plain",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "the answer, streamed as generated"}},
    )
    def ask(doc_id: DocumentId, body: AskRequest) -> StreamingResponse:
        # validates and loads the state here, so a bad id or question is a 404/400, not a broken stream
        pieces = db.ask_stream(doc_id, body.question, max_new_tokens=body.max_new_tokens, temperature=body.temperature)
        return StreamingResponse(
            _stream_on_one_thread(pieces),
            media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/api/documents/{doc_id}/export",
        summary="Download a document's state file",
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def export(doc_id: DocumentId) -> FileResponse:
        info = db.show(doc_id)
        folder = Path(tempfile.mkdtemp(prefix="coda-db-export-"))
        name = export_file_name(info)
        try:
            path = db.export(info.id, folder / name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return FileResponse(
            path,
            filename=name,
            media_type="application/octet-stream",
            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _offline_docs(app)
    return app


def _offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's files served from the swagger-ui-bundle package, not from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="coda-db API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve ``host`` other than loopback without an access token."""
    if host not in LOOPBACK_HOSTS and not token:
        raise NeuralDBError(
            f"binding {host} makes the database reachable from other machines: give an access token "
            "(coda-db serve --token ..., or CODA_DB_TOKEN)"
        )


class _RedactToken(logging.Filter):
    """Hides the page's ``?token=...`` in uvicorn's access log lines (its record's third argument is the path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "token=" in args[2]:
            record.args = (*args[:2], re.sub(r"(token=)[^&#\s]*", r"\1***", args[2]), *args[3:])
        return True


def serve(db: NeuralDatabase, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Run the service with uvicorn until interrupted; anything but loopback needs a ``token``."""
    import uvicorn

    check_binding(host, token)
    app = create_app(db, allowed_hosts=LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None, token=token)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")  # configures uvicorn's loggers
    logging.getLogger("uvicorn.access").addFilter(_RedactToken())
    uvicorn.Server(config).run()
