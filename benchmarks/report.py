"""Render benchmark JSON: ``python -m benchmarks.report [results/*.json] [--readme README.md]``.

For each JSON file: a plot of effective GB/s by vocabulary size, one line per provider, written
beside it as a PNG; then the README's text between the markers below is replaced by a generated
section per file (default: the newest file of each GPU in benchmarks/results/). Only what the
JSON holds is written: a number that was not measured shows as "-", "OOM" or "error".
"""
import argparse
import json
import os
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = RESULTS_DIR.parents[1] / "README.md"
MODE_TITLES = {"fwd+bwd": "forward + backward", "fwd": "forward"}


def _num(x):
    """Three significant digits, without an exponent: 0.0123, 4.56, 789, 3012."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _gb(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes is not None else "-"


def text_row(row):
    """One row as a line of the runner's log."""
    head = f"{row['mode']:8} N={row['n']:<6} V={row['v']:<7} T={row['t']:<4g} {row['provider']:19}"
    if row["status"] != "ok":
        return f"{head} {row['status']}" + (f": {row['reason']}" if row.get("reason") else "")
    return (f"{head} {row['ms']:9.3f} ms {row['gbps']:8.1f} GB/s {row['copy_fraction']:6.1%} "
            f"of copy, extra {_gb(row.get('peak_extra_bytes'))}")


def _provenance_line(result):
    p = result["provenance"]
    commit = p["commit"][:12] + ("-dirty" if p.get("dirty") else "")
    liger = f", liger-kernel {p['liger_kernel']}" if p.get("liger_kernel") else ""
    return (f"{p['gpu']}, {p['date']}; torch {p['torch']}, triton {p['triton']}, "
            f"CUDA {p['cuda']}{liger}; commit {commit}; {result['dtype']}, hrm={result['hrm']}; "
            f"device-to-device copy {result['copy_gbps']:.0f} GB/s")


def _skipped(result):
    return [(name, info["reason"]) for name, info in result["providers"].items()
            if info["status"] == "skipped"]


def text_table(result):
    """The whole result as plain text, for the terminal."""
    lines = [_provenance_line(result)]
    lines += [text_row(r) for r in sorted(result["results"], key=_order(result))]
    lines += [f"skipped {name}: {why}" for name, why in _skipped(result)]
    return "\n".join(lines)


def _order(result):
    names = list(result["providers"])
    return lambda r: (r["mode"] != "fwd+bwd", r["n"], r["v"], r["t"], names.index(r["provider"]))


def _cell(row):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"mismatch": "wrong loss"}.get(row["status"], row["status"])
    frac = row["copy_fraction"]
    frac = f"{frac:.0%}" if frac >= 0.01 else f"{frac:.1%}"
    cell = f"{_num(row['ms'])} ms<br>{_num(row['gbps'])} GB/s ({frac})"
    if row.get("peak_extra_bytes") is not None:
        cell += f"<br>+{_gb(row['peak_extra_bytes'])}"
    return cell


def markdown(result, json_path, base_dir):
    """A README section for one result: provenance, the plot, a table per mode, what was skipped.

    Links are relative to base_dir (the README's folder).
    """
    json_path = Path(json_path)

    def rel(path):
        return Path(os.path.relpath(path, base_dir)).as_posix()

    names = [n for n, info in result["providers"].items() if info["status"] == "run"]
    rows = {(r["mode"], r["n"], r["v"], r["t"], r["provider"]): r for r in result["results"]}
    out = [f"#### {result['provenance']['gpu']}, {result['provenance']['date'][:10]}", "",
           _provenance_line(result) + f" ([JSON]({rel(json_path)})).", ""]
    if json_path.with_suffix(".png").exists():
        out += [f"![Effective GB/s by vocabulary size]({rel(json_path.with_suffix('.png'))})", ""]
    for mode in ("fwd+bwd", "fwd"):
        problems = sorted({k[1:4] for k in rows if k[0] == mode})
        if not problems:
            continue
        out += [(f"**{MODE_TITLES[mode]}**: median time, effective GB/s (fraction of the copy "
                 "bandwidth), peak memory beyond the inputs."), "",
                "| N | V | T | " + " | ".join(f"`{n}`" for n in names) + " |",
                "|---:|---:|---:|" + "---|" * len(names)]
        for n, v, t in problems:
            cells = [_cell(rows.get((mode, n, v, t, name))) for name in names]
            out.append(f"| {n} | {v} | {t:g} | " + " | ".join(cells) + " |")
        out.append("")
    notes = [f"`{r['provider']}` {r['mode']} at N={r['n']}, V={r['v']}, T={r['t']:g}: "
             f"{r['reason']}" for r in result["results"] if r["status"] in ("error", "mismatch")]
    notes += [f"`{name}` not run: {why}" for name, why in _skipped(result)]
    out += [f"- {note}" for note in notes]
    return "\n".join(out).rstrip() + "\n"


def plot(result, png_path):
    """Effective GB/s against V, one line per provider; a panel per mode and N; T = lowest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["results"] if r["status"] == "ok"]
    if not ok:
        return None
    t0 = min(r["t"] for r in ok)
    modes = [m for m in ("fwd+bwd", "fwd") if any(r["mode"] == m for r in ok)]
    ns = sorted({r["n"] for r in ok})
    fig, axes = plt.subplots(len(modes), len(ns), figsize=(5 * len(ns), 3.6 * len(modes)),
                             squeeze=False, sharey=True)
    for i, mode in enumerate(modes):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            for name in result["providers"]:
                pts = sorted((r["v"], r["gbps"]) for r in ok if (r["provider"], r["mode"],
                             r["n"], r["t"]) == (name, mode, n, t0))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.axhline(result["copy_gbps"], color="gray", linestyle="--", linewidth=1,
                       label="device copy")
            ax.set_xscale("log")
            vs = sorted({r["v"] for r in ok})
            ax.set_xticks(vs, [str(v) for v in vs])
            ax.minorticks_off()
            ax.set_title(f"{MODE_TITLES[mode]}, N={n}, T={t0:g}")
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel("effective GB/s")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    labelled = {}   # one legend for all panels: a provider may be missing from some
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=min(5, len(labelled)),
               fontsize=8)
    fig.suptitle(f"{result['provenance']['gpu']}, {result['dtype']}, hrm={result['hrm']}")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labelled) > 5), 1, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def update_readme(readme, text):
    """Replace what lies between the results markers in readme with text."""
    readme = Path(readme)
    body = readme.read_text()
    start, end = body.find(START), body.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    readme.write_text(body[:start + len(START)] + "\n" + text + body[end:])


def latest_per_gpu(results_dir=RESULTS_DIR):
    """The newest JSON of each GPU in results_dir (CPU runs are not published)."""
    newest = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        prov = json.loads(path.read_text())["provenance"]
        if prov["device"] == "cuda" and prov["date"] >= newest.get(prov["gpu"], ("", None))[0]:
            newest[prov["gpu"]] = (prov["date"], path)
    return [path for _, path in sorted(newest.values(), reverse=True)]


def main(argv=None):
    """Plot each JSON and regenerate the README's results section."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="result JSON files (default: newest per GPU)")
    p.add_argument("--readme", default=str(README))
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or latest_per_gpu()
    readme = Path(args.readme)
    sections = []
    for path in paths:
        result = json.loads(path.read_text())
        plot(result, path.with_suffix(".png"))
        sections.append(markdown(result, path, readme.resolve().parent))
    if not sections:
        sections = ["No GPU results yet: see benchmarks/README.md.\n"]
    update_readme(readme, "\n".join(sections))
    print(f"updated {readme} from {len(paths)} file(s)")


if __name__ == "__main__":
    main()
