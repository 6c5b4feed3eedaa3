"""The human half of ``clean``: a self-contained HTML contact sheet (plus a CSV)
of the faces ``clean`` could not decide, and the merge of a person's keep/drop
decisions back into ``OUT/clean.csv``.

The page needs no server and no network: the crops are embedded as ``data:`` URIs
(attached to ``<img>`` elements only when a card comes near the viewport, so sheets
with thousands of faces still open), CSS and JavaScript are inline, and "Export
decisions" hands the browser a CSV (``aligned,identity,decision``) built from a Blob.
``apply_decisions`` reads that file, or ``review.csv`` filled in with a spreadsheet.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from facecurate.common import constants as C
from facecurate.common.files import UNSAFE_CHARS, format_float, shown, shown_html, unsheet_cell, write_text_atomic
from facecurate.common.manifests import CleanRow, IdentityRow, ReviewRow
from facecurate.common.workspace import ManifestError, MissingFile, Workspace
from facecurate.common.constants import IDX_NAME
from facecurate.common.imageio import image_kind
from facecurate.common.recdata import KeyedRecords, rec_key

#: reason written by ``apply_decisions``
REASON_MANUAL = C.REASON_MANUAL
#: decisions a person may give
HUMAN_DECISIONS = (C.DECISION_KEEP, C.DECISION_DROP)
#: columns of the page's export (a subset of REVIEW_COLUMNS; apply reads either)
EXPORT_COLUMNS = ("aligned", "identity", "decision")
DEFAULT_REFERENCES = 6
#: review faces per HTML page (pages never split an identity)
DEFAULT_PAGE_SIZE = 2000

_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
         ".bmp": "image/bmp"}


# ----------------------------------------------------------------------------- reading
#: the columns of clean.csv review needs
NEED_COLUMNS = ("aligned", "identity", "decision", "reason", "score")


def clean_rows(out_dir: str | Path) -> Callable[[], Iterator[CleanRow]]:
    """A function that streams OUT/clean.csv's typed rows (each call reads the file
    again from the start); the errors of :func:`load_clean`."""
    return Workspace(out_dir).stream_clean(NEED_COLUMNS)


def load_clean(out_dir: str | Path) -> tuple[tuple[str, ...], list[CleanRow]]:
    """Layout (columns) and rows of OUT/clean.csv, with a clear error when it is
    missing, lacks the columns review needs or holds a malformed row."""
    return Workspace(out_dir).clean_table(NEED_COLUMNS)


def _score_key(r: CleanRow) -> tuple:
    s = r.score
    return (0 if s == s else 1, -s if s == s else 0.0, r.aligned)


def review_key(r: CleanRow) -> tuple:
    """Order of review faces, clean's budget's: identity candidates, then occluded faces,
    then the rest (look-alikes, the band and reasons REVIEW_PRIORITY does not name), each
    by score, highest first."""
    return (C.REVIEW_PRIORITY.get(r.reason, C.REVIEW_PRIORITY[C.REASON_UNCERTAIN]), *_score_key(r))


def at_risk_flags(out_dir: str | Path) -> tuple[dict[str, str], str]:
    """{identity: its first flag of constants.AT_RISK_FLAGS} from OUT/identities.csv, and
    a note ('' when read; none flagged when it is missing or unreadable)."""
    try:
        _, rows = Workspace(out_dir).stream_table(C.IDENTITIES_CSV, IdentityRow, ("identity",), C.SHEET_COLUMNS)
        return {r.identity: f for r in rows()
                if (f := next((x for x in C.AT_RISK_FLAGS if x in r.flag_list), ""))}, ""
    except MissingFile:
        return {}, f"{C.IDENTITIES_CSV} not found: no identity shown as lost or weak_majority"
    except (OSError, ManifestError) as e:
        return {}, f"{C.IDENTITIES_CSV} unreadable, no identity shown as lost or weak_majority: {e}"


def _cluster(r: CleanRow) -> int:
    """Chinese-whispers cluster for a card's mark: dominant (0), none (1 << 30)."""
    c = r.cluster
    return c if c is not None and c >= 0 else 1 << 30


def image_data_uri(path: Path, records=None) -> str | None:
    """``data:`` URI of an image file, or None when it cannot be read. ``OUT/rec:<key>``
    (a record of the packed dataset in OUT) is read from OUT/train.rec, through
    ``records`` (a :class:`facecurate.common.recdata.KeyedRecords` of the keys a page shows)
    when given, else through the whole .idx."""
    key = rec_key(path.name)
    if key is not None:
        if records is None:
            try:
                records = _records(str(path.parent), (path.parent / IDX_NAME).stat().st_mtime_ns)
            except OSError:
                return None
        data = records.image(key)
        if data is None:
            return None
        mime = _MIME.get("." + (image_kind(data) or "jpg"), "application/octet-stream")
        return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    try:
        data = path.read_bytes()
    except OSError:
        return None
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _sheet_records(out_dir: Path, sections: Sequence[Section]):
    """For clean.csv of a packed dataset: the records the sheet shows, their offsets
    read in one streamed pass over OUT/train.idx (memory bounded by the sheet, not by
    the rec); None for crops in folders."""
    keys = [k for s in sections for r in (*s.review, *s.references)
            if (k := rec_key(r.aligned)) is not None]
    if not keys or not (out_dir / IDX_NAME).exists():
        return None
    return KeyedRecords(out_dir, keys=keys)


@functools.lru_cache(maxsize=2)
def _records(folder: str, _stamp: int):
    """The records of ``folder``/train.rec by key (its .idx read once while unchanged)."""
    return KeyedRecords(folder)


# ----------------------------------------------------------------------------- the sheet
@dataclass
class Section:
    identity: str
    references: list[CleanRow] = field(default_factory=list)  # most central kept faces
    review: list[CleanRow] = field(default_factory=list)
    kept: int = 0
    dropped: int = 0
    flag: str = ""  # lost / weak_majority (identities.csv), else ""

    def key(self) -> tuple:
        """Page order: lost identities, then weak_majority ones, then the rest; in each,
        by the section's first review face (:func:`review_key`), then by name."""
        tier = C.AT_RISK_FLAGS.index(self.flag) if self.flag in C.AT_RISK_FLAGS else len(C.AT_RISK_FLAGS)
        return (tier,
                review_key(self.review[0]) if self.review else (), self.identity)


def build_sections(rows: Sequence[CleanRow], references: int = DEFAULT_REFERENCES,
                   flags: Mapping[str, str] | None = None) -> list[Section]:
    """One section per identity that has review faces, in the order of clean's review
    budget (:meth:`Section.key`; ``flags``: :func:`at_risk_flags`); review faces by
    :func:`review_key`, references the ``references`` highest-scoring kept faces."""
    return stream_sections(lambda: iter(rows), references, flags)[0]


def stream_sections(rows: Callable[[], Iterable[CleanRow]], references: int = DEFAULT_REFERENCES,
                    flags: Mapping[str, str] | None = None) -> tuple[list[Section], int]:
    """:func:`build_sections` over rows read twice from ``rows()`` (e.g. streamed from
    clean.csv), holding only what the sheet shows: the review faces, and for their
    identities the counts and the ``references`` best kept faces. Returns (sections,
    rows read)."""
    by_id: dict[str, Section] = {}
    n = 0
    for r in rows():  # pass 1: the review faces (at most clean's review budget)
        n += 1
        if r.decision == C.DECISION_REVIEW and r.aligned:
            ident = r.identity
            by_id.setdefault(ident, Section(ident)).review.append(r)
    refs = max(0, references)
    kept: dict[str, list[CleanRow]] = defaultdict(list)
    for r in rows():  # pass 2: counts and references of those identities only
        s = by_id.get(r.identity)
        if s is None:
            continue
        d = r.decision
        if d == C.DECISION_KEEP:
            s.kept += 1
            best = kept[s.identity]
            best.append(r)
            if len(best) > 2 * refs + 16:  # keep the best few (the key is a total order)
                best.sort(key=_score_key)
                del best[refs:]
        elif d == C.DECISION_DROP:
            s.dropped += 1
    for ident, s in by_id.items():
        s.review.sort(key=review_key)
        s.references = sorted(kept.get(ident, []), key=_score_key)[:refs]
        s.flag = (flags or {}).get(ident, "")
    return sorted(by_id.values(), key=Section.key), n


def review_table(sections: Sequence[Section]) -> list[ReviewRow]:
    """review.csv rows in page order, decision blank for a person to fill in."""
    return [ReviewRow.of(r) for s in sections for r in s.review]


def paginate(sections: Sequence[Section], page_size: int) -> list[list[Section]]:
    """Split sections into pages of at most ``page_size`` review faces, never
    splitting an identity (a larger identity gets a page of its own)."""
    pages: list[list[Section]] = []
    cur: list[Section] = []
    n = 0
    for s in sections:
        if cur and page_size > 0 and n + len(s.review) > page_size:
            pages.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += len(s.review)
    if cur or not pages:
        pages.append(cur)
    return pages


def page_name(k: int, html_name: str = C.REVIEW_HTML) -> str:
    """review.html for page 1, review-2.html, review-3.html, ... after it."""
    if k == 1:
        return html_name
    stem, dot, ext = html_name.rpartition(".")
    return f"{stem}-{k}.{ext}" if dot else f"{html_name}-{k}"


def write_review(out_dir: str | Path, *, references: int = DEFAULT_REFERENCES, page_size: int = DEFAULT_PAGE_SIZE,
                 html_name: str = C.REVIEW_HTML, csv_name: str = C.REVIEW_CSV) -> dict:
    """Write OUT/review.html (plus review-2.html, ... when there are more than
    ``page_size`` review faces) and OUT/review.csv for the faces clean.csv marks
    ``review``. Returns a summary."""
    out_dir = Path(out_dir)
    ws = Workspace(out_dir)
    flags, flags_note = at_risk_flags(out_dir)
    sections, n_rows = stream_sections(clean_rows(out_dir), references, flags)
    table = review_table(sections)
    missing: list[str] = []
    pages = paginate(sections, page_size)
    raw = ws.raw_dir()
    records = _sheet_records(out_dir, sections)
    names = [page_name(k, html_name) for k in range(1, len(pages) + 1)]
    sizes = []
    for k, secs in enumerate(pages, 1):
        page = render_review_html(out_dir, secs, missing, page=k, pages=names,
                                  totals=(len(table), len(sections)), raw=raw, records=records)
        write_text_atomic(out_dir / names[k - 1], page)
        sizes.append(len(page.encode("utf-8")))
    # pages of an earlier, longer sheet would be stale: remove them
    k = len(pages) + 1
    while (out_dir / page_name(k, html_name)).exists():
        (out_dir / page_name(k, html_name)).unlink()
        k += 1
    ws.write_review_table(table, csv_name)
    reasons: dict[str, int] = defaultdict(int)
    for r in table:
        reasons[r.reason] += 1
    return dict(
        review_faces=len(table), identities=len(sections),
        at_risk=sum(1 for s in sections if s.flag), identities_note=flags_note,
        faces=n_rows, reasons=dict(sorted(reasons.items())),
        missing_crops=len(missing), missing_examples=missing[:5],
        html=str(out_dir / names[0]), pages=len(pages), csv=str(out_dir / csv_name),
        html_bytes=sum(sizes),
    )


#: Characters an attribute holds as character references: a carriage return (HTML
#: turns a raw one into a newline) and the separators and bidirectional controls
#: (so that the page's source shows none raw either).
_ATTR_REFS = {c: f"&#x{c:x};" for c in (0x0D, *(c for c in UNSAFE_CHARS if c > 0xFF))}


def _esc(s) -> str:
    """``s`` for an attribute the page's script reads back exactly."""
    return html.escape(str(s), quote=True).translate(_ATTR_REFS)


#: ``s`` as text a person reads: escaped for HTML, and control and bidirectional
#: characters shown as escapes, so no name displays reversed or split.
_show = shown_html


#: Why a card's reason is marked: the review reasons clean puts ahead of the band.
REASON_HELP = {C.REASON_CANDIDATE: "one of the best faces of an identity clean kept nothing or little of: first",
               C.REASON_OCCLUDED: "part of the face is covered (flat patches): ahead of the band"}
#: What an identity's flag on the page means (identities.csv's flags; the report's first table).
FLAG_HELP = {C.FLAG_LOST: "clean kept none of its photos", C.FLAG_WEAK: "clean kept few of its photos"}


def _reason(reason: str) -> str:
    """A card's reason; the ones ahead of the band (REASON_HELP) marked."""
    why = REASON_HELP.get(reason)
    return (f'<span class="reason first" title="{_esc(why)}">&#9650; {_esc(reason)}</span>' if why else
            f'<span class="reason">{_esc(reason)}</span>')


def _flag(flag: str) -> str:
    return f' <span class="flag" title="{_esc(FLAG_HELP.get(flag, ""))}">{_esc(flag)}</span>' if flag else ""


def _card(out_dir: Path, r: CleanRow, kind: str, missing: list[str], index: int | None = None,
          raw: Path | None = None, records=None) -> str:
    aligned = r.aligned
    uri = image_data_uri(out_dir / aligned, records) if aligned else None
    score = r.score
    score_txt = format_float(score, 3) if score == score else "n/a"
    title = f"{r.source} face {'' if r.face is None else r.face}"
    if uri is None:
        missing.append(aligned)
        img = f'<div class="noimg" title="{_show(aligned)}">missing crop</div>'
    else:
        img = f'<img alt="{_show(aligned)}" data-src="{uri}" width="112" height="112">'
    c = _cluster(r)
    clus = (f' <span class="cl" title="{CLUSTER_HELP}">cluster {c}</span>' if 0 < c < (1 << 30) else "")
    link = ""
    if raw is not None and r.source:
        link = (f' <a class="src" href="{_esc((raw / r.source).as_uri())}" target="_blank" rel="noopener" '
                f'tabindex="-1" title="open the source photo">photo</a>')
    if kind == "ref":
        return (f'<figure class="ref" title="{_show(title)}">{img}'
                f'<figcaption>{score_txt}</figcaption></figure>')
    return (f'<figure class="card" tabindex="0" data-i="{index}" data-aligned="{_esc(aligned)}" '
            f'data-identity="{_esc(r.identity)}" title="{_show(title)}">{img}'
            f'<figcaption><span class="score">{score_txt}</span> '
            f'{_reason(r.reason)}{clus}{link}</figcaption>'
            f'<div class="btns"><button type="button" class="keep" data-d="keep">keep</button>'
            f'<button type="button" class="drop" data-d="drop">drop</button></div></figure>')


def render_review_html(out_dir: Path, sections: Sequence[Section], missing: list[str] | None = None, *,
                       page: int = 1, pages: Sequence[str] = (C.REVIEW_HTML,),
                       totals: tuple[int, int] | None = None, raw: Path | None = None, records=None) -> str:
    """One page as a string (deterministic: no timestamps, stable order). ``records``:
    see :func:`image_data_uri`."""
    if missing is None:
        missing = []
    total = sum(len(s.review) for s in sections)
    key = hashlib.sha256("\n".join(r.aligned for s in sections for r in s.review).encode()).hexdigest()[:16]
    parts = []
    idx = 0
    nav = []
    for si, s in enumerate(sections):
        sid = f"s{si}"
        nav.append(f'<a href="#{sid}">{_show(s.identity)} <b>{len(s.review)}</b>{_flag(s.flag)}</a>')
        refs = "".join(_card(out_dir, r, "ref", missing, records=records) for r in s.references) or \
            '<p class="none">no kept faces yet</p>'
        cards = []
        for r in s.review:
            cards.append(_card(out_dir, r, "review", missing, idx, raw, records))
            idx += 1
        parts.append(
            f'<section id="{sid}" data-identity="{_esc(s.identity)}">'
            f'<h2>{_show(s.identity)}{_flag(s.flag)} <small>{len(s.review)} to review &middot; {s.kept} kept &middot; '
            f'{s.dropped} dropped</small>'
            f'<span class="bulk"><button type="button" data-all="keep">keep all</button>'
            f'<button type="button" data-all="drop">drop all</button>'
            f'<button type="button" data-all="">clear</button></span></h2>'
            f'<div class="row"><div class="refs"><span class="lbl">reference: most central kept</span>{refs}'
            f'</div><div class="cards">{"".join(cards)}</div></div></section>')
    body = "\n".join(parts) if parts else _EMPTY
    download = "review-decisions.csv" if len(pages) == 1 else f"review-decisions-{page}.csv"
    meta = json.dumps(dict(key=key, total=total, download=download))
    all_faces, all_ids = totals or (total, len(sections))
    pager = ""
    if len(pages) > 1:
        links = " ".join(f"<b>{k}</b>" if k == page else f'<a href="{_esc(nm)}">{k}</a>'
                         for k, nm in enumerate(pages, 1))
        pager = (f'<span class="pager">page {page} of {len(pages)} ({all_faces} faces in {all_ids} identities '
                 f'in all; export each page): {links}</span>')
    controls = _CONTROLS.format(pager=pager, download=download) if parts else ""
    return _PAGE.format(css=_CSS, js=_JS if parts else "", meta=meta, total=total, identities=len(sections),
                        nav="".join(nav), body=body, controls=controls)


#: What a card's "cluster N" means (its tooltip and the page's help line).
CLUSTER_HELP = ("clean groups an identity's faces by similarity (Chinese whispers); cluster 0, the largest, "
                "is the identity itself and is not marked; cluster 1, 2, ... are smaller groups: "
                "often another person")

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.35 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;z-index:2;background:#263238;color:#fff;padding:8px 14px;display:flex;
 flex-wrap:wrap;gap:12px;align-items:center}
header h1{font-size:17px;margin:0 8px 0 0}
header button{font:inherit;padding:4px 12px;border-radius:4px;border:0;cursor:pointer}
#export{background:#ffca28;font-weight:600}
#progress{font-variant-numeric:tabular-nums}
.help{font-size:12px;opacity:.8}
nav{padding:6px 14px;background:#eceff1;font-size:12px;max-height:6em;overflow:auto}
nav a{margin-right:10px;color:#37474f;text-decoration:none;white-space:nowrap}
section{scroll-margin-top:100px;background:#fff;margin:10px 14px;padding:8px 12px;border-radius:6px;box-shadow:0 1px 2px #0002}
h2{font-size:15px;margin:2px 0 8px;display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
h2 small{font-weight:400;color:#666}
.bulk{margin-left:auto}.bulk button{font-size:12px;margin-left:4px}
.row{display:flex;gap:14px;align-items:flex-start}
.refs,.cards{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;align-content:flex-start}
.refs{flex:0 0 282px;padding-right:12px;border-right:1px dashed #ccc}
.cards{flex:1 1 300px}
.lbl{flex-basis:100%;font-size:11px;color:#888}
figure{margin:0;text-align:center;font-size:12px}
figure img,.noimg{width:112px;height:112px;display:block;background:#ddd}
.noimg{line-height:112px;color:#a00}
.ref img{width:80px;height:80px;opacity:.95}.ref figcaption{color:#2e7d32}
.card{border:3px solid #bbb;border-radius:5px;padding:3px;background:#fafafa;width:124px}
.card:focus{outline:3px solid #42a5f5}
.card.keep{border-color:#2e7d32;background:#e8f5e9}
.card.drop{border-color:#c62828;background:#ffebee}
.card.drop img{opacity:.45}
.reason{color:#555}.reason.first{color:#bf360c;font-weight:600}
.flag{font-size:11px;font-weight:600;color:#fff;background:#bf360c;border-radius:3px;padding:0 4px}
.src{font-size:11px;color:#1565c0}.cl{font-size:11px;color:#6a1b9a}
.btns{display:flex;gap:3px;margin-top:3px}
.btns button{flex:1;font:inherit;padding:2px 0;border:1px solid #999;border-radius:3px;background:#fff;cursor:pointer}
.card.keep button.keep{background:#2e7d32;color:#fff;border-color:#2e7d32}
.card.drop button.drop{background:#c62828;color:#fff;border-color:#c62828}
body.hide-decided .card.keep,body.hide-decided .card.drop{display:none}
.none{color:#666;margin:0;font-size:12px}
section.empty{max-width:640px;margin:48px auto;padding:24px 32px;text-align:center;color:#444}
section.empty h2{display:block;font-size:20px;margin:0 0 12px}
.pager a{color:#ffca28}
"""

_JS = r"""
(function(){
"use strict";
var META = JSON.parse(document.getElementById('fc-meta').textContent);
var STORE = 'facecurate-review-' + META.key;
var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
var state = {};
try { state = JSON.parse(localStorage.getItem(STORE) || '{}') || {}; } catch (e) { state = {}; }

function show(card){
  var d = state[card.dataset.aligned] || '';
  card.classList.toggle('keep', d === 'keep');
  card.classList.toggle('drop', d === 'drop');
  card.setAttribute('aria-label', card.dataset.aligned + (d ? ' ' + d : ' undecided'));
}
function count(){
  var n = 0, k;
  for (k in state) if (state[k]) n++;
  document.getElementById('progress').textContent = n + ' / ' + META.total + ' decided';
}
function save(){ try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) {} }
function decide(card, d, toggle){
  var a = card.dataset.aligned;
  if (toggle && state[a] === d) d = '';
  if (d) state[a] = d; else delete state[a];
  show(card); count(); save();
}
/* every field quoted; a name that a spreadsheet would run as a formula gets a leading
   quote, as in review.csv (facecurate.files.sheet_cell); review apply takes it off */
function sheetCell(s){ s = String(s); return /^[=+\-@\t\r]/.test(s) || /^'[=+\-@\t\r']/.test(s) ? "'" + s : s; }
function csvCell(s){ return '"' + String(s).replace(/"/g, '""') + '"'; }
function decisionsCSV(){
  var lines = ['aligned,identity,decision'];
  cards.forEach(function(c){
    var d = state[c.dataset.aligned];
    if (d) lines.push([sheetCell(c.dataset.aligned), sheetCell(c.dataset.identity), d].map(csvCell).join(','));
  });
  return lines.join('\n') + '\n';
}
window.facecurateDecisionsCSV = decisionsCSV;
function exportCSV(){
  var text = decisionsCSV();
  var blob = new Blob([text], {type: 'text/csv'});
  var a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = META.download;
  document.body.appendChild(a); a.click();
  setTimeout(function(){ URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  document.body.dataset.exported = text;
}
document.getElementById('export').addEventListener('click', exportCSV);
document.getElementById('hide').addEventListener('change', function(e){
  document.body.classList.toggle('hide-decided', e.target.checked);
});
document.addEventListener('click', function(e){
  var b = e.target.closest('button');
  if (!b) return;
  if (b.dataset.d !== undefined) { decide(b.closest('.card'), b.dataset.d, true); return; }
  if (b.dataset.all !== undefined) {
    b.closest('section').querySelectorAll('.card').forEach(function(c){
      if (!b.dataset.all || !state[c.dataset.aligned]) decide(c, b.dataset.all, false);
    });
  }
});
document.addEventListener('keydown', function(e){
  var c = document.activeElement;
  if (!c || !c.classList || !c.classList.contains('card') || e.ctrlKey || e.metaKey || e.altKey) return;
  var i = +c.dataset.i, next = null, k = e.key.toLowerCase();
  if (k === 'k' || k === 'd') { decide(c, k === 'k' ? 'keep' : 'drop', false); next = cards[i + 1]; }
  else if (k === 'x' || k === 'backspace') { decide(c, '', false); }
  else if (k === 'arrowright' || k === 'j') { next = cards[i + 1]; }
  else if (k === 'arrowleft' || k === 'h') { next = cards[i - 1]; }
  else return;
  e.preventDefault();
  if (next) next.focus();
});
/* lazy images: data URIs sit in data-src until the card nears the viewport */
function load(img){ if (img.dataset.src) { img.src = img.dataset.src; img.removeAttribute('data-src'); } }
var imgs = document.querySelectorAll('img[data-src]');
if ('IntersectionObserver' in window) {
  var io = new IntersectionObserver(function(entries){
    entries.forEach(function(en){ if (en.isIntersecting) { load(en.target); io.unobserve(en.target); } });
  }, {rootMargin: '800px 0px'});
  imgs.forEach(function(img){ io.observe(img); });
} else { imgs.forEach(load); }
cards.forEach(show); count();
if (cards.length) cards[0].focus({preventScroll: true});
})();
"""

_CONTROLS = """<span id="progress"></span>
<button type="button" id="export">Export decisions</button>
<label><input type="checkbox" id="hide"> hide decided</label>
{pager}
<span class="help">order: identities flagged lost, then weak_majority (report.html's first table), then
the rest; faces marked &#9650; (identity_candidate, then occluded) first, then by score, highest first
&middot; click keep/drop (again to undo) &middot; keyboard on a focused card: k keep, d drop,
x clear, &larr;/&rarr; move &middot; "cluster N" on a card: a smaller group of similar faces than the
identity's own (often another person) &middot; then <code>facecurate review apply OUT {download}</code></span>"""

#: The page when clean left no face to review: a centred notice, no export.
_EMPTY = ('<section class="empty"><h2>Nothing to review</h2>'
          '<p>clean decided every face of this run itself: none lies between its drop and keep '
          'thresholds, so there is nothing to export or apply. <code>facecurate pack</code> uses '
          'clean.csv as it is.</p>'
          '<p>To look at more faces, rerun <code>facecurate clean OUT</code> with a wider band (a lower '
          '<code>--drop</code> or a higher <code>--keep</code>), then <code>facecurate review OUT</code>; '
          '<code>facecurate report OUT</code> shows every decision.</p></section>')

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>facecurate review: {total} faces</title>
<style>{css}</style></head>
<body>
<header><h1>facecurate review</h1>
<span>{total} faces in {identities} identities</span>
{controls}
</header>
<nav>{nav}</nav>
<main>
{body}
</main>
<script type="application/json" id="fc-meta">{meta}</script>
<script>{js}</script>
</body></html>
"""


# ----------------------------------------------------------------------------- apply
@dataclass
class Problem:
    line: int
    aligned: str
    message: str
    file: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        if self.file:
            where = f"{self.file} {where}"
        a = shown(self.aligned)
        return f"{where}: {a}: {self.message}" if a else f"{where}: {self.message}"


def read_decisions(path: str | Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Rows of a decisions CSV (the page's export or a filled-in review.csv) with
    the line each starts on, and the lines that are not valid CSV (a quote opened
    and never closed, a quote in the middle of an unquoted cell, more cells than
    the header) with why. Read with the csv module over the file, so a cell may
    hold newlines, U+2028, tabs, quotes and commas; names are taken exactly (never
    stripped; a spreadsheet-safety quote, files.sheet_cell, is taken off). Needs
    columns ``aligned`` and ``decision``; ``identity`` is checked when present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    rows: list[tuple[int, dict]] = []
    bad: list[tuple[int, str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None) or []
            cols = [c.strip().lower() for c in header]
            if "aligned" not in cols or "decision" not in cols:
                raise ValueError(f"{path}: needs a header with columns 'aligned' and 'decision' "
                                 f"(found: {', '.join(header) or 'nothing'})")
            while True:
                start = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    bad.append((start, f"not a valid CSV row ({e}): an unclosed or stray quote?"))
                    continue
                if not cells:
                    continue
                if len(cells) > len(cols):
                    bad.append((start, f"{len(cells)} cells, the header has {len(cols)} (an unquoted comma?)"))
                    continue
                e = dict(zip(cols, cells))
                for k in ("aligned", "identity"):
                    if k in e:
                        e[k] = unsheet_cell(e[k])
                e["decision"] = e.get("decision", "").strip()
                rows.append((start, e))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return rows, bad


def apply_decisions(out_dir: str | Path, decisions_csv: str | Path | Sequence[str | Path], *,
                    strict: bool = False, dry_run: bool = False) -> dict:
    """Merge a person's keep/drop decisions into OUT/clean.csv.

    Each accepted row sets ``decision`` and ``reason=manual``; the decision and
    reason clean made are kept in ``previous_decision``/``previous_reason`` (the
    first time only, so applying the same file twice gives the same bytes, and a
    later file can change a manual decision without losing clean's). Blank
    decisions are left undecided. Rows naming an unknown crop, an invalid decision,
    another identity, or contradicting an earlier row of the same file are
    rejected and listed in ``problems``; the rest are applied unless ``strict``.
    The file is rewritten atomically, and only when something changed."""
    out_dir = Path(out_dir)
    columns, rows = load_clean(out_dir)
    index = {r.aligned: i for i, r in enumerate(rows) if r.aligned}
    files = [decisions_csv] if isinstance(decisions_csv, (str, Path)) else list(decisions_csv)
    entries = []
    problems: list[Problem] = []
    for f in files:
        tag = Path(f).name if len(files) > 1 else ""
        got, bad = read_decisions(f)
        entries += [(tag, line, e) for line, e in got]
        problems += [Problem(line, "", why, tag) for line, why in bad]
    chosen: dict[str, tuple[str, str]] = {}
    undecided = 0
    bad: set[str] = set()
    for tag, line, e in entries:
        where = f"{tag} line {line}" if tag else f"line {line}"
        a = e.get("aligned", "")
        d = e.get("decision", "").lower()
        if not a and not d:
            continue
        if not a:
            problems.append(Problem(line, "", "empty 'aligned'", tag))
            continue
        i = index.get(a)
        if i is None:  # reported even when undecided: a name the file mangled must not pass unseen
            problems.append(Problem(line, a, f"not in {C.CLEAN_CSV} (a crop of another run?)", tag))
            continue
        if not d:
            undecided += 1
            continue
        if d not in HUMAN_DECISIONS:
            problems.append(Problem(line, a, f"invalid decision {e.get('decision')!r} (use keep or drop)", tag))
            continue
        ident = e.get("identity", "")
        if ident and ident != rows[i].identity:
            problems.append(Problem(line, a, f"identity '{shown(ident)}' does not match '{shown(rows[i].identity)}' "
                                             f"in {C.CLEAN_CSV}", tag))
            continue
        if a in chosen and chosen[a][1] != d:
            problems.append(Problem(line, a, f"contradicts {chosen[a][0]} ({chosen[a][1]})", tag))
            bad.add(a)
            continue
        chosen.setdefault(a, (where, d))
    for a in bad:
        chosen.pop(a, None)
    changed = unchanged = 0
    by_decision: dict[str, int] = defaultdict(int)
    apply_now = not (strict and problems)
    if apply_now:
        for a, (_, d) in chosen.items():
            r = rows[index[a]]
            by_decision[d] += 1
            new = r.manual(d)
            if new.to_csv(columns) == r.to_csv(columns):
                unchanged += 1
            else:
                changed += 1
                rows[index[a]] = new
    path = out_dir / C.CLEAN_CSV
    if apply_now and changed and not dry_run:
        Workspace(out_dir).write_clean(rows, columns)
    left = sum(1 for r in rows if r.decision == C.DECISION_REVIEW)
    return dict(
        decisions_read=len(entries), accepted=len(chosen) if apply_now else 0,
        changed=changed, unchanged=unchanged, undecided=undecided,
        keep=by_decision.get(C.DECISION_KEEP, 0), drop=by_decision.get(C.DECISION_DROP, 0),
        rejected=len(problems), problems=[str(p) for p in problems],
        written=bool(apply_now and changed and not dry_run), strict=strict,
        review_left=left, clean_csv=str(path),
    )
