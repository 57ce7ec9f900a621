"""Run history: every bench, profile, train, memory and compression run, with its environment and
results, in one SQLite file (``runs/history.sqlite`` unless ``$TORCHKILN_HISTORY`` says otherwise).

Safe with concurrent writers and killed writers: WAL journal, one transaction per record, a busy
timeout. A file that is not a torchkiln history database is refused with a clear error instead of
being modified.

>>> import tempfile, os
>>> h = History(os.path.join(tempfile.mkdtemp(), "h.sqlite"))
>>> run_id = h.record("bench", "mlp", {"latency_ms": {"p50": 1.5}}, env={"threads": 1})
>>> h.get(run_id).results["latency_ms"]["p50"]
1.5
>>> [r.id for r in h.list(kind="bench")] == [run_id]
True
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchkiln.errors import KilnError

# PRAGMA application_id marks the file as ours ("tkln" as a 32-bit integer).
APPLICATION_ID = 0x746B6C6E
SCHEMA_VERSION = 1
KINDS = (
    "bench",
    "profile",
    "memory",
    "train",
    "compress",
    "export",
    "optimize",
    "serve",
    "loadtest",
    "other",
)


class HistoryError(KilnError):
    """The history database is unreadable, foreign, from a newer version, or a run is missing."""


@dataclass
class Run:
    """One recorded run."""

    id: str
    kind: str
    name: str
    created: str
    results: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    git_commit: str | None = None
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "created": self.created,
            "status": self.status,
            "parent": self.parent,
            "git_commit": self.git_commit,
            "env": self.env,
            "config": self.config,
            "results": self.results,
            "artifacts": self.artifacts,
        }


def default_history_path() -> Path:
    """``$TORCHKILN_HISTORY`` or ``runs/history.sqlite`` under the current directory."""
    return Path(os.environ.get("TORCHKILN_HISTORY") or Path("runs") / "history.sqlite")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',
    parent TEXT,
    git_commit TEXT,
    env TEXT NOT NULL,
    config TEXT NOT NULL,
    results TEXT NOT NULL,
    artifacts TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_kind_name ON runs(kind, name, created);
CREATE TABLE IF NOT EXISTS cache (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    created TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

# Added after schema 1 shipped; created on first use, so files written before it stay readable by both.
_CACHE_SCHEMA = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS cache") :]


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, allow_nan=True)


class History:
    """A handle on one history database file; cheap to create, safe to use from several processes."""

    def __init__(self, path: str | os.PathLike | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_history_path()
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            self._check_or_init(conn)

    # ------------------------------------------------------------------------------------------- internals

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            yield conn
        except sqlite3.DatabaseError as exc:
            if "file is not a database" in str(exc) or "malformed" in str(exc):
                raise HistoryError(
                    f"{self.path} is not a torchkiln history database (SQLite says: {exc}); "
                    "move it away or point TORCHKILN_HISTORY elsewhere"
                ) from None
            raise
        finally:
            conn.close()

    def _check_or_init(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == 0 and not tables:
            # A new (or empty) file: make it ours, atomically.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                if app_id == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return
        if app_id != APPLICATION_ID:
            raise HistoryError(
                f"{self.path} is an SQLite database but not a torchkiln history database "
                f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x}); it was left untouched"
            )
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} was written by a newer torchkiln (history schema {version}, this one reads "
                f"up to {SCHEMA_VERSION}); upgrade torchkiln"
            )

    @staticmethod
    def _row_to_run(row: sqlite3.Row | tuple) -> Run:
        (rid, kind, name, created, status, parent, git, env, config, results, artifacts) = row
        return Run(
            id=rid,
            kind=kind,
            name=name,
            created=created,
            status=status,
            parent=parent,
            git_commit=git,
            env=json.loads(env),
            config=json.loads(config),
            results=json.loads(results),
            artifacts=json.loads(artifacts),
        )

    # ------------------------------------------------------------------------------------------- API

    def record(
        self,
        kind: str,
        name: str,
        results: dict[str, Any],
        *,
        env: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        artifacts: dict[str, str] | None = None,
        parent: str | None = None,
        git_commit: str | None = None,
        status: str = "ok",
        run_id: str | None = None,
    ) -> str:
        """Insert one run in a single transaction; return its id (``<kind>-<utc time>-<random>``)."""
        if kind not in KINDS:
            raise HistoryError(f"unknown run kind {kind!r}; accepted: {', '.join(KINDS)}")
        now = datetime.now(timezone.utc)
        rid = run_id or f"{kind}-{now.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if env is None:
            from torchkiln.measure import collect_env

            env = collect_env()
        if git_commit is None:
            git_commit = env.get("git_commit") if isinstance(env, dict) else None
        row = (
            rid,
            kind,
            name,
            now.isoformat(timespec="seconds"),
            status,
            parent,
            git_commit,
            _dumps(env),
            _dumps(config or {}),
            _dumps(results),
            _dumps({k: str(v) for k, v in (artifacts or {}).items()}),
        )
        with self._connect() as conn:
            try:
                self._write(conn, "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            except sqlite3.IntegrityError:
                raise HistoryError(f"a run with id {rid!r} already exists in {self.path}") from None
        return rid

    def _write(self, conn: sqlite3.Connection, statement: str, row: tuple[Any, ...]) -> None:
        """``statement`` with ``row`` in one immediate transaction, rolled back on any error and retried
        while the database stays locked past the busy timeout (other errors propagate)."""
        for attempt in range(5):
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(statement, row)
                conn.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not isinstance(exc, sqlite3.OperationalError):
                    raise
                if "locked" not in str(exc) and "busy" not in str(exc) or attempt == 4:
                    raise HistoryError(f"cannot write to {self.path}: {exc}") from None
                time.sleep(0.05 * (attempt + 1))

    def get(self, run_id: str) -> Run:
        """The run with this id, or a unique id prefix, or ``kind:name`` for the newest such run.

        An exact id wins over everything else; ``kind:name`` is tried next (run ids never contain
        ``:``), then the prefix, which must match exactly one run.
        """
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is not None:
                return self._row_to_run(row)
            kind, sep, name = run_id.partition(":")
            if sep:
                if kind not in KINDS:
                    raise HistoryError(
                        f"no run {run_id!r} in {self.path}, and {kind!r} is not a run kind for the "
                        f"kind:name form (accepted kinds: {', '.join(KINDS)})"
                    )
                row = conn.execute(
                    "SELECT * FROM runs WHERE kind=? AND name=? ORDER BY created DESC, rowid DESC LIMIT 1",
                    (kind, name),
                ).fetchone()
                rows = [row] if row else []
            else:
                # substr rather than LIKE: '_' and '%' in an id are not wildcards.
                rows = conn.execute(
                    "SELECT * FROM runs WHERE substr(id, 1, ?) = ? ORDER BY created DESC, rowid DESC LIMIT 6",
                    (len(run_id), run_id),
                ).fetchall()
        if not rows:
            raise HistoryError(f"no run {run_id!r} in {self.path}; `kiln history` lists the runs")
        if len(rows) > 1:
            some = ", ".join(r[0] for r in rows[:5])
            raise HistoryError(
                f"run id prefix {run_id!r} is ambiguous in {self.path} (matches {some}"
                f"{', ...' if len(rows) > 5 else ''}); give more characters"
            )
        return self._row_to_run(rows[0])

    def list(self, kind: str | None = None, name: str | None = None, limit: int = 50) -> list[Run]:
        """Newest first."""
        query, args = "SELECT * FROM runs", []
        where = []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if name:
            where.append("name = ?")
            args.append(name)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created DESC, rowid DESC LIMIT ?"
        args.append(int(limit))
        with self._connect() as conn:
            return [self._row_to_run(r) for r in conn.execute(query, args).fetchall()]

    def latest(self, kind: str, name: str | None = None) -> Run | None:
        runs = self.list(kind=kind, name=name, limit=1)
        return runs[0] if runs else None

    def add_artifact(self, run_id: str, key: str, path: str | os.PathLike) -> None:
        """Attach a file (a report, a trace) to an existing run."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT artifacts FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise HistoryError(f"no run {run_id!r} in {self.path}")
                artifacts = json.loads(row[0])
                artifacts[key] = str(path)
                conn.execute("UPDATE runs SET artifacts = ? WHERE id = ?", (_dumps(artifacts), run_id))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------------------------- cache

    def cache_get(self, namespace: str) -> dict[str, Any]:
        """Every ``{key: value}`` stored under ``namespace`` (e.g. one optimize search's finished
        candidates), oldest first; empty when there are none."""
        with self._connect() as conn:
            conn.execute(_CACHE_SCHEMA)
            rows = conn.execute(
                "SELECT key, value FROM cache WHERE namespace = ? ORDER BY created, rowid", (namespace,)
            ).fetchall()
        out: dict[str, Any] = {}
        for key, value in rows:
            try:
                out[key] = json.loads(value)
            except ValueError:  # a row another writer could not finish is not a result: skip it
                continue
        return out

    def cache_put(self, namespace: str, key: str, value: Any) -> None:
        """Store (or replace) one JSON-serializable ``value``, in its own transaction: an interrupted
        writer leaves every earlier entry intact."""
        row = (namespace, key, datetime.now(timezone.utc).isoformat(timespec="seconds"), _dumps(value))
        with self._connect() as conn:
            conn.execute(_CACHE_SCHEMA)
            self._write(conn, "INSERT OR REPLACE INTO cache VALUES (?,?,?,?)", row)

    def cache_clear(self, namespace: str | None = None) -> int:
        """Delete the entries of ``namespace`` (every namespace when None); return how many."""
        with self._connect() as conn:
            conn.execute(_CACHE_SCHEMA)
            if namespace is None:
                cur = conn.execute("DELETE FROM cache")
            else:
                cur = conn.execute("DELETE FROM cache WHERE namespace = ?", (namespace,))
            return int(cur.rowcount)


# ------------------------------------------------------------------------------------------- summaries


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def bench_variants(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{variant name: variant dict}`` of a bench-shaped results dict (tolerates missing keys)."""
    out: dict[str, dict[str, Any]] = {}
    for v in results.get("variants") or []:
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            out[v["name"]] = v
    return out


def variant_p50_ms(variant: dict[str, Any]) -> float | None:
    """A variant dict's p50 latency in ms (None where it has none)."""
    latency = variant.get("latency_ms")
    return _number(latency.get("p50")) if isinstance(latency, dict) else None


def key_figures(run: Run) -> str:
    """A one-line summary of a run's results for ``kiln history`` (empty where nothing is known).

    >>> key_figures(Run("x", "bench", "mlp", "now", results={"baseline": "fp32", "batch_size": 8,
    ...     "variants": [{"name": "fp32", "latency_ms": {"p50": 1.25}, "throughput_per_s": 6400.0}]}))
    'fp32 p50 1.25 ms @ batch 8, 6,400/s'
    """
    r = run.results or {}
    parts: list[str] = []
    if run.kind == "train":
        summary = r.get("summary") if isinstance(r.get("summary"), dict) else {}
        loss = _number(summary.get("final_loss"))
        if loss is not None:
            parts.append(f"final loss {loss:.4g}")
        for key, value in summary.items():
            if key.startswith("val_") and _number(value) is not None:
                parts.append(f"{key} {value:.4g}")
        rate = _number(summary.get("samples_per_s"))
        if rate:
            parts.append(f"{rate:.3g} samples/s")
        return ", ".join(parts)
    if run.kind == "profile":
        step = _number(r.get("step_ms"))
        if step is not None:
            parts.append(f"step {step:.4g} ms")
        mfu = _number(r.get("mfu"))
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        return ", ".join(parts)
    variants = bench_variants(r)
    if variants:
        name = r.get("baseline") if r.get("baseline") in variants else next(iter(variants))
        base = variants[name]
        p50 = variant_p50_ms(base)
        text = f"{name} p50 {p50:.4g} ms" if p50 is not None else name
        if r.get("batch_size") is not None:
            text += f" @ batch {r['batch_size']}"
        rate = _number(base.get("throughput_per_s"))
        if rate:
            text += f", {rate:,.0f}/s"
        parts.append(text)
        best = max(
            (v for v in variants.values() if _number(v.get("speedup_vs_baseline")) is not None),
            key=lambda v: v["speedup_vs_baseline"],
            default=None,
        )
        if best is not None and best["name"] != name and len(variants) > 1:
            parts.append(f"best {best['name']} {best['speedup_vs_baseline']:.2f}x")
        return "; ".join(parts)
    numbers = [(k, _number(v)) for k, v in r.items()]
    return ", ".join([f"{k} {v:.4g}" for k, v in numbers if v is not None][:4])


def compare_bench_results(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Variant-by-variant p50 comparison of two bench results dicts (same-named variants only).

    ``rows``: ``{"variant", "base_p50_ms", "new_p50_ms", "time_ratio" (new/base; above 1 = slower),
    "change" (time_ratio - 1)}``; ``only_base``/``only_new``: unmatched variant names; ``warnings``:
    differences that make the comparison less like with like (batch size, threads, device, CPU).

    >>> a = {"batch_size": 8, "variants": [{"name": "fp32", "latency_ms": {"p50": 2.0}}]}
    >>> b = {"batch_size": 8, "variants": [{"name": "fp32", "latency_ms": {"p50": 3.0}}]}
    >>> compare_bench_results(a, b)["rows"][0]["change"]
    0.5
    """
    va, vb = bench_variants(base), bench_variants(new)
    rows = []
    for name in [n for n in vb if n in va]:
        pa, pb = variant_p50_ms(va[name]), variant_p50_ms(vb[name])
        if pa is None or pb is None:
            continue
        ratio = pb / pa if pa > 0 else float("inf")
        rows.append(
            {"variant": name, "base_p50_ms": pa, "new_p50_ms": pb, "time_ratio": ratio, "change": ratio - 1}
        )
    warnings = []
    for key in ("batch_size", "threads", "device", "model"):
        if base.get(key) is not None and new.get(key) is not None and base.get(key) != new.get(key):
            warnings.append(f"{key} differs: {base.get(key)} vs {new.get(key)}")
    return {
        "rows": rows,
        "only_base": [n for n in va if n not in vb],
        "only_new": [n for n in vb if n not in va],
        "warnings": warnings,
    }


def _train_metrics(run: Run) -> dict[str, float]:
    summary = run.results.get("summary") if isinstance(run.results.get("summary"), dict) else {}
    return {k: v for k, v in ((k, _number(v)) for k, v in summary.items()) if v is not None}


def compare_runs(a: Run, b: Run) -> dict[str, Any]:
    """Compare two runs of the same kind: bench-shaped runs variant by variant (p50, b relative to a),
    train runs by their final metrics; other kinds by their top-level numbers.

    Returns ``{"kind", "a", "b", "rows", ...}``; see :func:`compare_bench_results` for bench rows. Train
    and other rows are ``{"metric", "a", "b", "diff" (b - a)}``.
    """
    if a.kind != b.kind:
        raise HistoryError(f"cannot compare a {a.kind!r} run ({a.id}) with a {b.kind!r} run ({b.id})")
    out: dict[str, Any] = {"kind": a.kind, "a": a.id, "b": b.id}
    if bench_variants(a.results) and bench_variants(b.results):
        out.update(compare_bench_results(a.results, b.results))
        cpu_a = (a.env.get("cpu") or {}).get("model") if isinstance(a.env, dict) else None
        cpu_b = (b.env.get("cpu") or {}).get("model") if isinstance(b.env, dict) else None
        if cpu_a and cpu_b and cpu_a != cpu_b:
            out["warnings"].append(f"measured on different CPUs: {cpu_a} vs {cpu_b}")
        return out
    if a.kind == "train":
        ma, mb = _train_metrics(a), _train_metrics(b)
    else:
        ma = {k: v for k, v in ((k, _number(v)) for k, v in a.results.items()) if v is not None}
        mb = {k: v for k, v in ((k, _number(v)) for k, v in b.results.items()) if v is not None}
    out["rows"] = [{"metric": k, "a": ma[k], "b": mb[k], "diff": mb[k] - ma[k]} for k in ma if k in mb]
    out["only_a"] = [k for k in ma if k not in mb]
    out["only_b"] = [k for k in mb if k not in ma]
    out["warnings"] = []
    return out
