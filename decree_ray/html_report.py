"""`decree report --html`: one self-contained page an auditor can read and trust.

Images are inlined (data: URIs), nothing is fetched, and the page's only script is the few lines below that
mark it rendered; a Content-Security-Policy allows that script by hash and nothing else, so even text that
escaped `html.escape` could not run. Every id, uri and error is the audited party's text: escaped, with
control characters already escaped by `schema.safe_text`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .report import collapse_warning, score_cut
from .schema import safe_text

TITLE = "decree audit report"
PAGE_SIZE = 20
_READY_JS = ("window.addEventListener('load',function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)"
             "{if(i[k].naturalWidth>0)n++;}document.body.setAttribute('data-images-loaded',String(n));"
             "document.body.setAttribute('data-images',String(i.length));});")
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1d1d1f;padding:0 16px}
h1{font-size:24px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f5f5f7}.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.card{border:1px solid #ccc;border-radius:8px;padding:10px}.card.flagged{border-color:#c62828;
box-shadow:0 0 0 1px #c62828}.card h3{margin:0 0 6px;font-size:15px;word-break:break-all}
.card img{max-width:100%;image-rendering:pixelated;display:block}.muted{color:#666}.bad{color:#c62828}
.page{display:none}.page:target,.page.first{display:block}.page:target~.page.first{display:none}
code{word-break:break-all}.pager a{margin-right:8px}
"""


def _e(value: Any) -> str:
    return html.escape(safe_text(str(value)), quote=True)


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_image(uri: str | None, options) -> str | None:
    """An evidence PNG as a data URI (local path or s3://); None if it cannot be read or is not a PNG."""
    if not uri:
        return None
    from . import storage

    try:
        data = storage.read_bytes(uri, options) if storage.is_s3(uri) else Path(uri).read_bytes()
    except Exception:  # noqa: BLE001 - a missing image leaves a note in the card, never a failed report
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) > 8 << 20:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _score_plots(scanned: list[dict], cutoff: float) -> list[tuple[str, str]]:
    """Per (arch, image_size): PL1 on a log axis, flagged encoders marked, the threshold drawn; the fleet's
    anomaly index beneath it when the group had enough peers for one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in scanned:
        groups[(r.get("arch"), r.get("image_size"))].append(r)
    out = []
    for (arch, size), rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), str(kv[0]))):
        fleet = [r for r in rows if r.get("anomaly_index") is not None]
        fig, axes = plt.subplots(2 if fleet else 1, 1, figsize=(9, 4.0 if fleet else 2.2), squeeze=False)
        rng = np.random.default_rng(0)
        panels = [(axes[0][0], "pl1_norm", "PL1 (area fraction of the inverted trigger, log scale; lower = more "
                   "suspicious)")]
        if fleet:
            panels.append((axes[1][0], "anomaly_index", "anomaly index among comparable encoders (higher = more "
                           "suspicious)"))
        for ax, column, xlabel in panels:
            for flagged, colour, label in ((False, "tab:blue", "clean verdict"), (True, "tab:red", "flagged")):
                sel = [r for r in rows if (r.get("verdict") == "trojaned") == flagged and r.get(column) is not None]
                if sel:
                    xs = [max(r[column], 1e-5) if column == "pl1_norm" else r[column] for r in sel]
                    ax.scatter(xs, rng.uniform(-0.3, 0.3, len(sel)), s=18, c=colour, label=f"{label} ({len(sel)})",
                               alpha=0.8)
            if column == "pl1_norm":
                for t in sorted({r["threshold"] for r in rows if r.get("threshold")})[:3]:
                    ax.axvline(t, color="tab:orange", lw=1.2, ls="--", label=f"threshold {t:g}")
                ax.set_xscale("log")
            else:
                ax.axvline(cutoff, color="tab:orange", lw=1.2, ls="--", label=f"fleet cutoff {cutoff:g}")
            ax.set_yticks([])
            ax.set_ylim(-0.6, 0.6)
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=7, loc="upper left", ncol=4)
        fig.tight_layout()
        title = f"{safe_text(str(arch))} at {size or '?'} px: {len(rows)} encoders"
        out.append((title, _png(fig)))
    return out


def _suspicion(r: dict) -> tuple:
    """Sort key, most suspicious first: flagged rows, then by suspicion (decree.fleet), then the smallest PL1."""
    flagged = r.get("verdict") == "trojaned"
    value = r.get("suspicion")
    return (not flagged, -(value if value is not None else -1e9), r.get("pl1_norm") or 1.0)


_HEX = re.compile(r"\b[0-9a-f]{12,}\b")
_NUM = re.compile(r"\d+")


def error_groups(rows: list[dict], examples: int = 5) -> list[tuple[str, int, list[str]]]:
    """(reason, count, first ids): an error's text with its encoder's own uri, id, digests and numbers taken out."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "error":
            continue
        if r.get("unsafe_globals"):
            reason = "unsafe checkpoint (" + ", ".join(sorted(set(r["unsafe_globals"]))[:4]) + ")"
        else:
            text = str(r.get("error") or "unknown error")
            for own in (r.get("uri"), r.get("id")):
                if own:
                    text = text.replace(str(own), "<encoder>")
            reason = _NUM.sub("N", _HEX.sub("<hex>", text))[:200]
        groups[reason].append(str(r.get("id")))
    return sorted(((k, len(v), v[:examples]) for k, v in groups.items()), key=lambda g: -g[1])


def render(rows: list[dict], rep, *, options=None, cards: int = 100, page_size: int = PAGE_SIZE,
           roc_png: bytes | None = None) -> str:
    """The page, as a string. `rows` are the re-judged rows (report.rejudge), `rep` the report.Report."""
    from . import storage

    options = options or storage.DEFAULT_S3
    scanned = [r for r in rows if r.get("status") == "ok" and r.get("pl1_norm") is not None]
    status = Counter(r.get("status") for r in rows)
    verdicts = Counter(r.get("verdict") for r in scanned)
    settings = Counter((r.get("profile"), r.get("decree_version"), (r.get("shadow_sha256") or "")[:12]) for r in scanned)
    seconds = sum(r.get("seconds") or 0.0 for r in rows)
    devices = Counter(r.get("device") for r in scanned)
    parts = [f"<h1>{_e(TITLE)}</h1>", "<h2>Summary</h2><table>"]
    summary = [
        ("encoders", f"{rep.total}: " + ", ".join(f"{_e(k)} {v}" for k, v in sorted(status.items(), key=str))),
        ("verdicts", ", ".join(f"{_e(k)} {v}" for k, v in sorted(verdicts.items(), key=str)) or "-"),
        ("flagged", f"<b class='bad'>{rep.flagged}</b> ({rep.fleet_outliers} as outliers among their peers only; "
                    f"{rep.threshold_overruled} below a threshold but cleared: clean anchor peers score as low)"),
        ("threshold", f"PL1 &lt; {rep.threshold:g} (from {_e(rep.threshold_source)})"),
        ("fleet", f"{rep.fleet_judged} judged against comparable peers; anomaly cutoff {rep.fleet_cutoff:g}; "
                  f"{rep.references} reference encoders"),
        ("settings", "<br>".join(f"profile {_e(p)}, decree {_e(v)}, shadow set {_e(s) or '-'}: {n} rows"
                                 for (p, v, s), n in settings.most_common(5)) or "-"),
        ("scan time", f"{seconds:.1f} s of scanning over {len(rows)} rows (" +
                      ", ".join(f"{_e(d)} {n}" for d, n in devices.most_common(3)) + ")"),
        ("cost", f"{seconds / 3600:.3f} worker-hours (device-hours at one encoder per device)"),
    ]
    for b in rep.collapsing_bases:  # the base itself would be flagged: a shared backdoor or a degenerate shadow set
        summary.append(("warning", f"<b class='bad'>{_e(collapse_warning(b))}</b>"))
    parts += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary] + ["</table>"]
    ranked = sorted(scanned, key=_suspicion)
    suspicious = [r for r in ranked if r.get("verdict") == "trojaned"] or ranked[: min(len(ranked), 5)]
    shown = suspicious[:cards]
    n_flagged = verdicts.get("trojaned", 0)
    parts.append(f"<h2>Suspicious encoders</h2><p class='muted'>{n_flagged} flagged, most suspicious first"
                 + (f"; the first {len(shown)} shown (--cards)" if len(shown) < len(suspicious) else "")
                 + (". Nothing was flagged: the least clean-looking encoders are shown." if not n_flagged else "")
                 + "</p>")
    pages = [shown[i:i + page_size] for i in range(0, len(shown), page_size)] or [[]]
    if len(pages) > 1:
        parts.append("<p class='pager'>pages: " + " ".join(f"<a href='#page-{k + 1}'>{k + 1}</a>"
                                                           for k in range(len(pages))) + "</p>")
    # later pages first in the markup: `.page:target ~ .page.first` hides page 1 once another is chosen
    order = list(range(1, len(pages))) + [0]
    for k in order:
        cls = "page first" if k == 0 else "page"
        parts.append(f"<section id='page-{k + 1}' class='{cls}'><div class='cards'>")
        parts += [_card(r, options) for r in pages[k]]
        parts.append("</div></section>")
    parts.append("<h2>Scores per architecture</h2>")
    for title, uri in _score_plots(scanned, rep.fleet_cutoff):
        parts.append(f"<h3>{_e(title)}</h3><img alt='score distribution' src='{uri}'>")
    groups = error_groups(rows)
    parts.append("<h2>Errors</h2>")
    if groups:
        parts.append("<table><tr><th>encoders</th><th>reason</th><th>first ids</th></tr>")
        for reason, n, ids in groups:
            parts.append(f"<tr><td class='num'>{n}</td><td>{_e(reason)}</td><td>"
                         + "<br>".join(f"<code>{_e(i)}</code>" for i in ids) + "</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='muted'>None.</p>")
    if rep.labeled:
        parts.append("<h2>Against the labels</h2><table>")
        parts.append(f"<tr><th>labeled</th><td>{rep.labeled} ({rep.positives} trojaned, {rep.negatives} clean)</td></tr>")
        if rep.auc is not None:
            parts.append(f"<tr><th>ROC-AUC</th><td class='num'>{rep.auc:.4f} (by suspicion; "
                         f"&minus;PL1 alone {_f(rep.auc_pl1)})</td></tr>")
            parts.append(f"<tr><th>TPR at FPR &le; {rep.fpr_target:g}</th><td class='num'>{_f(rep.tpr_at_fpr, '.3f')} "
                         f"({_e(score_cut(rep))})</td></tr>")
        if rep.confusion:
            c = rep.confusion
            parts.append(f"<tr><th>confusion</th><td>TP {c['tp']} &middot; FP {c['fp']} &middot; FN {c['fn']} "
                         f"&middot; TN {c['tn']}</td></tr>")
        parts.append("</table>")
        if roc_png:
            parts.append(f"<img alt='ROC curve' src='data:image/png;base64,{base64.b64encode(roc_png).decode()}'>")
    body = "\n".join(parts)
    digest = base64.b64encode(hashlib.sha256(_READY_JS.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
            f"<meta name='viewport' content='width=device-width'><title>{_e(TITLE)}</title><style>{_CSS}</style>"
            f"<script>{_READY_JS}</script></head><body>{body}</body></html>")


def _card(r: dict, options) -> str:
    flagged = r.get("verdict") == "trojaned"
    grid = _read_image(r.get("evidence_grid"), options)
    fallback = [x for x in (_read_image(r.get("evidence_mask"), options), _read_image(r.get("evidence_stamp"), options))
                if x]
    if grid:
        imgs = (f"<img class='grid' alt='shadow images, stamped, mask heat map' src='{grid}'>"
                "<p class='muted'>top: shadow images &middot; middle: stamped with the recovered trigger &middot; "
                "bottom: the mask as a heat map</p>")
    elif fallback:
        imgs = "".join(f"<img alt='evidence' src='{u}' style='width:160px;display:inline-block;margin-right:6px'>"
                       for u in fallback)
    else:
        imgs = "<p class='muted'>no evidence images for this row</p>"
    thr, pl1 = r.get("threshold"), r.get("pl1_norm")
    margin = f"{pl1 / thr:.2f}× the threshold" if thr and pl1 is not None else "-"
    facts = [
        ("verdict", f"<b class='{'bad' if flagged else ''}'>{_e(r.get('verdict'))}</b> ({_e(_why(r))})"),
        ("suspicion", f"{_f(r.get('suspicion'), '.2f')} (above 1: flagged; every rule of the verdict)"),
        ("PL1", f"{_f(pl1)} ({margin})"),
        ("anomaly index", _f(r.get("anomaly_index"), ".2f") + f" among {r.get('fleet_peers') or 0} peers"
                          + (f" (anchor: {_e(r['fleet_anchor'])})" if r.get("fleet_anchor") else "")),
        ("similarity reached", f"{_f(r.get('similarity'), '.3f')} (τ {'reached' if r.get('reached_tau') else 'not reached'})"),
    ]
    if r.get("specific_pl1") is not None:
        facts.append(("specific PL1", f"{_f(r['specific_pl1'])} (base model's similarity under this trigger "
                                      f"{_f(r.get('base_similarity'), '.3f')}; {_e(r.get('specific_verdict'))})"))
    if r.get("blend_pl1") is not None:
        facts.append(("blend weight", f"{_f(r['blend_pl1'])} ({_e(r.get('blend_verdict'))})"))
    facts += [("arch", f"<code>{_e(r.get('arch'))}</code> at {_e(r.get('image_size') or '?')} px"),
              ("uri", f"<code>{_e(r.get('uri'))}</code>"), ("sha256", f"<code>{_e((r.get('sha256') or '-')[:16])}</code>")]
    if r.get("label"):
        facts.append(("label", _e(r["label"])))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return (f"<div class='card{' flagged' if flagged else ''}'><h3>{_e(r.get('id'))}</h3>{imgs}"
            f"<table>{rows}</table></div>")


def _why(r: dict) -> str:
    from decree.fleet import below_threshold

    if below_threshold(r):
        if r.get("verdict") == "clean":
            return (f"below its threshold, but its {r.get('fleet_anchor') or 'anchor'} of known or clustered clean "
                    "peers scores as low: the threshold does not fit this group")
        return "below its threshold"
    if r.get("verdict") == "trojaned":
        return "an outlier among its peers"
    return "fleet and threshold" if r.get("verdict_basis") == "fleet" else "threshold; too few peers for a fleet"


def write(path: str | Path, rows: list[dict], rep, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows, rep, **kw), encoding="utf-8")
    return path
