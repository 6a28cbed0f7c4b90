"""The report: the run log, the JSON document, the text table, the markdown summary and the plots."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

JSON_NAME = "results.json"
SUMMARY_NAME = "summary.md"
LOG_NAME = "run.log"
PLOT_NAMES = ("times.png", "speedup.png", "roofline.png")

# Keys the JSON document always holds (tests check them).
REQUIRED_KEYS = ("device", "torch", "triton", "cuda", "git_commit", "timestamp", "ceilings", "cases")
REQUIRED_CASE_KEYS = (
    "name",
    "dtype",
    "shape",
    "mode",
    "status",
    "check",
    "median_ms",
    "speedup",
    "roofline_fraction",
    "goals",
    "goals_passed",
)


class RunLog:
    """Everything the run reports, echoed to the terminal (above the progress bar) and
    appended line by line to the log file, with Python warnings and logged warnings."""

    def __init__(self, path: Path, header: str = "", echo: bool = True) -> None:
        self.path, self.header, self.echo, self.bar = Path(path), header, echo, None
        self._file = None
        self._showwarning = None
        self._handler = None

    def __enter__(self) -> RunLog:
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        if self.header:
            self._file.write(f"# {self.header}\n")
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        self._handler = _FileHandler(self._file)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self._handler)
        warnings.showwarning = self._showwarning
        self._file.close()

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self(f"warning: {category.__name__}: {message} ({filename}:{lineno})", error=True)

    def __call__(self, msg: str, error: bool = False) -> None:
        self._file.write(msg + "\n")
        self._file.flush()
        if self.echo:
            stream = sys.stderr if error else sys.stdout
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg, file=stream)
            else:
                print(msg, file=stream, flush=True)


class _FileHandler(logging.Handler):
    def __init__(self, file) -> None:
        super().__init__(level=logging.WARNING)
        self.file = file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.write(f"log {record.levelname} {record.name}: {record.getMessage()}\n")
        except Exception:  # a broken log record must not stop the benchmark
            pass


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings, tuples lists, other objects their str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = Path(out) / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(results), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_sweep(doc: dict[str, Any], text: str, out: str | Path | None, stem: str, start: float) -> None:
    """A sweep's record (python -m bench.backward, bench.tiles): `doc["environment"]` (torch,
    triton and Python versions, the commit, the seconds since `start`), the table printed,
    and with `out` STEM.json and STEM.md written there."""
    import platform
    import time

    import torch
    import triton

    from .runner import git_commit

    sha, dirty = git_commit()
    doc["environment"] = {
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "git_commit": sha, "git_dirty": dirty, "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    print(text)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (folder / f"{stem}.md").write_text(text if text.endswith("\n") else text + "\n")


def tally(results: dict[str, Any]) -> dict[str, int]:
    cases = results["cases"]
    goals = [g for c in cases for g in c["goals"]]
    return {
        "cases": len(cases),
        "cases_ok": sum(c["status"] == "ok" for c in cases),
        "cases_failed_check": sum(c["status"] == "failed" for c in cases),
        "cases_with_errors": sum(c["status"] == "error" for c in cases),
        "goals": len(goals),
        "goals_passed": sum(g["passed"] is True for g in goals),
        "goals_failed": sum(g["passed"] is False for g in goals),
        "goals_unmeasured": sum(g["passed"] is None for g in goals),
    }


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def verdict_word(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "not measured"}[passed]


def goal_line(g: dict[str, Any]) -> str:
    measured = "-" if g["measured"] is None else f"{g['measured']:.3f}"
    note = f" ({g['note']})" if g.get("note") else ""
    return f"[{verdict_word(g['passed'])}] {g['text']}: measured {measured}{note}"


def ceilings_line(results: dict[str, Any]) -> str:
    parts = []
    for key, c in results.get("ceilings", {}).items():
        if "GBps" in c:
            parts.append(f"{key} {c['GBps']:.1f} GB/s")
        else:
            parts.append(f"{key} {c['TFLOPs']:.2f} TFLOP/s")
    return "ceilings (this run): " + ("; ".join(parts) or "none")


def format_table(results: dict[str, Any]) -> str:
    """The terminal table: one block per case (an implementation a row), goals beneath."""
    lines = [f"fnn benchmark on {results['device']} ({results.get('timestamp')})", ceilings_line(results)]
    if results.get("tiny"):
        lines.append("TINY MODE: tiny shapes, the numbers test the harness and mean nothing for speed")
    header = (
        f"  {'impl':<10} {'median ms':>10} {'TFLOP/s':>9} {'GB/s':>9} {'% roofline':>10} "
        f"{'fnn speedup':>11} {'peak MiB':>9}"
    )
    for c in results["cases"]:
        lines.append("")
        extra = []
        if c.get("bound"):
            extra.append(f"{c['bound']}-bound, roofline {c['roofline_ms']:.4f} ms")
        if c.get("timing_method"):
            extra.append(f"timed by {c['timing_method']}")
        if c.get("input_sets"):
            extra.append(f"{c['input_sets']} input set(s)")
        lines.append(f"{c['name']}: {c['description']}" + (f"  [{', '.join(extra)}]" if extra else ""))
        if c["status"] == "failed":
            lines.append(f"  FAILED: {c['error']}")
        elif c["status"] == "error" and c.get("error"):
            lines.append(f"  ERROR: {c['error']}")
        for name, err in (c.get("errors") or {}).items():
            lines.append(f"  ERROR in {name}: {err}")
        if c.get("median_ms_no_graph"):
            lines.append(
                "  without CUDA graph: "
                + ", ".join(f"{n} {_ms(v)} ms" for n, v in c["median_ms_no_graph"].items())
            )
        if c["status"] != "failed":
            lines.append(header)
            mem = c.get("peak_memory_bytes") or {}
            for name in c["implementations"]:
                sp = "-" if name == "fnn" else _num(c["speedup"].get(name), ".3f") + "x"
                frac = c["roofline_fraction"].get(name)
                peak = mem.get(name)
                lines.append(
                    f"  {name:<10} {_ms(c['median_ms'].get(name)):>10} "
                    f"{_num(c['tflops'].get(name), '.2f'):>9} {_num(c['gbps'].get(name), '.1f'):>9} "
                    f"{_num(None if frac is None else 100 * frac, '.1f'):>9}% "
                    f"{sp:>11} {_num(None if peak is None else peak / 2**20, '.1f'):>9}"
                )
        for g in c["goals"]:
            lines.append("  " + goal_line(g))
    s = results.get("summary") or tally(results)
    lines.append("")
    lines.append(
        f"{s['goals_passed']} of {s['goals']} goals met, {s['goals_failed']} failed, "
        f"{s['goals_unmeasured']} not measured; {s['cases_failed_check']} case(s) failed the "
        f"correctness check, {s['cases_with_errors']} had errors"
    )
    return "\n".join(lines)


def format_summary(results: dict[str, Any]) -> str:
    """The markdown summary written beside the JSON."""
    s = results.get("summary") or tally(results)
    impls = []
    for c in results["cases"]:
        for name in c["implementations"]:
            if name not in impls:
                impls.append(name)
    baselines = [n for n in impls if n != "fnn"]
    out = [f"# fnn benchmark: {results['device']}", ""]
    out.append(
        f"{results.get('timestamp')}; commit `{results.get('git_commit')}`"
        f"{' (uncommitted changes)' if results.get('git_dirty') else ''}; torch {results.get('torch')}, "
        f"triton {results.get('triton')}, CUDA {results.get('cuda')}; "
        f"fnn backend `{results.get('fnn_backend')}`; "
        f"torch.compile options `{results.get('compile')}`."
    )
    out.append("")
    out.append(f"Timer: {results['timer']['what']}.")
    if results.get("tiny"):
        out += [
            "",
            "**Tiny mode**: every case ran at a tiny shape; these numbers test the harness, not speed.",
        ]
    out += [
        "",
        f"**{s['goals_passed']} of {s['goals']} goals met**, {s['goals_failed']} failed, "
        f"{s['goals_unmeasured']} not measured. Cases: {s['cases_ok']} ok, "
        f"{s['cases_failed_check']} failed the correctness check, {s['cases_with_errors']} with errors.",
    ]
    out += ["", "## Ceilings (measured in this run)", "", "| ceiling | value | how |", "|---|---|---|"]
    for key, c in results.get("ceilings", {}).items():
        value = f"{c['GBps']:.1f} GB/s" if "GBps" in c else f"{c['TFLOPs']:.2f} TFLOP/s"
        out.append(f"| {key} | {value} | {c['what']} |")
    out += ["", "## Median times and fnn's speedup", ""]
    cols = ["case", "shape"] + [f"{n} ms" for n in impls] + ["fnn TFLOP/s", "fnn GB/s", "fnn % roofline"]
    cols += [f"vs {n}" for n in baselines] + ["peak MiB fnn / eager"]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in results["cases"]:
        frac = c["roofline_fraction"].get("fnn")
        mem = c.get("peak_memory_bytes") or {}
        mem_txt = "-"
        if mem.get("fnn") is not None and mem.get("eager") is not None:
            mem_txt = f"{mem['fnn'] / 2**20:.1f} / {mem['eager'] / 2**20:.1f}"
        row = [f"{c['name']}{' (FAILED CHECK)' if c['status'] == 'failed' else ''}", c["description"]]
        row += [_ms(c["median_ms"].get(n)) if n in c["implementations"] else "" for n in impls]
        row += [
            _num(c["tflops"].get("fnn"), ".2f"),
            _num(c["gbps"].get("fnn"), ".1f"),
            _num(None if frac is None else 100 * frac, ".1f"),
        ]
        row += [
            (_num(c["speedup"].get(n), ".3f") + "x" if c["speedup"].get(n) is not None else "-")
            if n in c["implementations"]
            else ""
            for n in baselines
        ]
        row.append(mem_txt)
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Goals", "", "| case | goal | measured | result |", "|---|---|---|---|"]
    for c in results["cases"]:
        for g in c["goals"]:
            measured = "-" if g["measured"] is None else f"{g['measured']:.3f}"
            result = verdict_word(g["passed"]) + (f" ({g['note']})" if g.get("note") else "")
            out.append(f"| {c['name']} | {g['text']} | {measured} | {result} |")
    problems = [c for c in results["cases"] if c["status"] in ("failed", "error")]
    if problems:
        out += ["", "## Failures", ""]
        for c in problems:
            out.append(f"- **{c['name']}** ({c['status']}): {c.get('error') or ''}")
            for name, err in (c.get("errors") or {}).items():
                out.append(f"  - {name}: {err}")
    out += ["", "Files: " + ", ".join(f"`{n}`" for n in (JSON_NAME, *PLOT_NAMES, LOG_NAME)) + "."]
    return "\n".join(out) + "\n"


def write_summary(results: dict[str, Any], out: Path) -> Path:
    path = Path(out) / SUMMARY_NAME
    path.write_text(format_summary(results), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """times.png (median per implementation), speedup.png (fnn over each baseline, goal
    targets marked) and roofline.png (% of the roofline per implementation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    names = [c["name"] for c in cases]
    impls: list[str] = []
    for c in cases:
        impls += [n for n in c["implementations"] if n not in impls]
    baselines = [n for n in impls if n != "fnn"]
    title = f"{results['device']}{' (tiny mode)' if results.get('tiny') else ''}"
    paths = []

    def bars(ax, series: list[str], value) -> int:
        """Grouped bars, one group per case; returns how many bars were drawn."""
        width = 0.8 / max(len(series), 1)
        drawn = 0
        for j, impl in enumerate(series):
            xs, ys = [], []
            for i, c in enumerate(cases):
                v = value(c, impl)
                if v is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, label=impl)
            drawn += len(ys)
        if not drawn:
            ax.text(0.5, 0.5, "nothing was measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(
            [n + (" (FAILED)" if c["status"] == "failed" else "") for n, c in zip(names, cases, strict=True)],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        if drawn:
            ax.legend(fontsize=8)
        return drawn

    # times.png
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases) + 2), 4.5))
    if bars(ax, impls, lambda c, n: c["median_ms"].get(n)):
        ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"fnn benchmark: median times, {title}", fontsize=10)
    fig.tight_layout()
    paths.append(Path(out) / PLOT_NAMES[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # speedup.png
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases) + 2), 4.5))
    bars(ax, baselines, lambda c, n: c["speedup"].get(n))
    ax.axhline(1.0, color="black", linewidth=0.8)
    width = 0.8 / max(len(baselines), 1)
    marked = False
    for i, c in enumerate(cases):
        for g in c["goals"]:
            if g["kind"] in ("speedup", "at_most") and g["baseline"] in baselines:
                j = baselines.index(g["baseline"])
                target = g["target"] if g["kind"] == "speedup" else 1 / g["target"]
                x = i + (j - (len(baselines) - 1) / 2) * width
                ax.plot(
                    [x - width / 2, x + width / 2],
                    [target, target],
                    color="red",
                    linewidth=2,
                    label=None if marked else "goal",
                )
                marked = True
    ax.set_ylabel("speedup of fnn (baseline median / fnn median)")
    ax.set_title(f"fnn speedup over each baseline, {title}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(Path(out) / PLOT_NAMES[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # roofline.png
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases) + 2), 4.5))
    bars(
        ax,
        impls,
        lambda c, n: None if c["roofline_fraction"].get(n) is None else 100 * c["roofline_fraction"][n],
    )
    ax.axhline(100.0, color="black", linewidth=0.8)
    ax.set_ylabel("% of roofline (measured copy and GEMM ceilings)")
    ax.set_title(f"fraction of the roofline, {title}", fontsize=10)
    fig.tight_layout()
    paths.append(Path(out) / PLOT_NAMES[2])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
