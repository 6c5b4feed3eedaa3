"""``facecurate report OUT``: one self-contained HTML page to judge a run at a glance.

It reads whatever the stages left in OUT (align.csv/json, the embedding store,
clean.csv/json, identities.csv, merges.csv) and tolerates any of them missing.
Plots are inline SVG drawn here (no plotting dependency); thumbnails are
embedded as ``data:`` URIs. No timestamps: the same OUT gives the same bytes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from facecurate.common import constants as C
from facecurate.common.files import format_float, shown_html, write_text_atomic
from facecurate.common.manifests import AlignRow, CleanRow, EmbeddingRow, IdentityRow, MergeRow, Row, NAN, finite_or
from facecurate.common.workspace import ManifestError, Workspace
from facecurate.review.review import image_data_uri

COLORS = {C.DECISION_KEEP: "#2e7d32", C.DECISION_REVIEW: "#f9a825", C.DECISION_DROP: "#c62828"}
NEUTRAL = "#546e7a"


# ----------------------------------------------------------------------------- reading
def _read(ws: Workspace, name: str, row_type: type[Row], sheet: Sequence[str] = ()) -> tuple[list, str | None]:
    """Typed rows of a CSV of OUT, or ([], note) when it is missing or unreadable
    (``sheet``: see Workspace.read_table)."""
    if not ws.has(name):
        return [], f"{name} not found"
    try:
        return ws.read_table(name, row_type, sheet=sheet)[1], None
    except (OSError, ManifestError) as e:
        return [], f"{name} unreadable: {e}"


def _int(v, default: int = 0) -> int:
    return default if v is None else v


def embedding_info(out: Path) -> dict:
    """Count, dimension and model of the embedding store, as far as it can be told."""
    info: dict = {}
    ws = Workspace(out)
    if ws.has(C.EMBEDDINGS_NPY):
        try:
            a = ws.store_vectors(mmap=True)
            info["count"] = int(a.shape[0])
            info["dim"] = int(a.shape[1]) if a.ndim == 2 else 0
        except (OSError, ValueError) as e:
            info["note"] = f"{C.EMBEDDINGS_NPY} unreadable: {e}"
    elif ws.has(C.EMBEDDINGS_CSV):
        rows, _ = _read(ws, C.EMBEDDINGS_CSV, EmbeddingRow)
        info["count"] = len(rows)
    meta = ws.store_meta()
    for k in ("model", "name", "model_name"):
        v = meta.get(k)
        if isinstance(v, dict):
            v = v.get("name")
        if isinstance(v, str):
            info["model"] = v
            break
    return info


def collect(out_dir: str | Path, top: int = 25) -> dict:
    """Everything the page shows, as plain data (also the CLI's summary source)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory")
    ws = Workspace(out)
    align, align_note = _read(ws, C.ALIGN_MANIFEST, AlignRow)
    clean, clean_note = _read(ws, C.CLEAN_CSV, CleanRow)
    idents, _ = _read(ws, C.IDENTITIES_CSV, IdentityRow, C.SHEET_COLUMNS)
    merges, _ = _read(ws, C.MERGES_CSV, MergeRow)
    if align_note and clean_note:
        raise FileNotFoundError(f"{out}: neither {C.ALIGN_MANIFEST} nor {C.CLEAN_CSV} found: nothing to report")
    d: dict = dict(out=str(out), notes=[n for n in (align_note, clean_note) if n])
    # align
    status = Counter(r.status or "?" for r in align)
    d["align"] = dict(
        files=len({r.source for r in align}), rows=len(align), faces=sum(1 for r in align if r.has_face),
        identities=len({r.identity for r in align if r.identity}),
        without_identity=len({r.source for r in align if not r.identity}),
        crops=sum(1 for r in align if r.aligned),
        status=dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
        meta=ws.align_meta(),
    ) if align else None
    d["embed"] = embedding_info(out)
    # clean
    if clean:
        dec = Counter(r.decision for r in clean)
        reasons = Counter((r.decision, r.reason) for r in clean)
        scores: dict[str, list[float]] = defaultdict(list)
        for r in clean:
            s = finite_or(r.score, NAN)
            if s == s:
                scores[r.decision].append(s)
        manual = [r for r in clean if r.reason == C.REASON_MANUAL]
        cj = ws.clean_meta()
        thr = (cj.get("summary") or {}).get("thresholds") or {}
        d["clean"] = dict(
            faces=len(clean), identities=len({r.identity for r in clean if r.identity}),
            decisions={k: dec.get(k, 0) for k in (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP)},
            other_decisions={k: v for k, v in sorted(dec.items())
                             if k not in (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP)},
            reasons=[(dd, rr, n) for (dd, rr), n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
            scores=scores,
            thresholds={k: thr[k] for k in ("keep", "drop") if isinstance(thr.get(k), (int, float))},
            model=(cj.get("summary") or {}).get("model"),
            manual=len(manual),
            manual_changed=sum(1 for r in manual if r.previous_decision and r.previous_decision != r.decision),
            identities_with_kept=len({r.identity for r in clean if r.decision == C.DECISION_KEEP}),
            quality_lift=_quality_lift((cj.get("summary") or {}).get("quality_lift")),
        )
    else:
        d["clean"] = None
    d["noisiest"] = noisiest(clean, idents, top)
    d["at_risk"] = at_risk(clean, idents)
    d["merges"] = sorted(merges, key=_merge_key)
    d["flags"] = Counter(f for r in idents for f in r.flag_list)
    return d


def _quality_lift(v) -> list[tuple]:
    """clean.json's ``quality_lift`` as (group, faces, inliers, lift) rows; what is not
    a dict of numbers (an older or edited clean.json) is left out."""
    rows = []
    for name, g in (v.items() if isinstance(v, dict) else ()):
        if isinstance(g, dict) and all(isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool)
                                       for k in ("faces", "inliers", "lift")):
            rows.append((str(name), int(g["faces"]), int(g["inliers"]), float(g["lift"])))
    return rows


def _merge_key(r: MergeRow) -> tuple:
    s = finite_or(r.similarity, NAN)
    return (-s if s == s else 9.0, r.a, r.b)


def noisiest(clean: Sequence[CleanRow], idents: Sequence[IdentityRow], top: int) -> list[dict]:
    """The ``top`` identities with the largest share of faces not kept (dropped or in
    review), with their faces; ties by identities.csv's ``noise`` estimate. An
    identity with every face kept (nothing dropped, nothing to review) is not noisy
    and is left out."""
    rows = [r for r in identity_summaries(clean, idents) if r["dropped"] or r["review"]]
    rows.sort(key=lambda r: (-r["not_kept"], -r["noise"], -r["dropped"], r["identity"]))
    return rows[:max(0, top)]


#: identities.csv flags the report lists first: clean kept nothing, or little, of them
AT_RISK_FLAGS = C.AT_RISK_FLAGS


def at_risk(clean: Sequence[CleanRow], idents: Sequence[IdentityRow]) -> list[dict]:
    """The identities flagged lost or weak_majority, lost first, then by name."""
    flagged = {r.identity for r in idents if set(AT_RISK_FLAGS) & set(r.flag_list)}
    rows = [r for r in identity_summaries([c for c in clean if c.identity in flagged],
                                          [i for i in idents if i.identity in flagged])]
    return sorted(rows, key=lambda r: (C.FLAG_LOST not in r["flags"].split(), r["identity"]))


def identity_summaries(clean: Sequence[CleanRow], idents: Sequence[IdentityRow]) -> list[dict]:
    """One dict per identity: counts, noise, flags and its faces."""
    faces: dict[str, list[CleanRow]] = defaultdict(list)
    for r in clean:
        faces[r.identity].append(r)
    rows = []
    info = {r.identity: r for r in idents}
    for ident in sorted((set(faces) | set(info)) - {""}):  # "": files outside any identity folder
        fs = faces.get(ident, [])
        c = Counter(r.decision for r in fs)
        i = info.get(ident) or IdentityRow(identity=ident)
        n = len(fs)
        noise = finite_or(i.noise, NAN)
        if noise != noise:
            noise = (n - c[C.DECISION_KEEP] - c[C.DECISION_REVIEW]) / n if n else 0.0
        rows.append(dict(identity=ident, images=_int(i.images, len({r.source for r in fs})),
                         faces=n or _int(i.faces), kept=c[C.DECISION_KEEP] if fs else _int(i.kept),
                         review=c[C.DECISION_REVIEW] if fs else _int(i.review),
                         dropped=c[C.DECISION_DROP] if fs else _int(i.dropped),
                         noise=noise, flags=i.flags.replace(";", " "), faces_rows=fs))
        r = rows[-1]
        r["not_kept"] = (r["faces"] - r["kept"]) / r["faces"] if r["faces"] else 0.0
    return rows


def _identity_table(out: Path, idents: list[dict]) -> str:
    rows = [[_e(r["identity"]), r["images"], r["faces"], r["kept"], r["review"], r["dropped"],
             format_float(r["not_kept"], 2), format_float(r["noise"], 2), _e(r["flags"]), _thumbs(out, r["faces_rows"])]
            for r in idents]
    return _table(["identity", "images", "faces", "kept", "review", "dropped", "not kept", "noise", "flags", "faces"],
                  rows, "noisy")


# ----------------------------------------------------------------------------- SVG
#: Every text of the page is for a person: HTML-escaped, control and bidirectional
#: characters shown as escapes (files.shown), so no name displays reversed.
_e = shown_html


def _n(v: float) -> str:
    return format_float(float(v), 1)


def svg_hbars(items: Sequence[tuple[str, int, str]], width: int = 520, bar_h: int = 18, label_w: int = 190) -> str:
    """Horizontal bar chart: one (label, count, colour) per bar."""
    if not items:
        return '<p class="none">nothing</p>'
    vmax = max(v for _, v, _ in items) or 1
    plot_w = width - label_w - 70
    h = bar_h * len(items) + 6
    out = [f'<svg class="chart" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img">']
    for i, (label, v, color) in enumerate(items):
        y = 3 + i * bar_h
        w = plot_w * v / vmax
        out.append(f'<text x="{label_w - 6}" y="{_n(y + bar_h * 0.7)}" text-anchor="end">{_e(label)}</text>'
                   f'<rect x="{label_w}" y="{y + 2}" width="{_n(max(w, 1 if v else 0))}" height="{bar_h - 4}" '
                   f'fill="{color}"><title>{_e(label)}: {v}</title></rect>'
                   f'<text x="{_n(label_w + w + 5)}" y="{_n(y + bar_h * 0.7)}">{v}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram(values: Sequence[float], lo: float, hi: float, bins: int) -> list[int]:
    counts = [0] * bins
    span = (hi - lo) or 1.0
    for v in values:
        k = int((v - lo) / span * bins)
        counts[min(max(k, 0), bins - 1)] += 1
    return counts


def score_range(scores: dict[str, list[float]], thresholds: dict) -> tuple[float, float]:
    vals = [v for vs in scores.values() for v in vs] + [float(t) for t in thresholds.values()]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    pad = (hi - lo) * 0.02
    return lo - pad, hi + pad


def svg_histograms(scores: dict[str, list[float]], thresholds: dict, bins: int = 50, width: int = 900,
                   panel_h: int = 110) -> str:
    """Stacked panels (kept, review, dropped) on one x axis: similarity to the
    identity centre, with clean's keep/drop thresholds as dashed lines."""
    lo, hi = score_range(scores, thresholds)
    left, right, top_pad, gap, axis_h = 110, 16, 22, 14, 34
    plot_w = width - left - right
    panels = [(C.DECISION_KEEP, "kept"), (C.DECISION_REVIEW, "review"), (C.DECISION_DROP, "dropped")]
    h = top_pad + len(panels) * (panel_h + gap) + axis_h
    x = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    out = [f'<svg class="chart" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img">']
    bw = plot_w / bins
    for pi, (key, label) in enumerate(panels):
        vals = scores.get(key, [])
        counts = histogram(vals, lo, hi, bins)
        cmax = max(counts) or 1
        y0 = top_pad + pi * (panel_h + gap)
        base = y0 + panel_h
        out.append(f'<text x="{left - 8}" y="{y0 + 16}" text-anchor="end" class="pl">{label}</text>'
                   f'<text x="{left - 8}" y="{y0 + 32}" text-anchor="end" class="sub">n={len(vals)}</text>'
                   f'<text x="{left - 8}" y="{y0 + 48}" text-anchor="end" class="sub">max bin {max(counts)}</text>'
                   f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#999"/>')
        for b, cnt in enumerate(counts):
            if not cnt:
                continue
            bh = (panel_h - 4) * cnt / cmax
            b_lo = lo + (hi - lo) * b / bins
            out.append(f'<rect x="{_n(left + b * bw + 0.5)}" y="{_n(base - bh)}" width="{_n(max(bw - 1, 1))}" '
                       f'height="{_n(bh)}" fill="{COLORS[key]}"><title>{format_float(b_lo, 3)}..'
                       f'{format_float(b_lo + (hi - lo) / bins, 3)}: {cnt}</title></rect>')
    y_end = top_pad + len(panels) * (panel_h + gap) - gap
    for name, t in sorted(thresholds.items()):
        tx = x(float(t))
        out.append(f'<line x1="{_n(tx)}" y1="{top_pad}" x2="{_n(tx)}" y2="{y_end}" stroke="#333" '
                   f'stroke-dasharray="4 3"/><text x="{_n(tx)}" y="{top_pad - 8}" text-anchor="middle" class="sub">'
                   f'{_e(name)} {format_float(float(t), 3)}</text>')
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        out.append(f'<line x1="{_n(x(v))}" y1="{y_end}" x2="{_n(x(v))}" y2="{y_end + 4}" stroke="#999"/>'
                   f'<text x="{_n(x(v))}" y="{y_end + 16}" text-anchor="middle" class="sub">'
                   f'{format_float(v, 3)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{h - 4}" text-anchor="middle" class="sub">'
               f'score: cosine similarity to the identity centre, corrected by clean (can pass 1.0)'
               f'</text></svg>')
    return "".join(out)


# ----------------------------------------------------------------------------- page
def _thumbs(out: Path, faces: Sequence[CleanRow], n_keep: int = 4, n_bad: int = 8) -> str:
    def key(r):
        s = finite_or(r.score, NAN)
        return s if s == s else -9.0
    kept = sorted((r for r in faces if r.decision == C.DECISION_KEEP), key=key, reverse=True)[:n_keep]
    bad = sorted((r for r in faces if r.decision != C.DECISION_KEEP), key=key)[:n_bad]
    cells = []
    for r in [*kept, *bad]:
        uri = image_data_uri(out / r.aligned) if r.aligned else None
        dcol = COLORS.get(r.decision, NEUTRAL)
        tip = f"{r.aligned}: {r.decision} {r.reason} {format_float(r.score)}"
        if uri:
            cells.append(f'<img src="{uri}" loading="lazy" width="48" height="48" style="border-color:{dcol}" '
                         f'title="{_e(tip)}" alt="{_e(r.reason)}">')
        else:
            cells.append(f'<span class="noimg" style="border-color:{dcol}" title="{_e(tip)}">?</span>')
    return "".join(cells)


def _table(head: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def render_report(out: Path, d: dict) -> str:
    a, cl, emb = d["align"], d["clean"], d["embed"]
    parts = []
    # headline
    cards = []
    if a:
        cards.append(("source files", a["files"]))
        cards.append(("identities", a["identities"]))
        cards.append(("face crops", a["crops"]))
    if emb.get("count") is not None:
        cards.append(("embeddings", emb["count"]))
    if cl:
        k, r_, dr = (cl["decisions"][x] for x in (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP))
        cards += [("kept", f'{k} <small>{_pct(k, cl["faces"])}</small>'),
                  ("to review", f'{r_} <small>{_pct(r_, cl["faces"])}</small>'),
                  ("dropped", f'{dr} <small>{_pct(dr, cl["faces"])}</small>'),
                  ("identities with kept faces", cl["identities_with_kept"])]
        if cl["manual"]:
            cards.append(("decided by a person", f'{cl["manual"]} <small>{cl["manual_changed"]} changed</small>'))
    parts.append('<div class="cards">' + "".join(
        f'<div class="stat"><div class="v">{v}</div><div class="k">{_e(k)}</div></div>' for k, v in cards) + "</div>")
    if d["notes"]:
        parts.append('<p class="note">' + "; ".join(_e(n) for n in d["notes"]) + "</p>")
    if d["at_risk"]:
        parts.append(f'<h2>Identities lost or kept thin <small>{len(d["at_risk"])} flagged lost (nothing kept) or '
                     f'weak_majority (few of their photos kept) in identities.csv; their best faces are first in '
                     f'review</small></h2>' + _identity_table(out, d["at_risk"]))
    # stages
    funnel = []
    if a:
        funnel.append(("align: files", a["files"], NEUTRAL))
        funnel.append(("align: faces found", a["faces"], NEUTRAL))
        funnel.append(("align: crops", a["crops"], NEUTRAL))
        funnel.append(("align.csv: rows", a["rows"], NEUTRAL))
    if emb.get("count") is not None:
        funnel.append(("embed: vectors", emb["count"], NEUTRAL))
    if cl:
        funnel.append(("clean: faces", cl["faces"], NEUTRAL))
        for k in (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP):
            funnel.append((f"clean: {k}", cl["decisions"][k], COLORS[k]))
    stage_html = [f'<div><h3>Per stage</h3>{svg_hbars(funnel)}{_FUNNEL_NOTE if a else ""}</div>']
    if a:
        st = [(s, n, COLORS[C.DECISION_KEEP] if s == C.STATUS_OK else COLORS[C.DECISION_DROP])
              for s, n in a["status"].items()]
        detector = (a["meta"].get("settings") or {}).get("detector") or a["meta"].get("detector") or ""
        stage_html.append(f'<div><h3>align status <small>(rows of align.csv{", detector " + _e(detector) if detector else ""})'
                          f'</small></h3>{svg_hbars(st)}</div>')
    if cl:
        rs = [(f"{dd}: {rr or '-'}", n, COLORS.get(dd, NEUTRAL)) for dd, rr, n in cl["reasons"]]
        stage_html.append(f'<div><h3>clean decisions by reason</h3>{svg_hbars(rs, width=560, label_w=230)}</div>')
    parts.append('<h2>Counts</h2><div class="row">' + "".join(stage_html) + "</div>")
    if emb:
        bits = [f"{k}: {_e(v)}" for k, v in sorted(emb.items())]
        parts.append('<p class="sub">embedding store: ' + ", ".join(bits) + "</p>")
    # histograms
    if cl:
        model = f" ({_e(cl['model'])})" if cl.get("model") else ""
        parts.append(f'<h2>Similarity to the identity centre{model} <small>clean\'s score: the cosine similarity, '
                     f'corrected, so it can pass 1.0</small></h2>'
                     + svg_histograms(cl["scores"], cl["thresholds"])
                     + '<p class="sub">Kept faces should sit to the right of the keep line, dropped ones mostly to '
                       'the left; bystanders and duplicates can be dropped at any score (see reasons).</p>')
        if cl.get("quality_lift"):
            bits = [f"{_e(n)}: {f} faces ({i} inliers), +{lift:.4f}" for n, f, i, lift in cl["quality_lift"]]
            parts.append('<p class="sub">Quality lifts, measured on this dataset (the gap between good and poor '
                         'inliers; 0 with fewer than 20 poor inliers): ' + "; ".join(bits) + "</p>")
    # noisiest
    if d["noisiest"]:
        parts.append(f'<h2>Noisiest identities <small>top {len(d["noisiest"])} by share of faces not kept (dropped '
                     f'or in review); noise = share of photos with no face kept or in review; '
                     f'thumbnails: most central kept, then lowest-scoring others (border = decision)</small></h2>'
                     + _identity_table(out, d["noisiest"]))
    if d["flags"]:
        parts.append("<h2>Identity flags</h2>" + svg_hbars([(k, v, NEUTRAL) for k, v in sorted(
            d["flags"].items(), key=lambda kv: (-kv[1], kv[0]))]))
    if d["merges"]:
        mr = [[_e(m.a), _e(m.b), _e(format_float(m.similarity))] for m in d["merges"][:50]]
        parts.append(f'<h2>Merge candidates <small>{len(d["merges"])} pair(s) of identities that look like one '
                     f'person (merges.csv){"; first 50" if len(d["merges"]) > 50 else ""}</small></h2>'
                     + _table(["a", "b", "similarity"], mr))
    raw = a["meta"].get("raw") if a else None
    sub = f"OUT = {_e(out.resolve())}" + (f" &middot; RAW = {_e(raw)}" if raw else "")
    return _PAGE.format(css=_CSS, title=_e(out.name or str(out)), sub=sub, body="\n".join(parts))


def write_report(out_dir: str | Path, *, top: int = 25, output: str | Path | None = None) -> dict:
    """Write OUT/report.html (or ``output``); returns a summary."""
    out = Path(out_dir)
    d = collect(out, top)
    page = render_report(out, d)
    dest = Path(output) if output else out / C.REPORT_HTML
    write_text_atomic(dest, page)
    cl = d["clean"]
    return dict(
        html=str(dest), bytes=len(page.encode("utf-8")),
        files=d["align"]["files"] if d["align"] else None,
        crops=d["align"]["crops"] if d["align"] else None,
        embeddings=d["embed"].get("count"),
        decisions=cl["decisions"] if cl else None,
        manual=cl["manual"] if cl else 0,
        noisiest=[r["identity"] for r in d["noisiest"][:5]],
        at_risk=[r["identity"] for r in d["at_risk"]],
        merge_candidates=len(d["merges"]), notes=d["notes"],
    )


#: What the align bars count (align's own summary says "faces" for the first).
_FUNNEL_NOTE = ('<p class="sub">faces found: faces the detector found (align\'s "faces"); crops: faces '
                'cropped (status ok); align.csv rows: one per face found plus one per file without a face '
                'or crop (no face, unreadable, ...)</p>')

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:10px 18px;color:#222;background:#fafafa}
h1{margin:4px 0 0;font-size:22px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:6px 0}small,.sub{color:#666;font-weight:400;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.stat{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;padding:8px 14px;min-width:110px}
.stat .v{font-size:22px;font-weight:600}.stat .k{color:#666;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:26px}
.chart{font-size:12px;background:#fff}.chart .pl{font-size:13px;font-weight:600}.chart .sub{fill:#666;font-size:11px}
table{border-collapse:collapse;background:#fff}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;
 vertical-align:middle}th{background:#eceff1}
.noisy img,.noisy .noimg{width:48px;height:48px;border:3px solid;margin:1px;border-radius:3px;vertical-align:middle}
.noimg{display:inline-block;text-align:center;line-height:42px;background:#ddd}
.note{color:#a15c00}.none{color:#888}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>facecurate report: {title}</title>
<style>{css}</style></head>
<body>
<h1>facecurate report</h1>
<div class="sub">{sub}</div>
{body}
</body></html>
"""
