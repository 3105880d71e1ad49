"""Medians of the interleaved rounds, target verdicts, and the three outputs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from workloads import CASES, FLOOR, TARGETS, TARGETS_WITH_FLOOR, Case, Measurement, median

P99_ADDED_LIMIT_MS = 0.5
IDLE_RSS_LIMIT_MIB = 150.0
CLIENTS_TARGET = 5000
TARGET_CLIENTS = 8  # the targets are stated for 8 clients

CASE_BY_KEY: dict[str, Case] = {c.key: c for c in CASES}


def summarize(runs: list[Measurement]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    for run in runs:
        groups.setdefault((run.case, run.protocol, run.clients), []).append(run)
    rows: list[dict[str, Any]] = []
    for (case_key, protocol, clients), items in groups.items():
        row: dict[str, Any] = {"case": case_key, "protocol": protocol, "clients": clients}
        with_floor = any(m.target == FLOOR for m in items)
        for target in TARGETS_WITH_FLOOR if with_floor else TARGETS:
            mine = [m for m in items if m.target == target]
            good = [m for m in mine if m.ok]
            row[target] = {
                "tps": median([m.tps for m in good]),
                "p50_ms": median([m.p50_ms for m in good]),
                "p99_ms": median([m.p99_ms for m in good]),
                "rounds": len(good),
                "failed_rounds": len(mine) - len(good),
                "tps_rounds": [round(m.tps, 1) for m in mine],
            }
        tg, pgb, direct = row["tenantgate"], row["pgbouncer"], row["direct"]
        row["ratio_pgbouncer"] = _ratio(tg["tps"], pgb["tps"])
        row["ratio_direct"] = _ratio(tg["tps"], direct["tps"])
        row["p99_added_ms"] = tg["p99_ms"] - direct["p99_ms"]
        # What one more process on the path costs by itself: the p99 target's floor.
        row["pgbouncer_p99_added_ms"] = pgb["p99_ms"] - direct["p99_ms"]
        if with_floor:  # how far the cheapest Python proxy gets, and tenantgate of it
            row["floor_ratio_pgbouncer"] = _ratio(row[FLOOR]["tps"], pgb["tps"])
            row["ratio_floor"] = _ratio(tg["tps"], row[FLOOR]["tps"])
            row["floor_p99_added_ms"] = row[FLOOR]["p99_ms"] - direct["p99_ms"]
        case = CASE_BY_KEY[case_key]
        row["target_ratio"] = case.target_ratio
        row["meets_ratio"] = row["ratio_pgbouncer"] >= case.target_ratio
        row["meets_p99"] = row["p99_added_ms"] <= P99_ADDED_LIMIT_MS
        rows.append(row)
    order = {c.key: i for i, c in enumerate(CASES)}
    protocols = {"simple": 0, "extended": 1, "prepared": 2}
    rows.sort(key=lambda r: (r["clients"], order[r["case"]], protocols[r["protocol"]]))
    return rows


def _ratio(a: float, b: float) -> float:
    if not (a == a and b == b) or b <= 0:  # NaN or zero
        return float("nan")
    return a / b


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _against(ratio: float, target: float) -> str:
    """A ratio to two places, or three where two would round a miss up to the target
    (0.896 against 0.9 reads 0.896, not 0.90)."""
    if ratio == ratio and ratio < target <= round(ratio, 2):
        return _f(ratio, 3)
    return _f(ratio)


def _tps(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["summary"]
    machine = result["machine"]
    out: list[str] = []
    out.append(f"Command: `{result['command']}`  ")
    out.append(
        f"Machine: {machine['nproc']} cores, {machine['cpu']}; PostgreSQL "
        f"{machine['postgres']}; {machine['pgbouncer']}; Python {machine['python']}; "
        f"{machine['pgbench']}; tenantgate: {machine.get('tenantgate_build', 'n/a')}  "
    )
    cfg = result["config"]
    floor = any(FLOOR in r for r in rows)
    out.append(
        f"Rounds {cfg['rounds']} (interleaved direct / PgBouncer / "
        + ("forwarder / " if floor else "")
        + "tenantgate), "
        f"{cfg['duration']} s each, `-j 2`; medians of the rounds. "
        f"Started {result['started']}, took {result['elapsed_s']:.0f} s."
    )
    load = result.get("load_average") or {}
    if load:
        out.append(
            "Load average (1/5/15 min) at start "
            + "/".join(f"{x:.1f}" for x in load["start"])
            + ", at end "
            + "/".join(f"{x:.1f}" for x in load["end"])
            + " (the box is shared; each run's 1-min load is in results.json)."
        )
    if floor:
        out.append(
            "The forwarder (`forwarder.py`, 8 clients only) is the reference floor: a uvloop "
            "proxy that parses nothing and runs the baseline script; fwd/PgB is how far any "
            "Python proxy gets here, tg/fwd what tenantgate's work costs on top of that."
        )
    out.append("")
    floor_head = " fwd/PgB | tg/fwd |" if floor else ""
    out.append(
        "| case | proto | clients | direct TPS | PgBouncer TPS | tenantgate TPS | "
        "tg/PgB | tg/direct |" + floor_head + " p50 ms d / PgB / tg | p99 ms d / PgB / tg | "
        "p99 added ms | target |"
    )
    out.append(
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if floor else "") + "---|---|---|---|"
    )
    for r in rows:
        d, p, t = r["direct"], r["pgbouncer"], r["tenantgate"]
        verdict = "n/a (64 cl.)"
        if r["clients"] == TARGET_CLIENTS:
            verdict = _verdict(r)
        failed = sum(r[x]["failed_rounds"] for x in TARGETS_WITH_FLOOR if x in r)
        note = f" ({failed} failed runs)" if failed else ""
        floor_cells = ""
        if floor:
            floor_cells = (
                f" {_f(r['floor_ratio_pgbouncer'])} | {_f(r['ratio_floor'])} |"
                if FLOOR in r
                else " | |"
            )
        out.append(
            f"| {r['case']} | {r['protocol']} | {r['clients']} | {_tps(d['tps'])} | "
            f"{_tps(p['tps'])} | {_tps(t['tps'])}{note} | "
            f"{_against(r['ratio_pgbouncer'], r['target_ratio'])} | "
            f"{_f(r['ratio_direct'])} |{floor_cells} {_f(d['p50_ms'], 3)} / {_f(p['p50_ms'], 3)} / "
            f"{_f(t['p50_ms'], 3)} | {_f(d['p99_ms'], 3)} / {_f(p['p99_ms'], 3)} / "
            f"{_f(t['p99_ms'], 3)} | {_f(r['p99_added_ms'], 3)} | {verdict} |"
        )
    conn = result.get("connections")
    if conn:
        out.append("")
        out.append(
            f"tenantgate RSS: {conn['rss_start_mib']:.1f} MiB at start, "
            f"{conn['rss_idle_mib']:.1f} MiB with {conn['idle_opened']}/{conn['idle_clients']} "
            f"idle authenticated clients ({conn['rss_per_client_kib']:.0f} KiB per client; "
            f"opened in {conn['idle_open_seconds']:.1f} s). Largest client count held: "
            f"{conn['max_held']} of {conn['max_attempted']} attempted "
            f"(RSS {conn['rss_at_max_mib']:.1f} MiB"
            + (f", opened in {conn['max_open_seconds']:.1f} s" if conn["max_open_seconds"] else "")
            + ")."
            + (f" First error: `{conn['first_error']}`." if conn["first_error"] else "")
        )
    out.append("")
    out.append("Targets (issue 6; 8 clients, medians):")
    out.append("")
    for line in result["targets"]:
        out.append(f"- {line}")
    if result.get("incidents"):
        out.append("")
        out.append("Incidents:")
        out.append("")
        for line in result["incidents"]:
            out.append(f"- {line}")
    return "\n".join(out) + "\n"


def _verdict(row: dict[str, Any]) -> str:
    """A row's two targets, each named: TPS ratio and p99 added over direct."""
    tps = "TPS met" if row["meets_ratio"] else "**TPS missed**"
    p99 = "p99 met" if row["meets_p99"] else "**p99 missed**"
    others = "" if row["meets_p99"] else f"; {_others_p99(row)}"
    return f"{tps} (>= {row['target_ratio']:.1f}x); {p99} (<= {P99_ADDED_LIMIT_MS} ms{others})"


def _others_p99(row: dict[str, Any]) -> str:
    """What PgBouncer (and the bare forwarder) add to the p99 in the same row."""
    added = f"PgBouncer adds {_f(row['pgbouncer_p99_added_ms'], 3)}"
    if "floor_p99_added_ms" in row:
        added += f", the forwarder {_f(row['floor_p99_added_ms'], 3)}"
    return added


def target_lines(rows: list[dict[str, Any]], conn: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    eight = [r for r in rows if r["clients"] == TARGET_CLIENTS]
    for case in CASES:
        mine = [r for r in eight if r["case"] == case.key]
        if not mine:
            continue
        parts = ", ".join(
            f"{r['protocol']} "
            + (
                f"{_against(r['ratio_pgbouncer'], r['target_ratio'])}x"
                if r["ratio_pgbouncer"] == r["ratio_pgbouncer"]
                else "n/a: every tenantgate run failed"
            )
            for r in mine
        )
        ok = all(r["meets_ratio"] for r in mine)
        floor = ""
        if all("floor_ratio_pgbouncer" in r for r in mine):
            floor = "; the bare forwarder: " + ", ".join(
                f"{r['protocol']} {_f(r['floor_ratio_pgbouncer'])}x" for r in mine
            )
        lines.append(
            f"{case.key} >= {case.target_ratio:.1f}x PgBouncer: "
            f"{'MET' if ok else 'NOT MET'} ({parts}{floor})"
        )
    if eight:
        worst = max(
            eight, key=lambda r: r["p99_added_ms"] if r["p99_added_ms"] == r["p99_added_ms"] else -1
        )
        ok = all(r["meets_p99"] for r in eight)
        lines.append(
            f"p99 added over direct <= {P99_ADDED_LIMIT_MS} ms: {'MET' if ok else 'NOT MET'} "
            f"(worst {_f(worst['p99_added_ms'], 3)} ms in {worst['case']} {worst['protocol']}; "
            f"met in {sum(r['meets_p99'] for r in eight)}/{len(eight)}"
            + "".join(
                f"; {r['case']} {r['protocol']} {_f(r['p99_added_ms'], 3)}: {_others_p99(r)}"
                for r in eight
                if not r["meets_p99"]
            )
            + ")"
        )
    if conn:
        ok = conn["idle_opened"] >= 1000 and conn["rss_idle_mib"] <= IDLE_RSS_LIMIT_MIB
        lines.append(
            f"1,000 idle clients <= {IDLE_RSS_LIMIT_MIB:.0f} MB RSS: "
            f"{'MET' if ok else 'NOT MET'} ({conn['rss_idle_mib']:.1f} MiB with "
            f"{conn['idle_opened']} clients)"
        )
        ok = conn["max_held"] >= CLIENTS_TARGET
        verdict = "MET" if ok else "NOT MET"
        if not ok and conn["max_attempted"] < CLIENTS_TARGET:
            verdict = "NOT TRIED in this run (--max-clients)"
        lines.append(
            f"{CLIENTS_TARGET:,} concurrent clients accepted: {verdict} (held "
            f"{conn['max_held']} of {conn['max_attempted']} attempted)"
        )
    return lines


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib (no chart)")
        return False
    client_counts = sorted({r["clients"] for r in rows})
    if not client_counts:
        return False
    fig, axes = plt.subplots(
        len(client_counts), 1, figsize=(13, 4.2 * len(client_counts)), squeeze=False
    )
    colors = {
        "direct": "#7f7f7f",
        "pgbouncer": "#1f77b4",
        FLOOR: "#bcbd22",
        "tenantgate": "#d62728",
    }
    for ax, clients in zip(axes[:, 0], client_counts, strict=True):
        mine = [r for r in rows if r["clients"] == clients]
        labels = [f"{r['case']}\n{r['protocol']}" for r in mine]
        shown = [t for t in TARGETS_WITH_FLOOR if any(t in r for r in mine)]
        width = 0.8 / len(shown)
        for i, target in enumerate(shown):
            values = [_bar(r, target) for r in mine]
            xs = [x + (i - (len(shown) - 1) / 2) * width for x in range(len(mine))]
            ax.bar(xs, values, width, label=target, color=colors[target])
        for x, r in enumerate(mine):
            ratio = r["ratio_pgbouncer"]
            if ratio == ratio:
                top = max(_bar(r, t) for t in shown)
                last = x + (len(shown) - 1) / 2 * width  # above tenantgate's bar
                ax.annotate(
                    f"{_against(ratio, r['target_ratio'])}x",
                    (last, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("TPS (median)")
        ax.set_title(f"{clients} clients (label: tenantgate / PgBouncer)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar(row: dict[str, Any], target: str) -> float:
    """A target's median TPS in a row, 0 if it has none."""
    tps = row[target]["tps"] if target in row else float("nan")
    return float(tps) if tps == tps else 0.0


def write_outputs(result: dict[str, Any], runs: list[Measurement], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {**result, "runs": [asdict(r) for r in runs]}
    (out_dir / "results.json").write_text(json.dumps(_clean(data), indent=2) + "\n")
    render(result, out_dir)


def render(result: dict[str, Any], out_dir: Path) -> None:
    """results.md and the chart of a run's result."""
    (out_dir / "results.md").write_text(markdown(result))
    chart(result["summary"], out_dir / "results.png", f"tenantgate benchmark: {result['command']}")


def _clean(value: Any) -> Any:
    """JSON has no NaN: use null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":  # re-render results.md and the chart from a results.json
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/results.json")
    saved = json.loads(source.read_text())
    saved["targets"] = target_lines(saved["summary"], saved.get("connections"))
    render(saved, source.parent)
