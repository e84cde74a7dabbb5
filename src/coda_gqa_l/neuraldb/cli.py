"""``coda-db``: the neural database from the command line (docs/neural_database.md).

Each subcommand opens the store folder (``--store``, default ``store`` in the user data folder,
``$XDG_DATA_HOME/coda-gqa-l/store`` on Linux) and does one thing. ``ingest``, ``ask``, ``import``
and ``serve`` load the packaged model (or the tiny random test model under ``--tiny``); ``list``,
``show``, ``delete`` and ``export`` read only the index and the files, and answer at once.
Errors the user can fix (an unknown document, a bad file, a state from another model) print one
line to stderr and exit with status 2.

Usage::

    coda-db ingest notes.txt                   # or a folder, or --text "..." --label memo
    coda-db list
    coda-db ask notes "What is the deadline?"  # by label or by id; the answer streams
    coda-db export 1 notes.state && coda-db import notes.state --label copy
    coda-db serve --port 8000                  # web page and HTTP API on 127.0.0.1
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from ..cli_help import HelpFormatter
from ..fetch import data_dir
from .interrupts import catch_ctrl_c
from .limits import MAX_NEW_TOKENS, MAX_TEMPERATURE
from .store import DocumentStore

if TYPE_CHECKING:
    from .engine import NeuralDatabase
    from .store import DocumentInfo


def default_store() -> Path:
    """Where documents go unless ``--store`` says otherwise: ``<user data folder>/store``."""
    return data_dir() / "store"


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``512 B``, ``3.2 KiB``, ``40.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_ref(ref: str) -> int | str:
    """A document reference from the command line: digits are an id, anything else a label."""
    return int(ref) if ref.isdigit() else ref


def _bounded_number(kind: type, low: float, high: float) -> Callable[[str], int | float]:
    """An argparse type: a ``kind`` from ``low`` to ``high`` (argparse names the option in its error)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails the comparison too
            raise argparse.ArgumentTypeError(f"a number from {low:g} to {high:g}, got {text!r}")
        return value

    return parse


THREADS_HELP = (
    "CPU threads for the model (default $CODA_GQA_L_THREADS, else the cores not already busy; "
    "OMP_NUM_THREADS set by you is kept)"
)


DEVICE_HELP = (
    "where the model runs: cpu (default), cuda or cuda:N; the weights keep their dtype, so a store serves both, and "
    "on CUDA answers decode through the whole model's CUDA graphs"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coda-db",
        description="A neural database: each document is kept as a fixed-size model state you can question.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--store", type=Path, default=None, help=f"store folder (default {default_store()}; the demo uses its own)"
    )
    parser.add_argument("--tiny", action="store_true", help="use the tiny random test model (fast, answers are noise)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    # the same options after the subcommand; SUPPRESS keeps the value given before it
    common = argparse.ArgumentParser(add_help=False)
    before = "as given before the command, else its default: coda-db --help"
    common.add_argument("--store", type=Path, default=argparse.SUPPRESS, help=f"store folder ({before})")
    common.add_argument(
        "--tiny", action="store_true", default=argparse.SUPPRESS, help=f"the tiny test model ({before})"
    )
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=f"CPU threads ({before})")
    common.add_argument("--device", default=argparse.SUPPRESS, help=f"where the model runs ({before})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text, description=text, formatter_class=HelpFormatter)

    p = command("ingest", "Read documents through the model and store each one's state. Give files, folders or --text.")
    p.add_argument("paths", nargs="*", type=Path, help="text files (UTF-8) or folders of them")
    p.add_argument("--text", help="ingest this text instead of files (default: none, read the paths)")
    p.add_argument("--label", help="label of the document (one document only; default: the file name)")
    p.add_argument("--pattern", default="*.txt", help="which files of a folder to ingest (default *.txt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("list", "Show every stored document: its tokens, its state size and the full KV cache it replaces.")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")

    p = command("show", "Show everything the index knows about one document, by id or label.")
    p.add_argument("ref", help="document id or label")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "ask", "Ask a question about one document; the answer streams to stdout. The stored state never changes."
    )
    p.add_argument("ref", help="document id or label")
    p.add_argument("question", nargs="+", help="the question (quotes optional)")
    p.add_argument("--max-new-tokens", type=_bounded_number(int, 1, MAX_NEW_TOKENS), default=96,
                   help=f"longest answer in tokens, 1 to {MAX_NEW_TOKENS} (default 96)")  # fmt: skip
    p.add_argument("--temperature", type=_bounded_number(float, 0.0, MAX_TEMPERATURE), default=0.0,
                   help=f"sampling temperature, 0 to {MAX_TEMPERATURE:g}; 0 is greedy (default)")  # fmt: skip

    p = command("delete", "Remove a document and its state file from the store.")
    p.add_argument("ref", help="document id or label")

    p = command("export", "Copy a document's state file out of the store, to share or to import elsewhere.")
    p.add_argument("ref", help="document id or label")
    p.add_argument("dest", type=Path, help="where to write the state file (into a folder: as ID-LABEL.state)")
    p.add_argument("--force", action="store_true", help="replace the file if it exists (default: refuse)")

    p = command("import", "Add a state file exported from a store with the same model and config.")
    p.add_argument("path", type=Path, help="the state file")
    p.add_argument("--label", help="label of the document (default: the exported one)")

    p = command("serve", "Serve the web page and the HTTP API (loopback only unless --host says otherwise).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_bounded_number(int, 1, 65535), default=8000, help="port (default 8000)")
    token_help = "access token every API request must carry (default $CODA_DB_TOKEN; required off loopback)"
    p.add_argument("--token", default=os.environ.get("CODA_DB_TOKEN"), help=token_help)

    p = command("demo", "Ingest the bundled sample document with the packaged model and ask it a few questions.")
    p.add_argument("--fresh", action="store_true", help="start from an empty store")
    sample_help = "harbour: the Kestrel Point logbook, 5 questions (default); millbrook: the observatory, 10 questions"
    p.add_argument("--sample", choices=["harbour", "millbrook"], default="harbour", help=sample_help)
    return parser


def store_folder(args: argparse.Namespace) -> Path:
    return Path(args.store) if args.store is not None else default_store()


def open_db(args: argparse.Namespace) -> NeuralDatabase:
    from .engine import NeuralDatabase

    if args.tiny:
        return NeuralDatabase.tiny_for_tests(store_folder(args), device=args.device)
    return NeuralDatabase(store_folder(args), device=args.device)


def document_table(infos: Sequence[DocumentInfo], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("label")
    table.add_column("tokens", justify="right")
    table.add_column("state", justify="right")
    table.add_column("full cache replaced", justify="right")
    table.add_column("created (UTC)")
    for info in infos:
        table.add_row(
            str(info.id),
            info.label,
            f"{info.tokens:,}",
            format_bytes(info.state_bytes),
            format_bytes(info.full_cache_bytes),
            info.created[:16].replace("T", " "),  # to the minute: the table fits 80 columns
        )
    return table


def _summary(info: DocumentInfo, asked_label: str | None = None) -> str:
    """One line on a stored document; ``asked_label``: the label the user gave (or the file's name), which a
    document stored before keeps instead of."""
    verb = "already stored" if info.duplicate else "stored"
    line = (
        f"{verb} #{info.id} {info.label!r}: {info.tokens:,} tokens, state {format_bytes(info.state_bytes)} (fixed; "
        f"a full cache of these tokens: {format_bytes(info.full_cache_bytes)})"
    )
    if info.duplicate and asked_label is not None and asked_label != info.label:
        line += f"; it keeps that label, not {asked_label!r}"
    return line


def check_ingest_args(args: argparse.Namespace) -> None:
    """What ``ingest`` can refuse before a model is loaded."""
    from .errors import NeuralDBError

    if args.text is not None and args.paths:
        raise NeuralDBError("give files or --text, not both")
    if args.text is None and not args.paths:
        raise NeuralDBError("nothing to ingest: give text files, a folder, or --text")
    if args.label is not None and (len(args.paths) > 1 or (args.paths and args.paths[0].is_dir())):
        raise NeuralDBError("--label names one document; it cannot label several files or a folder")


def files_to_ingest(paths: Sequence[Path], pattern: str) -> list[Path]:
    """``paths`` with each folder replaced by its files matching ``pattern`` (``engine.folder_files``)."""
    from .engine import folder_files

    return [file for path in paths for file in (folder_files(path, pattern) if path.is_dir() else [path])]


def cmd_ingest(db: NeuralDatabase, args: argparse.Namespace, console: Console) -> None:
    from .errors import NeuralDBError

    progress = not args.quiet
    if args.text is not None:
        print(_summary(db.ingest(args.text, label=args.label, progress=progress), args.label))
        return
    files = files_to_ingest(args.paths, args.pattern)
    failed: list[str] = []
    for path in files:  # each file on its own: one bad file neither hides nor stops the others
        try:
            info = db.ingest_file(path, label=args.label, progress=progress)
        except NeuralDBError as err:
            if len(files) == 1:
                raise
            print(f"coda-db: error: {err}", file=sys.stderr)
            failed.append(path.name)
            continue
        print(_summary(info, args.label or path.name), flush=True)
    if failed:
        raise NeuralDBError(f"{len(files) - len(failed)} of {len(files)} files stored; not stored: {', '.join(failed)}")


def cmd_list(db: DocumentStore, args: argparse.Namespace, console: Console) -> None:
    infos = db.list()
    if args.json:
        for info in infos:
            print(json.dumps(info.to_dict()))
    elif not infos:
        print(f"no documents in {db.folder}; add one with: coda-db ingest FILE")
    else:
        console.print(document_table(infos, title=f"{len(infos)} document(s) in {db.folder}"))


def cmd_show(db: DocumentStore, args: argparse.Namespace, console: Console) -> None:
    info = db.show(parse_ref(args.ref))
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    table = Table(show_header=False, title=f"document #{info.id}")
    for key, value in info.to_dict().items():
        if key.endswith("_bytes"):
            value = f"{format_bytes(value)} ({value:,} bytes)"
        elif isinstance(value, dict):
            value = json.dumps(value)
        table.add_row(key, str(value))
    console.print(table)


def cmd_ask(db: NeuralDatabase, args: argparse.Namespace, console: Console) -> None:
    question = " ".join(args.question)
    pieces = db.ask_stream(
        parse_ref(args.ref), question, max_new_tokens=args.max_new_tokens, temperature=args.temperature
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_delete(db: DocumentStore, args: argparse.Namespace, console: Console) -> None:
    info = db.show(parse_ref(args.ref))
    db.delete(info.id)
    print(f"deleted #{info.id} {info.label!r}")


def cmd_export(db: DocumentStore, args: argparse.Namespace, console: Console) -> None:
    umask = os.umask(0o022)  # read it (one thread here): the copy gets the mode a new file of the user's gets
    os.umask(umask)
    dest = db.export(parse_ref(args.ref), args.dest, overwrite=args.force, mode=0o666 & ~umask)
    print(f"wrote {dest} ({format_bytes(dest.stat().st_size)})")


def cmd_import(db: NeuralDatabase, args: argparse.Namespace, console: Console) -> None:
    print(_summary(db.import_state(args.path, label=args.label), args.label))


def cmd_serve(db: NeuralDatabase, args: argparse.Namespace, console: Console) -> None:
    from .server import check_binding, serve

    check_binding(args.host, args.token)  # before the line that says it serves

    page = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"serving {db.folder} on {page} (Ctrl-C stops)")
    serve(db, host=args.host, port=args.port, token=args.token)


MODEL_COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "import": cmd_import, "serve": cmd_serve}
# these read or change only the index and the state files: no model is loaded for them
STORE_COMMANDS = {"list": cmd_list, "show": cmd_show, "delete": cmd_delete, "export": cmd_export}


def existing_store(args: argparse.Namespace, ref: str | None = None) -> DocumentStore | None:
    """The store a command reads, or None where its folder does not exist (then nothing is created: a mistyped
    ``--store`` leaves no folders behind); with ``ref``, a missing store is that document's ``DocumentNotFound``."""
    from .errors import DocumentNotFound, NeuralDBError

    folder = store_folder(args)
    if folder.exists() and not folder.is_dir():
        raise NeuralDBError(f"{folder} is a file: --store names a store folder")
    if (folder / "index.sqlite").exists() or (folder.is_dir() and any(folder.iterdir())):
        return DocumentStore(folder)  # a folder that holds something: opened as a store, or refused as one
    if ref is not None:
        parsed = parse_ref(ref)
        raise DocumentNotFound(f"no document {parsed!r}: there is no store at {folder} (nothing ingested yet)", parsed)
    return None


def check_before_loading(args: argparse.Namespace) -> None:
    """What a model command can refuse from the store and its arguments alone, before a model loads (seconds)."""
    from .engine import check_device

    check_device(args.device)
    if args.command == "ingest":
        check_ingest_args(args)
    elif args.command == "ask":
        store = existing_store(args, args.ref)
        assert store is not None  # existing_store raised otherwise
        store.show(parse_ref(args.ref))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 on a user error (message on stderr), 130 on Ctrl-C.

    ``demo`` returns ``run_demo``'s exit code.
    """
    args = build_parser().parse_args(argv)
    from ..cpu_threads import THREADS_ENV, set_cpu_threads
    from .errors import NeuralDBError

    try:
        threads = set_cpu_threads(args.threads)
    except ValueError as exc:
        print(f"coda-db: {exc}", file=sys.stderr)
        return 2
    os.environ[THREADS_ENV] = str(threads)  # the demo's asking process uses the same count

    try:
        with catch_ctrl_c():
            if args.command == "demo":
                from .demo import run_demo

                return run_demo(args)
            if args.command in STORE_COMMANDS:
                store = existing_store(args, None if args.command == "list" else args.ref)
                if store is None:
                    print(f"no store at {store_folder(args)} yet; add a document with: coda-db ingest FILE")
                else:
                    STORE_COMMANDS[args.command](store, args, Console())
            else:
                check_before_loading(args)
                MODEL_COMMANDS[args.command](open_db(args), args, Console())
    except NeuralDBError as err:
        print(f"coda-db: error: {err}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as err:  # a damaged index: name the file
        index = store_folder(args) / "index.sqlite"
        print(f"coda-db: error: the store's index {index} cannot be read ({err})", file=sys.stderr)
        return 2
    except OSError as err:  # a folder where a file was meant, a missing folder, no permission, ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"coda-db: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coda-db: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
