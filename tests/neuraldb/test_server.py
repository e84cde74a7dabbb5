"""The neural database's HTTP service, command line and web page, on the tiny random model.

(a) every endpoint through FastAPI's TestClient, errors included; (b) ``coda-db`` through
``main([...])`` with ``--tiny`` and a temporary store; (c) the real service under uvicorn on a
free loopback port: the answer streams over the socket, and (slow) Debian's Chromium, driven by
Playwright, pastes a document, picks it, asks and sees the answer stream into the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from coda_gqa_l import read_state_metadata
from coda_gqa_l.neuraldb import NeuralDatabase, NeuralDBError
from coda_gqa_l.neuraldb.cli import format_bytes, main
from coda_gqa_l.neuraldb.server import STATIC, _stream_on_one_thread, create_app

CHROMIUM = Path("/usr/bin/chromium")
UPLOAD_LIMIT = 2000
MEMO = "The quarterly review moves to Tuesday at noon, in room 4. Bring the budget figures.\n" * 3
QUESTION = "When is the review?"
LIVE_TOKEN = "live-test-token"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> NeuralDatabase:
    return NeuralDatabase.tiny_for_tests(tmp_path_factory.mktemp("service-store"))


@pytest.fixture(scope="module")
def client(db: NeuralDatabase) -> Iterator[TestClient]:
    with TestClient(create_app(db, max_upload_bytes=UPLOAD_LIMIT), base_url="http://127.0.0.1") as test_client:
        yield test_client


def ingest(client: TestClient, text: str, label: str | None = None) -> dict[str, Any]:
    response = client.post("/api/documents", json={"text": text, "label": label})
    assert response.status_code in (200, 201), response.text
    return response.json()


# ---------------------------------------------------------------------------- (a) HTTP API


def test_openapi_describes_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/documents",
        "/api/documents/upload",
        "/api/documents/{doc_id}",
        "/api/documents/{doc_id}/ask",
        "/api/documents/{doc_id}/export",
    }
    assert set(paths["/api/documents"]) == {"get", "post"}
    assert set(paths["/api/documents/{doc_id}"]) == {"get", "delete"}


def test_page_and_its_assets_are_served_and_local(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('<textarea id="paste-text"', 'type="file"', 'id="question"', 'id="answer"', "/static/app.js"):
        assert needle in page.text
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.text
    for path in STATIC.iterdir():  # no CDN, no external fonts: the page works offline
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), path.name


def test_ingest_list_show_and_duplicate(client: TestClient, db: NeuralDatabase) -> None:
    created = client.post("/api/documents", json={"text": "Alpha is the first letter.", "label": "alpha"})
    assert created.status_code == 201, created.text
    doc = created.json()
    assert doc["label"] == "alpha" and doc["tokens"] > 0 and not doc["duplicate"]
    assert doc["state_bytes"] > 0 and doc["full_cache_bytes"] > 0 and doc["file_bytes"] > 0
    assert "state_file" not in doc  # the store's file names stay inside the server
    assert doc["id"] in [d["id"] for d in client.get("/api/documents").json()]
    shown = client.get(f"/api/documents/{doc['id']}")
    assert shown.status_code == 200 and shown.json() == doc
    again = client.post("/api/documents", json={"text": "Alpha is the first letter.", "label": "other"})
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["id"] == doc["id"]
    assert db.show(doc["id"]).label == "alpha"


def test_ingest_with_progress_streams_tokens_read_then_the_document(client: TestClient, db: NeuralDatabase) -> None:
    text = "A report read with its progress shown. " * 30  # 1,170 byte tokens: 5 chunks of the tiny model's 256
    with client.stream("POST", "/api/documents?progress=1", json={"text": text, "label": "watched"}) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        events = [json.loads(line) for line in response.iter_lines() if line]
    *reads, last = events
    total = len(text.encode())
    assert [e["read"] for e in reads] == [0, 256, 512, 768, 1024, total] and {e["total"] for e in reads} == {total}
    assert last["status"] == 201 and last["document"]["label"] == "watched"
    assert last["document"] == client.get(f"/api/documents/{last['document']['id']}").json()
    with client.stream("POST", "/api/documents?progress=1", json={"text": text, "label": "again"}) as response:
        again = [json.loads(line) for line in response.iter_lines() if line]
    assert again == [{"status": 200, "document": {**last["document"], "duplicate": True}}]  # not read again
    upload = client.post("/api/documents/upload?progress=1", files={"file": ("up.txt", b"Uploaded, watched.")})
    *_, done = [json.loads(line) for line in upload.text.splitlines()]
    assert done["status"] == 201 and done["document"]["label"] == "up.txt"
    refused = client.post("/api/documents?progress=1", json={"text": text + "!", "label": "1234"})
    assert refused.status_code == 400 and "digits" in refused.json()["detail"]  # before the stream starts


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_ingest_empty_text_is_refused(client: TestClient, text: str) -> None:
    response = client.post("/api/documents", json={"text": text})
    assert response.status_code == 422
    assert "empty" in json.dumps(response.json()["detail"])


def test_ingest_text_over_the_limit_is_413(client: TestClient) -> None:
    response = client.post("/api/documents", json={"text": "x" * (UPLOAD_LIMIT + 1)})
    assert response.status_code == 413 and "2,000 bytes" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/documents/9999"),
        ("delete", "/api/documents/9999"),
        ("post", "/api/documents/9999/export"),
    ],
)
def test_missing_document_is_404_with_json_detail(client: TestClient, method: str, path: str) -> None:
    response = client.request(method.upper(), path)
    assert response.status_code == 404
    assert response.json()["detail"] == "no document 9999"  # the id asked for, not the store's folder


def test_ask_missing_document_is_404(client: TestClient) -> None:
    response = client.post("/api/documents/9999/ask", json={"question": QUESTION})
    assert response.status_code == 404 and response.json()["detail"] == "no document 9999"  # not the store's path


def test_upload_ingests_a_text_file(client: TestClient) -> None:
    files = {"file": ("minutes.txt", b"Minutes: the roof gets fixed in May.", "text/plain")}
    response = client.post("/api/documents/upload", files=files)
    assert response.status_code == 201, response.text
    assert response.json()["label"] == "minutes.txt"  # the file's name, as coda-db ingest FILE does
    files = {"file": ("notes.txt", b"Notes: lunch is at one.", "text/plain")}
    response = client.post("/api/documents/upload", files=files, data={"label": "lunch"})
    assert response.status_code == 201 and response.json()["label"] == "lunch"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/api/documents", '{"text": "a lone \\ud800 surrogate"}', 400),
        ("post", "/api/documents", '{"text": "fine text", "label": "' + "L" * 240 + '"}', 400),
        ("post", "/api/documents/1/ask", '{"question": "Why?", "temperature": NaN}', 422),
        ("post", "/api/documents/1/ask", '{"question": "Why?", "temperature": Infinity}', 422),
        ("get", f"/api/documents/{2**70}", None, 422),
        ("post", f"/api/documents/{2**70}/export", None, 422),
        ("delete", "/api/documents/0", None, 422),
    ],
)
def test_bad_input_is_a_4xx_never_a_500(client: TestClient, method: str, path: str, body: str | None,
                                        status: int) -> None:  # fmt: skip
    ingest(client, MEMO, "memo")
    headers = {"content-type": "application/json"}
    response = client.request(method.upper(), path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_json_bodies_are_limited_before_parsing(client: TestClient) -> None:
    huge = '{"text": "' + "x" * (UPLOAD_LIMIT * 100) + '"}'
    assert client.post("/api/documents", content=huge, headers={"content-type": "application/json"}).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"text": "'
        for _ in range(100):
            yield b"x" * UPLOAD_LIMIT
        yield b'"}'

    response = client.post("/api/documents", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("size", [UPLOAD_LIMIT + 1, 10 * UPLOAD_LIMIT + 200_000])
def test_upload_over_the_limit_is_413(client: TestClient, size: int) -> None:
    # just over: measured after reading; far over: refused from its Content-Length before reading
    files = {"file": ("big.txt", b"a" * size, "text/plain")}
    response = client.post("/api/documents/upload", files=files)
    assert response.status_code == 413
    assert "larger than this server accepts" in response.json()["detail"]


@pytest.mark.parametrize("payload", [b"caf\xe9 latin-1", b"\xff\xfe\x00\x00binary", b""])
def test_upload_of_bad_or_empty_text_is_400(client: TestClient, payload: bytes) -> None:
    response = client.post("/api/documents/upload", files={"file": ("bad.txt", payload, "text/plain")})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert ("not UTF-8 text" in detail) if payload else ("is empty" in detail)


def test_ask_streams_the_same_answer_as_the_python_api(client: TestClient, db: NeuralDatabase) -> None:
    doc = ingest(client, MEMO, "memo")
    with client.stream("POST", f"/api/documents/{doc['id']}/ask", json={"question": QUESTION}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        answer = "".join(response.iter_text())
    assert answer.strip()
    assert answer == db.ask(doc["id"], QUESTION)


def test_concurrent_questions_do_not_interfere(client: TestClient, db: NeuralDatabase) -> None:
    doc = ingest(client, MEMO, "memo")
    questions = [QUESTION, "Where is it?", QUESTION, "What should I bring?"]
    expected = [db.ask(doc["id"], q, max_new_tokens=24) for q in questions]

    def ask(question: str) -> str:
        body = {"question": question, "max_new_tokens": 24}
        response = client.post(f"/api/documents/{doc['id']}/ask", json=body)
        assert response.status_code == 200, response.text
        return response.text

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(ask, questions)) == expected
    assert db.show(doc["id"]).file_bytes == doc["file_bytes"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"question": ""}, "question is empty"),
        ({"question": "  \n"}, "question is empty"),
        ({"question": QUESTION, "max_new_tokens": 0}, "greater than or equal to 1"),
        ({}, "Field required"),
    ],
)
def test_bad_questions_are_422(client: TestClient, body: dict[str, Any], needle: str) -> None:
    doc = ingest(client, MEMO, "memo")
    response = client.post(f"/api/documents/{doc['id']}/ask", json=body)
    assert response.status_code == 422
    assert needle in json.dumps(response.json()["detail"])


def test_export_downloads_a_valid_state_file(client: TestClient, db: NeuralDatabase, tmp_path: Path) -> None:
    doc = ingest(client, MEMO, "memo")
    response = client.post(f"/api/documents/{doc['id']}/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{doc["id"]}-memo.state"' in response.headers["content-disposition"]
    path = tmp_path / "memo.state"
    path.write_bytes(response.content)
    assert len(response.content) == doc["file_bytes"]
    meta = read_state_metadata(path)
    assert meta["format"] == "coda-gqa-l/state" and meta["model_fingerprint"] == db.fingerprint
    assert meta["extra"]["source_sha256"] == doc["source_sha256"] and meta["positions"][0] >= doc["tokens"]
    assert db.import_state(path).duplicate  # the same document, recognised by its source hash


def test_delete_removes_the_document(client: TestClient) -> None:
    doc = ingest(client, "A short-lived note about nothing.", "doomed")
    response = client.delete(f"/api/documents/{doc['id']}")
    assert response.status_code == 204
    assert client.get(f"/api/documents/{doc['id']}").status_code == 404
    assert doc["id"] not in [d["id"] for d in client.get("/api/documents").json()]


def test_concurrent_ingests_are_serialized(client: TestClient) -> None:
    texts = [f"Document number {i} says the code word is {i * 7}." for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        docs = list(pool.map(lambda t: client.post("/api/documents", json={"text": t}), texts))
    assert [r.status_code for r in docs] == [201] * len(texts)
    ids = {r.json()["id"] for r in docs}
    assert len(ids) == len(texts)
    listed = {d["id"] for d in client.get("/api/documents").json()}
    assert ids <= listed


def test_answer_generator_runs_and_closes_on_one_thread() -> None:
    """torch.inference_mode is per thread: every step of the engine's generator must share one."""
    threads: list[int] = []

    def pieces() -> Iterator[str]:
        try:
            for piece in ("a", "b", "c", "d"):
                threads.append(threading.get_ident())
                yield piece
        finally:
            threads.append(threading.get_ident())

    async def read_two() -> list[str]:
        stream = _stream_on_one_thread(pieces())
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()  # a client that goes away mid-answer
        return got

    assert asyncio.run(read_two()) == ["a", "b"]
    for _ in range(100):  # the close is queued on the worker, not awaited
        if len(threads) == 3:
            break
        threading.Event().wait(0.01)
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


# ---------------------------------------------------------------------------- (b) command line


def cli(store: Path, *args: str) -> int:
    return main(["--store", str(store), "--tiny", *args])


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width when stdout is not a terminal
    store = tmp_path / "store"
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo") == 0
    assert "stored #1 'memo'" in capsys.readouterr().out

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Note A: the printer is on floor 2.")
    (notes / "b.txt").write_text("Note B: the wifi password is on the fridge.")
    (notes / "skip.md").write_text("not a .txt file")
    single = tmp_path / "single.txt"
    single.write_text("A single file about the garden.")
    assert cli(store, "ingest", "--quiet", str(notes), str(single)) == 0
    out = capsys.readouterr().out
    assert out.count("stored #") == 3 and "'single.txt'" in out
    assert cli(store, "ingest", "--quiet", str(single)) == 0
    out = capsys.readouterr().out
    assert "already stored #" in out and "keeps that label" not in out  # the same name: nothing to say
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo, again") == 0
    assert "already stored #1 'memo'" in (out := capsys.readouterr().out) and "not 'memo, again'" in out

    assert cli(store, "list") == 0
    out = capsys.readouterr().out
    assert "4 document(s)" in out and "memo" in out and "full cache replaced" in out
    assert cli(store, "list", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["memo", "a.txt", "b.txt", "single.txt"]
    memo = rows[0]
    assert format_bytes(memo["state_bytes"]) in out

    assert cli(store, "show", "memo", "--json") == 0
    assert json.loads(capsys.readouterr().out) == memo
    assert cli(store, "show", "1") == 0
    assert "state_bytes" in capsys.readouterr().out

    assert cli(store, "ask", "memo", "When", "is", "the", "review?", "--max-new-tokens", "16") == 0
    answer = capsys.readouterr().out
    assert answer.strip() and answer.endswith("\n")
    assert answer[:-1] == NeuralDatabase.tiny_for_tests(store).ask("memo", QUESTION, max_new_tokens=16)

    exported = tmp_path / "memo.state"
    assert cli(store, "export", "memo", str(exported)) == 0
    assert f"wrote {exported}" in capsys.readouterr().out
    assert read_state_metadata(exported)["extra"]["label"] == "memo"
    assert cli(store, "delete", "memo") == 0
    assert "deleted #1 'memo'" in capsys.readouterr().out
    assert cli(store, "show", "memo") == 2
    assert cli(store, "import", str(exported), "--label", "memo-again") == 0
    assert "stored #5 'memo-again'" in capsys.readouterr().out
    assert cli(store, "list", "--json") == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()][-1] == "memo-again"


def test_cli_options_may_follow_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(["ingest", "--quiet", "--text", "Late options.", "--store", str(store), "--tiny"]) == 0
    assert main(["--tiny", "list", "--json", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"] > 0


def test_cli_store_commands_load_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo") == 0
    capsys.readouterr()

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a store command loaded a model")

    monkeypatch.setattr("coda_gqa_l.neuraldb.cli.open_db", no_model)
    monkeypatch.setattr(NeuralDatabase, "__init__", no_model)
    for args in (["list", "--json"], ["show", "memo"], ["export", "memo", str(tmp_path / "m.state")]):
        assert main(["--store", str(store), *args]) == 0
    assert (tmp_path / "m.state").stat().st_size > 0
    assert main(["--store", str(store), "delete", "memo"]) == 0
    capsys.readouterr()
    assert main(["--store", str(store), "list", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_store_commands_import_neither_the_engine_nor_transformers(tmp_path: Path) -> None:
    """``coda-db list`` starts in about a second: the store commands never import the model code (2 s of imports)."""
    import subprocess

    code = (
        "import sys; from coda_gqa_l.neuraldb.cli import main; "
        f"assert main(['--store', {str(tmp_path / 'store')!r}, 'list']) == 0; "
        "heavy = [m for m in ('coda_gqa_l.neuraldb.engine', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_reading_a_store_that_is_not_there_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo" / "store"
    assert cli(typo, "list") == 0
    assert f"no store at {typo} yet" in capsys.readouterr().out
    for args in (["show", "1"], ["delete", "memo"], ["export", "1", str(tmp_path / "x.state")], ["ask", "1", "Why?"]):
        assert cli(typo, *args) == 2
        assert "there is no store at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_cli_reads_a_byte_order_mark_as_the_upload_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marked = tmp_path / "marked.txt"
    marked.write_bytes("\ufeff".encode() + MEMO.encode())
    assert cli(tmp_path / "store", "ingest", "--quiet", str(marked)) == 0
    assert cli(tmp_path / "store", "ingest", "--quiet", "--text", MEMO) == 0  # the same text: no second document
    assert "already stored #1" in capsys.readouterr().out


def test_cli_export_gets_the_users_file_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    store = tmp_path / "store"
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo") == 0
    previous = os.umask(0o027)
    try:
        assert cli(store, "export", "memo", str(tmp_path / "m.state")) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "m.state").stat().st_mode & 0o777 == 0o640


def test_cli_serve_refuses_before_saying_it_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("CODA_DB_TOKEN", raising=False)
    assert cli(tmp_path / "store", "serve", "--host", "0.0.0.0") == 2
    captured = capsys.readouterr()
    assert "serving" not in captured.out and "access token" in captured.err


def test_access_log_lines_hide_the_token() -> None:
    import logging

    from coda_gqa_l.neuraldb.server import _RedactToken

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/?token=s3cret&x=1", "1.1", 200), None)  # fmt: skip
    assert _RedactToken().filter(record) and record.getMessage() == '127.0.0.1:5 - "GET /?token=***&x=1 HTTP/1.1" 200'


def test_cli_default_store_is_in_the_user_data_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODA_GQA_L_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert main(["--tiny", "ingest", "--quiet", "--text", MEMO]) == 0
    assert (tmp_path / "data" / "store" / "index.sqlite").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing in the working folder
    monkeypatch.delenv("CODA_GQA_L_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert main(["list"]) == 0
    assert str(tmp_path / "xdg" / "coda-gqa-l" / "store") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "42"], "no document 42"),
        (["ask", "nope", "Why?"], "no document 'nope'"),
        (["delete", "7"], "no document 7"),
        (["export", "7", "out.state"], "no document 7"),
        (["ingest", "--quiet", "missing.txt"], "no such file"),
        (["ingest", "--quiet"], "nothing to ingest"),
        (["ingest", "--quiet", "--text", "   "], "empty"),
        (["ingest", "--quiet", "--label", "x", "a.txt", "b.txt"], "--label names one document"),
        (["import", "missing.state"], "missing.state"),
        (["ingest", "--quiet", "--text", "x", "--label", "2024"], "digits only"),
        (["ask", "nope", "x" * 5000], "no document 'nope'"),
        (["ingest", "--quiet", "--device", "tpu", "--text", "x"], "unknown device 'tpu'"),
        (["ask", "--device", "cuda:99", "1", "Why?"], "'cuda:99' asked for, but torch"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli(tmp_path / "store", *args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("coda-db: error: ") and needle in err, err
    assert "\n" not in err and "Traceback" not in captured.err


def _index_rows(store: Path) -> list[str]:
    """The store's index as SQL statements (a damaged or overwritten file fails to read)."""
    with contextlib.closing(sqlite3.connect(store / "index.sqlite")) as connection:
        return list(connection.iterdump())


def test_cli_export_never_overwrites_without_force_nor_writes_into_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo: Q3") == 0
    source = tmp_path / "source.txt"
    source.write_text("my own text")
    index = _index_rows(store)
    capsys.readouterr()
    for dest, needle in (
        (source, "already exists"),
        (store / "index.sqlite", "store's own folder"),
        (store / "states" / "new.state", "store's own folder"),
        (tmp_path / "missing" / "m.state", "does not exist"),
    ):
        assert cli(store, "export", "memo: Q3", str(dest)) == 2, dest
        err = capsys.readouterr().err.strip()
        assert err.startswith("coda-db: error: ") and needle in err and "\n" not in err, err
    # the index's rows, not its bytes: SQLite may move its write-ahead log into the file whenever a reader closes it
    assert source.read_text() == "my own text" and _index_rows(store) == index
    assert cli(store, "export", "memo: Q3", str(source), "--force") == 0
    assert read_state_metadata(source)["extra"]["label"] == "memo: Q3"
    folder = tmp_path / "exports"
    folder.mkdir()
    assert cli(store, "export", "1", str(folder)) == 0  # into a folder: ID-LABEL.state, as the service names it
    assert f"wrote {folder / '1-memo-Q3.state'}" in capsys.readouterr().out
    assert cli(store, "list", "--json") == 0 and json.loads(capsys.readouterr().out)["label"] == "memo: Q3"


def test_cli_ingest_of_several_files_names_the_bad_one_and_stores_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "a.txt").write_text("Note A: the printer is on floor 2.")
    (batch / "b.txt").write_text("   \n")
    (batch / "c.txt").write_text("Note C: the garden gate sticks.")
    (batch / "2024.txt").write_bytes(b"\xff\xfe not utf-8")
    assert cli(tmp_path / "store", "ingest", "--quiet", str(batch)) == 2
    captured = capsys.readouterr()
    assert captured.out.count("stored #") == 2 and "'a.txt'" in captured.out and "'c.txt'" in captured.out
    errors = captured.err.strip().splitlines()
    assert any("b.txt" in line and "empty" in line for line in errors), errors
    assert any("2024.txt" in line and "UTF-8" in line for line in errors), errors
    assert errors[-1] == "coda-db: error: 2 of 4 files stored; not stored: 2024.txt, b.txt"
    assert "Traceback" not in captured.err
    # a document whose first line is a number gets a label that does not read as an id
    assert cli(tmp_path / "store", "ingest", "--quiet", "--text", "2024\nThe year the bridge opened.") == 0
    assert "'document 2024'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ask", "memo", "Why?", "--temperature", "nan"], "argument --temperature: a number from 0 to 2"),
        (["ask", "memo", "Why?", "--temperature", "-1"], "argument --temperature: a number from 0 to 2"),
        (["ask", "memo", "Why?", "--max-new-tokens", "0"], "argument --max-new-tokens: a number from 1 to 1024"),
        (["serve", "--port", "99999"], "argument --port: a number from 1 to 65535"),
    ],
)
def test_cli_refuses_out_of_range_options_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", str(tmp_path / "store"), "--tiny", *args])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_cli_answers_a_mistake_without_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded for a request the store could refuse")

    monkeypatch.setattr("coda_gqa_l.neuraldb.cli.open_db", no_model)
    assert main(["--store", str(tmp_path / "store"), "ask", "nosuchdoc", "Why?"]) == 2
    assert "no document 'nosuchdoc'" in capsys.readouterr().err
    assert main(["--store", str(tmp_path / "store"), "ingest"]) == 2
    assert "nothing to ingest" in capsys.readouterr().err


def test_cli_turns_file_and_index_failures_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    assert cli(a_file, "list") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coda-db: error: ") and "not-a-folder" in err and "\n" not in err, err
    store = tmp_path / "store"
    assert cli(store, "ingest", "--quiet", "--text", MEMO, "--label", "memo") == 0
    (store / "index.sqlite").write_bytes(b"this is not a database" * 100)
    for path in store.glob("index.sqlite-*"):  # the write-ahead log would otherwise still hold the table
        path.unlink()
    capsys.readouterr()
    assert cli(store, "list") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coda-db: error: the store's index") and "index.sqlite" in err and "\n" not in err, err


def test_engine_refuses_temperatures_and_questions_out_of_range(db: NeuralDatabase) -> None:
    info = db.ingest(MEMO, label="range")
    for temperature in (float("nan"), float("inf"), -0.5, 2.5):
        with pytest.raises(NeuralDBError, match="temperature must be a number from 0"):
            db.ask(info.id, QUESTION, temperature=temperature)
    with pytest.raises(NeuralDBError, match="at most 4,000 characters"):
        db.ask(info.id, "why " * 1001)
    with pytest.raises(NeuralDBError, match="digits only"):
        db.ingest("another text", label="42")


def test_a_store_serves_the_device_it_is_asked_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--device before or after the command; the state saved from one device is asked from another (here the
    CPU twice, and CUDA too where there is one): the weights keep their dtype, so the model's fingerprint holds."""
    import torch

    store = tmp_path / "store"
    assert cli(store, "--device", "cpu", "ingest", "--quiet", "--text", MEMO, "--label", "memo") == 0
    assert cli(store, "ask", "--device", "cpu", "memo", "Who?", "--max-new-tokens", "4") == 0
    if torch.cuda.is_available():
        assert cli(store, "ask", "--device", "cuda", "memo", "Who?", "--max-new-tokens", "4") == 0
    assert "error" not in capsys.readouterr().err


def test_cli_refuses_a_file_that_is_not_a_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.state"
    fake.write_bytes(b"not a safetensors file at all")
    assert cli(tmp_path / "store", "import", str(fake)) == 2
    assert "fake.state" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ingest", "list", "show", "ask", "delete", "export", "import", "serve", "demo"])
def test_cli_help_explains_each_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: coda-db {command}")
    description = out.split("\n\n")[1]
    assert 20 < len(description) < 300 and description.rstrip().endswith(".")


def test_cli_serve_binds_loopback_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("coda_gqa_l.neuraldb.server.serve", lambda db, **kw: calls.append(kw))
    monkeypatch.delenv("CODA_DB_TOKEN", raising=False)
    assert cli(tmp_path / "store", "serve") == 0
    assert cli(tmp_path / "store", "serve", "--host", "0.0.0.0", "--port", "9001", "--token", "s3cret") == 0
    assert calls == [
        {"host": "127.0.0.1", "port": 8000, "token": None},
        {"host": "0.0.0.0", "port": 9001, "token": "s3cret"},
    ]


def test_serving_off_loopback_without_a_token_is_refused(db: NeuralDatabase) -> None:
    from coda_gqa_l.neuraldb.server import serve

    with pytest.raises(NeuralDBError, match="access token"):
        serve(db, host="0.0.0.0", port=1)


def test_a_delete_does_not_wait_behind_another_documents_ingest(
    db: NeuralDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(db, max_upload_bytes=UPLOAD_LIMIT)
    release, started = threading.Event(), threading.Event()
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        victim = local.post("/api/documents", json={"text": "A note to delete soon.", "label": "victim"}).json()
        real_ingest = db.ingest

        def slow_ingest(text: str, **kwargs: Any) -> Any:
            started.set()
            assert release.wait(30), "the delete never came"
            return real_ingest(text, **kwargs)

        monkeypatch.setattr(db, "ingest", slow_ingest)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(local.post, "/api/documents", json={"text": "A long document being read."})
            assert started.wait(30)
            assert local.delete(f"/api/documents/{victim['id']}").status_code == 204  # while the ingest holds the lock
            release.set()
            assert pending.result(timeout=60).status_code in (200, 201)
        assert local.get(f"/api/documents/{victim['id']}").status_code == 404


def test_host_origin_and_token_checks(db: NeuralDatabase) -> None:
    app = create_app(db, max_upload_bytes=UPLOAD_LIMIT)
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/documents").status_code == 200
        assert local.get("/api/documents", headers={"host": "localhost:8000"}).status_code == 200
        assert local.get("/api/documents", headers={"host": "[::1]:8000"}).status_code == 200
        # DNS rebinding: a page of evil.example that resolves to 127.0.0.1 still sends its own host name
        rebound = local.get("/api/documents", headers={"host": "evil.example"})
        assert rebound.status_code == 403 and "evil.example" in rebound.json()["detail"]
        # another site's page may not change the database; requests without an Origin (curl, the CLI) may
        foreign = local.post("/api/documents", json={"text": MEMO}, headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403
        same = local.post("/api/documents", json={"text": MEMO}, headers={"origin": "http://127.0.0.1:8000"})
        assert same.status_code in (200, 201)
        # a sandboxed frame of any site sends "null"; another local port is another page
        for other in ("null", "http://127.0.0.1:9999", "http://localhost:8000", "file://"):
            refused = local.post("/api/documents/upload", files={"file": ("memo.txt", MEMO.encode())},
                                 headers={"origin": other})  # fmt: skip
            assert refused.status_code == 403 and other in refused.json()["detail"], other
        assert local.delete("/api/documents/1", headers={"origin": "null"}).status_code == 403
        assert local.post("/api/documents", json={"text": MEMO}).status_code in (200, 201)
        docs = local.get("/docs")
        assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
        assert local.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    guarded = create_app(db, allowed_hosts=None, token="s3cret")
    with TestClient(guarded, base_url="http://192.0.2.10:8000") as remote:
        assert remote.get("/").status_code == 200  # the page itself holds no data
        refused = remote.get("/api/documents")
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        assert remote.get("/api/documents", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert remote.get("/api/documents", headers={"authorization": "Bearer s3cret"}).status_code == 200
        # the scheme's name is case-insensitive (RFC 7235); the token is not
        assert remote.get("/api/documents", headers={"authorization": "bearer s3cret"}).status_code == 200
        assert remote.get("/api/documents", headers={"authorization": "Bearer S3CRET"}).status_code == 401
        assert remote.get("/api/documents", headers={"authorization": "Basic s3cret"}).status_code == 401


def test_cli_demo_calls_run_demo_with_its_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def run_demo(args: Any) -> int:
        seen.append(args)
        return 3

    fake = types.ModuleType("coda_gqa_l.neuraldb.demo")
    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "coda_gqa_l.neuraldb.demo", fake)
    assert main(["demo", "--store", str(tmp_path / "demo-store"), "--fresh"]) == 3  # its exit code
    assert seen[0].store == tmp_path / "demo-store" and seen[0].fresh
    assert main(["demo"]) == 3 and seen[1].store is None and not seen[1].fresh


# ---------------------------------------------------------------------------- (c) the real service


@pytest.fixture(scope="module")
def live_url(db: NeuralDatabase) -> Iterator[str]:
    """The service under uvicorn in a thread, on a loopback port the kernel picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(db, token=LIVE_TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_answer_streams_over_the_socket_in_pieces(live_url: str, db: NeuralDatabase) -> None:
    doc = db.ingest(MEMO, label="memo")
    body = {"question": QUESTION, "max_new_tokens": 32}
    auth = {"authorization": f"Bearer {LIVE_TOKEN}"}
    url = f"{live_url}/api/documents/{doc.id}/ask"
    with httpx.stream("POST", url, json=body, headers=auth, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = list(response.iter_raw())
    assert len(chunks) > 1, "the answer came back in one piece, not streamed"
    assert b"".join(chunks).decode() == db.ask(doc.id, QUESTION, max_new_tokens=32)


def _slow_recorded_ingests(db: NeuralDatabase, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], threading.Event]:
    """Each chunk of ``db``'s ingests takes 0.1 s (the tiny model reads 256 tokens in milliseconds); the ingest's
    outcome (its document or its exception) is appended to the list and the event set when it ends."""
    import coda_gqa_l.neuraldb.engine as engine_module

    monkeypatch.setattr(engine_module, "stop_if_asked", lambda: time.sleep(0.1))
    outcome: list[Any] = []
    finished = threading.Event()
    real_ingest = db.ingest

    def recording_ingest(text: str, **kwargs: Any) -> Any:
        try:
            outcome.append(real_ingest(text, **kwargs))
        except BaseException as err:
            outcome.append(err)
            raise
        finally:
            finished.set()
        return outcome[-1]

    monkeypatch.setattr(db, "ingest", recording_ingest)
    return outcome, finished


def test_an_ingest_stops_and_stores_nothing_when_its_client_goes_away(
    live_url: str, db: NeuralDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, finished = _slow_recorded_ingests(db, monkeypatch)
    label = "abandoned upload"
    body = json.dumps({"text": "A long report nobody waits for. " * 300, "label": label}).encode()  # 38 chunks
    host, port = live_url.removeprefix("http://").split(":")
    head = (f"POST /api/documents HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {LIVE_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    before = len(list(db.states_dir.glob("*")))
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head.encode() + body)
        time.sleep(0.5)  # the read has begun
    assert finished.wait(10), "the ingest went on after its client left"  # 38 chunks would take 3.8 s
    assert isinstance(outcome[0], NeuralDBError) and "cancelled" in str(outcome[0])
    assert all(d.label != label for d in db.list())
    assert len(list(db.states_dir.glob("*"))) == before  # no state file left behind


def test_a_streamed_ingest_stops_when_its_client_goes_away(
    live_url: str, db: NeuralDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, finished = _slow_recorded_ingests(db, monkeypatch)
    label = "abandoned while watched"
    auth = {"authorization": f"Bearer {LIVE_TOKEN}"}
    body = {"text": "A long report nobody watches to the end. " * 250, "label": label}  # 41 chunks
    with httpx.stream("POST", f"{live_url}/api/documents?progress=1", json=body, headers=auth, timeout=30) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["read"] == 0
        assert json.loads(next(lines))["read"] == 256  # reading: then the client leaves
    assert finished.wait(10), "the ingest went on after its client left"  # 41 chunks would take 4.1 s
    assert isinstance(outcome[0], NeuralDBError) and "cancelled" in str(outcome[0])
    assert all(d.label != label for d in db.list())


@pytest.mark.slow
def test_web_page_in_headless_chromium(
    live_url: str, db: NeuralDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (CI does: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    label = "browser memo"
    text = "The browser test says: the launch window opens on the ninth of March. " * 4
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(f"{live_url}/?token={LIVE_TOKEN}")  # the page passes the token on with every request
            expect(page.get_by_role("heading", name="coda-db")).to_be_visible()

            page.get_by_label("Label (optional)", exact=True).fill(label)
            page.get_by_label("Text", exact=True).fill(text)
            page.get_by_role("button", name="Ingest text").click()
            expect(page.locator("#ingest-status")).to_contain_text(f"“{label}”", timeout=30_000)
            page.get_by_label("Label (optional)", exact=True).fill("another name")
            page.get_by_label("Text", exact=True).fill(text)  # the same text again: not read again
            page.get_by_role("button", name="Ingest text").click()
            expect(page.locator("#ingest-status")).to_contain_text(
                f"Already stored as #{next(d.id for d in db.list() if d.label == label)} “{label}”. It keeps that "
                "label, not “another name”.",
                timeout=30_000,
            )

            info = next(d for d in db.list() if d.label == label)
            row = page.locator("#documents tbody tr", has_text=label)
            expect(row).to_have_count(1)
            expect(row.locator(".state-size")).to_have_text(format_bytes(info.state_bytes))
            expect(row.locator(".full-cache-size")).to_have_text(format_bytes(info.full_cache_bytes))
            page.set_input_files(
                "#upload-file",
                files=[{"name": "upload.txt", "mimeType": "text/plain", "buffer": b"An uploaded note: lunch at one."}],
            )
            page.get_by_role("button", name="Upload and ingest").click()
            expect(page.locator("#ingest-status")).to_contain_text("“upload.txt”", timeout=30_000)
            expect(page.locator("#documents tbody tr", has_text="upload.txt")).to_have_count(1)
            # the page picks each new document; picking one by hand must work too
            page.get_by_role("radio", name=label).check()
            expect(page.locator("#selected")).to_contain_text(label)

            page.get_by_label("Question").fill("   ")  # passes the browser's check, the server's 422 shows
            page.get_by_role("button", name="Ask", exact=True).click()
            expect(page.get_by_role("alert")).to_contain_text("question is empty")

            page.get_by_label("Question").fill("When does the launch window open?")
            page.get_by_label("Longest answer").fill("40")
            page.get_by_role("button", name="Ask", exact=True).click()
            answer = page.locator("#answer")
            expect(answer).to_have_attribute("aria-busy", "false", timeout=30_000)
            expect(page.get_by_role("alert")).to_be_hidden()
            expected = db.ask(info.id, "When does the launch window open?", max_new_tokens=40)
            assert expected.strip()
            assert answer.text_content() == expected
            page.screenshot(path=str(tmp_path / "coda-db-page.png"), full_page=True)

            # a slow read shows the tokens read so far, then the stored document
            import coda_gqa_l.neuraldb.engine as engine_module

            monkeypatch.setattr(engine_module, "stop_if_asked", lambda: time.sleep(0.3))  # 0.3 s a chunk
            slow_text = "A slow read the page counts along. " * 40  # 1,400 byte tokens: 6 chunks
            page.get_by_label("Text", exact=True).fill(slow_text)
            page.get_by_role("button", name="Ingest text").click()
            expect(page.locator("#ingest-status")).to_contain_text(f"of {len(slow_text):,} tokens (", timeout=10_000)
            expect(page.locator("#ingest-status")).to_contain_text("Stored #", timeout=30_000)
        finally:
            browser.close()
    assert (tmp_path / "coda-db-page.png").stat().st_size > 10_000
