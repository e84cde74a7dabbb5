"""Property-based fuzzing (Hypothesis, seeded) of the two places that take bytes from outside: the state-file
loader and the HTTP service. Every crafted file is refused with a ``StateFileError`` (never another exception),
every bad request gets a 4xx (never a 500). The number of cases each property tried is printed at the end of the
test run (``FUZZ_CASES``, reported by conftest.py).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import make_layer, token_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from coda_gqa_l import statefile
from coda_gqa_l.neuraldb import NeuralDatabase
from coda_gqa_l.neuraldb.server import create_app
from coda_gqa_l.statefile import StateFileError, load_state, save_state

FUZZ_CASES: Counter[str] = Counter()
EXAMPLES = int(__import__("os").environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # seeded: the same cases on every run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    layer = make_layer("gqa", "sinks-banks")
    with torch.no_grad():
        _, state = layer.prefill_chunked(token_like(1, 200, 64, 1), layer.init_state(1), block_size=50)
    path = tmp_path_factory.mktemp("fuzz") / "good.state"
    save_state(path, state, int8=True)
    return path.read_bytes()


def _load_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "crafted.state"
    path.write_bytes(data)
    load_state(path)


def _refused(tmp_path: Path, data: bytes) -> None:
    try:
        _load_bytes(tmp_path, data)
    except StateFileError:
        return
    raise AssertionError("a crafted file was loaded")


def test_truncated_files_are_refused(state_bytes: bytes, tmp_path: Path) -> None:
    @FUZZ
    @given(cut=st.integers(min_value=0, max_value=len(state_bytes) - 1))
    def check(cut: int) -> None:
        FUZZ_CASES["state file: truncation"] += 1
        _refused(tmp_path, state_bytes[:cut])

    check()


def test_bit_flips_are_refused(state_bytes: bytes, tmp_path: Path) -> None:
    @FUZZ
    @given(at=st.integers(min_value=0, max_value=len(state_bytes) - 1), bit=st.integers(0, 7))
    def check(at: int, bit: int) -> None:
        FUZZ_CASES["state file: bit flip"] += 1
        flipped = bytearray(state_bytes)
        flipped[at] ^= 1 << bit
        if bytes(flipped) == state_bytes:
            return
        try:
            _load_bytes(tmp_path, bytes(flipped))
        except StateFileError:
            return
        # a flip inside the JSON header can leave an equivalent document (e.g. a space): then it must load intact
        header = 8 + struct.unpack("<Q", state_bytes[:8])[0]
        assert at < header, "a flipped tensor byte was accepted"

    check()


def _split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    return json.loads(header["__metadata__"][statefile.METADATA_KEY]), load(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


def test_metadata_edits_with_a_recomputed_checksum_are_refused_or_loaded(state_bytes: bytes, tmp_path: Path) -> None:
    meta, tensors = _split(state_bytes)
    keys = sorted(meta)

    @FUZZ
    @given(key=st.sampled_from(keys), value=JSON_VALUES, layer_field=st.booleans())
    def check(key: str, value: object, layer_field: bool) -> None:
        FUZZ_CASES["state file: metadata edit, checksum recomputed"] += 1
        edited = json.loads(json.dumps(meta))
        if layer_field and isinstance(edited.get("configs"), list):
            edited["configs"][0][key if key in edited["configs"][0] else "window"] = value
        else:
            edited[key] = value
        try:
            edited["checksum"] = statefile._checksum(edited, tensors)
            text = json.dumps(edited, sort_keys=True)
        except (ValueError, TypeError):  # not JSON-encodable (e.g. NaN is, a set is not): nothing to write
            return
        data = save(tensors, metadata={statefile.METADATA_KEY: text})
        try:
            _load_bytes(tmp_path, data)
        except StateFileError:
            pass

    check()


def test_huge_claimed_sizes_are_refused(state_bytes: bytes, tmp_path: Path) -> None:
    @FUZZ
    @given(claim=st.integers(min_value=len(state_bytes), max_value=2**63 - 1))
    def check(claim: int) -> None:
        FUZZ_CASES["state file: huge header length"] += 1
        _refused(tmp_path, struct.pack("<Q", claim) + state_bytes[8:])

    check()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    db = NeuralDatabase.tiny_for_tests(tmp_path_factory.mktemp("fuzz-store"))
    db.ingest("A short memo about the harbour and its boats. " * 5, label="memo")
    return TestClient(create_app(db, max_upload_bytes=4000), base_url="http://127.0.0.1")


TEXTS = st.text(max_size=200) | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3)
BODIES = st.dictionaries(
    st.sampled_from(["text", "label", "question", "max_new_tokens", "temperature", "other"]),
    JSON_VALUES | TEXTS,
    max_size=4,
)


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/api/documents"), ("post", "/api/documents/1/ask"), ("post", "/api/documents/{id}/ask")],
)
def test_http_bodies_never_cause_a_server_error(client: TestClient, method: str, path: str) -> None:
    @FUZZ
    @given(body=BODIES, doc_id=st.integers(min_value=-(2**80), max_value=2**80))
    def check(body: dict, doc_id: int) -> None:
        FUZZ_CASES[f"http: {method.upper()} {path}"] += 1
        if isinstance(body.get("max_new_tokens"), int):
            body["max_new_tokens"] = max(-5, min(body["max_new_tokens"], 4))  # answers stay short
        try:
            content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError):
            return
        response = client.request(
            method.upper(), path.format(id=doc_id), content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code < 500, (body, response.status_code, response.text[:200])

    check()


def test_http_raw_bytes_never_cause_a_server_error(client: TestClient) -> None:
    @FUZZ
    @given(raw=st.binary(max_size=300), path=st.sampled_from(["/api/documents", "/api/documents/1/ask"]))
    def check(raw: bytes, path: str) -> None:
        FUZZ_CASES["http: raw bytes"] += 1
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (raw, response.status_code)

    check()
