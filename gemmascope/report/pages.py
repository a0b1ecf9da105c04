"""`gemmascope report CONFIG`: RUN/report/index.html and one feature page per SAE.

Static files with inline SVG and CSS, no scripts and nothing fetched, so the report opens
offline from disk or a bucket. It reads what export wrote (RUN/saes/index.json and the
params), the held-out rows of the store, and the model (tokenizer and unembedding).

A transcoder's stream reads `mlp_in->mlp L<L> <width>` (`mlp_in->mlp skip ...` for a
skip transcoder), so each kind draws its own frontier line beside the mlp SAEs of its
layer; its feature pages rank the held-out mlp_in rows, and its latents' logit effects
come from their W_dec rows in the MLP output space (added to the residual stream as an
mlp SAE's are).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from html import escape

import torch
from tqdm import tqdm

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import load_params_npz
from gemmascope.export.saelens import load_topk
from gemmascope.models.loading import LoadedModel, load_model
from gemmascope.report.features import Feature, sample_features
from gemmascope.report.svg import bar_chart, line_chart
from gemmascope.store import ActivationStore
from gemmascope.sweep.grid import width_label

log = logging.getLogger("gemmascope.report")

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{background:#fff}.feature{border-top:1px solid #ddd;
padding:10px 0}.ctx{font-family:monospace;font-size:12px;white-space:pre-wrap;margin:2px 0}
.tok{border-radius:2px}.tokens{font-family:monospace;font-size:12px}"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


# How each architecture's sparsity knob reads beside its stream (JumpReLU: lambda).
KNOB_LABELS = {"jumprelu": "&lambda; {}", "jumprelu_target_l0": "target L0 {}", "topk": "TopK k={}",
               "batchtopk": "BatchTopK k={}", "matryoshka_batchtopk": "Matryoshka BatchTopK k={}",
               "relu_l1": "ReLU+L1 {}"}


def _architecture(entry: dict) -> str:
    return entry.get("architecture", "jumprelu")  # indexes written before there were others


def _target(entry: dict) -> str:
    return entry.get("target") or entry["site"]  # indexes written before transcoders: an SAE


def _kind(entry: dict) -> str:
    """What an SAE reads and writes: its site, or e.g. `mlp_in->mlp` (`mlp_in->mlp skip`) for a transcoder."""
    if _target(entry) == entry["site"]:
        return entry["site"]
    return f"{entry['site']}->{_target(entry)}" + (" skip" if entry.get("skip") else "")


def _slug(entry: dict) -> str:
    """e.g. res-L6-w16k-s0.0006, res-L6-w16k-btk32, mlp_in-to-mlp-L3-w16k-s0.001-skip: the
    SAE's name after its width."""
    which = entry["name"].split("-", 1)[1] if entry["sparsity"] is not None else entry["name"]
    site = entry["site"] if _target(entry) == entry["site"] else f"{entry['site']}-to-{_target(entry)}"
    return f"{site}-L{entry['layer']}-w{width_label(entry['width'])}-{which}"


def _which(entry: dict) -> str:
    """An SAE's name beside its stream: its architecture's knob, or where it was imported from."""
    if entry["sparsity"] is not None:
        return KNOB_LABELS[_architecture(entry)].format(f"{entry['sparsity']:g}")
    return f"imported from {escape(entry['source'])}"


def _stream(entry: dict) -> str:
    return f"{_kind(entry)} L{entry['layer']} {width_label(entry['width'])}"


def _order(entry: dict) -> tuple:
    return entry["site"], _target(entry), bool(entry.get("skip")), entry["layer"], entry["width"], entry["l0"]


def _frontier(entry: dict) -> str:
    """The line an SAE is a point of: its stream, one line per architecture; an imported SAE
    is a point of its own."""
    if entry["sparsity"] is None:
        return f"{_stream(entry)} {entry['name']}"
    architecture = _architecture(entry)
    return _stream(entry) + ("" if architecture == "jumprelu" else f" {architecture}")


def index_page(index: dict) -> str:
    saes = sorted(index["saes"], key=_order)
    by_stream: dict[str, list[dict]] = defaultdict(list)
    for entry in saes:
        by_stream[_frontier(entry)].append(entry)
    delta = {name: [(e["l0"], e["delta_loss"]) for e in group] for name, group in by_stream.items()}
    fvu = {name: [(e["l0"], e["fvu"]) for e in group] for name, group in by_stream.items()}
    columns = ("site", "layer", "width", "architecture", "sparsity", "l0", "fvu", "delta_loss", "kl",
               "loss_recovered", "dead_fraction", "dense_fraction")
    rows = []
    for entry in saes:
        values = {**entry, "site": _kind(entry), "architecture": _architecture(entry)}
        cells = "".join(f"<td>{values[c]:.4g}</td>" if isinstance(values[c], float)
                        else "<td>imported</td>" if values[c] is None else f"<td>{escape(str(values[c]))}</td>"
                        for c in columns)
        mark = " &#9733;" if entry["canonical"] else ""
        rows.append(f'<tr>{cells}<td><a href="features/{_slug(entry)}.html">features</a>{mark}</td></tr>')
    densities = "".join(
        f'<div><div>{escape(_stream(e))}, {_which(e)} (L0 {e["l0"]:.0f}, {e["density_histogram"]["dead"]} '
        f'dead)</div>{_density_chart(e)}</div>' for e in saes)
    body = (f"<h1>SAEs of {escape(index['model'])}</h1>"
            f"<p>{len(saes)} SAEs, evaluated on held-out data; &#9733; marks the canonical SAE of each "
            "(site, layer, width): L0 closest to 100.</p>"
            '<h2>Frontiers</h2><div class="charts">'
            f"{line_chart(delta, 'L0 (log scale)', 'delta LM loss (nats)', log_x=True)}"
            f"{line_chart(fvu, 'L0 (log scale)', 'FVU', log_x=True)}</div>"
            f"<h2>All SAEs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in columns)}<th></th></tr>"
            f"{''.join(rows)}</table>"
            f'<h2>Latent densities</h2><div class="charts">{densities}</div>')
    return _page(f"SAEs of {index['model']}", body)


def _density_chart(entry: dict) -> str:
    histogram = entry["density_histogram"]
    edges = histogram["log10_edges"]
    labels = [f"1e{edges[i]:.2g}" for i in range(len(histogram["counts"]))]
    return bar_chart(histogram["counts"], labels, "log10 firing density (held-out tokens)", width=300, height=100)


def _context_html(context: list[tuple[str, float]], top: float) -> str:
    spans = []
    for text, value in context:
        alpha = 0.0 if top <= 0 else min(max(0.0, value / top), 1.0)  # never "-0.00"
        value = value + 0.0  # -0.0 (a latent off on a negative pre-activation) reads 0
        spans.append(f'<span class="tok" style="background:rgba(255,140,0,{alpha:.2f})" '
                     f'title="{value:.3g}">{escape(text)}</span>')
    return f'<div class="ctx">{"".join(spans)}</div>'


def _token_list(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"<code>{escape(repr(text))}</code> {value:+.2f}" for text, value in items)


def feature_page(entry: dict, features: list[Feature]) -> str:
    parts = [f"<h1>{escape(_stream(entry))}, {_which(entry)}</h1>",
             f"<p>L0 {entry['l0']:.1f}, FVU {entry['fvu']:.3f}, delta loss {entry['delta_loss']:.4f}, "
             f"loss recovered {entry['loss_recovered']:.3f}. "
             f'<a href="../index.html">all SAEs</a></p>']
    for feature in features:
        counts, edges = feature.histogram
        labels = [f"{edges[i]:.3g}" for i in range(len(counts))]
        parts.append(
            f'<div class="feature" id="latent-{feature.latent}"><h2>latent {feature.latent}</h2>'
            f"<p>fires on {feature.density:.3%} of held-out tokens; top activation {feature.top_activation:.3g}</p>"
            f"{''.join(_context_html(c, feature.top_activation) for c in feature.contexts)}"
            f"{bar_chart(counts, labels, 'activation (nonzero)')}"
            f'<p class="tokens">promotes: {_token_list(feature.promoted)}</p>'
            f'<p class="tokens">suppresses: {_token_list(feature.suppressed)}</p></div>')
    return _page(_slug(entry), "".join(parts))


def _residual_direction(loaded: LoadedModel, site: str, layer: int):
    """Decoder row -> its direct effect on the residual stream before the unembedding. `site`
    is what the decoder writes: an SAE's site, a transcoder's target (`mlp`: the MLP block's
    output, added to the residual stream as it is)."""
    model = loaded.model.model
    final_scale = (1.0 + model.norm.weight.detach().float()).numpy()
    if site == "att":
        o_proj = loaded.decoder_layers[layer].self_attn.o_proj.weight.detach().float().numpy()
        return lambda row: (o_proj @ row) * final_scale
    return lambda row: row * final_scale


def _released(run: str, store: ActivationStore, entry: dict) -> tuple[dict, int | None]:
    """(release arrays, k) of an index entry: its params.npz (a transcoder's with the target's
    width as output), or a TopK SAE's SAELens files (no params.npz) with its k."""
    if entry["path"] is None:
        return load_topk(storage.join(run, entry["saelens_path"]))
    target = _target(entry)
    d_out = store.d_in.get((target, entry["layer"])) if target != entry["site"] else None
    return load_params_npz(storage.join(run, entry["path"], "params.npz"), d_out=d_out), None


def run_report(config: Config, *, progress: bool = True) -> str:
    run = storage.normalize(config.run_dir)
    index_url = storage.join(run, "saes", "index.json")
    if not storage.exists(index_url):
        raise UserError(f"{index_url}: nothing exported yet; run `gemmascope export {config.origin}` first")
    index = storage.read_json(index_url)
    store = ActivationStore.open(run)
    start = store.n_rows - config.train.holdout_rows
    stop = store.n_rows if config.eval.max_rows is None else min(store.n_rows, start + config.eval.max_rows)
    table = store.token_table().sort_by("row")
    rows = table.column("row").to_numpy()
    held = (rows >= start) & (rows < stop)
    tokens, sequences = table.column("token").to_numpy()[held], table.column("sequence").to_numpy()[held]
    loaded = load_model(config.model)
    unembed = loaded.model.get_output_embeddings().weight.detach().float().numpy()
    tokenizer = loaded.tokenizer

    def decode(token: int) -> str:
        return tokenizer.decode([token])

    pages = storage.join(run, "report", "features")
    for entry in tqdm(index["saes"], desc="report", unit="sae", disable=not progress):
        released, k = _released(run, store, entry)
        with torch.inference_mode():
            direction = _residual_direction(loaded, _target(entry), entry["layer"])
        features = sample_features(store, entry["site"], entry["layer"], start, stop, released, tokens=tokens,
                                   sequences=sequences, decode=decode, residual_direction=direction,
                                   unembed=unembed, count=config.report.features, examples=config.report.examples,
                                   seed=config.train.seed, k=k)
        storage.write_bytes_atomic(storage.join(pages, f"{_slug(entry)}.html"),
                                   feature_page(entry, features).encode())
    storage.write_bytes_atomic(storage.join(run, "report", "index.html"), index_page(index).encode())
    return f"report: {storage.join(run, 'report', 'index.html')} ({len(index['saes'])} SAEs, feature pages in {pages})"
