"""What the relation encoder of an LRD run discovered, as a page to look at (``lrd-dist relations``).

For the distinct (history item, target) pairs of the training split: the relation distribution
q(r | h, i) of the trained model; per relation slot its most confident pairs with their texts; a
histogram of how many pairs each slot wins; and a heatmap of the winning slot against the
predefined relations that hold between the two items (the paper's analysis). Written as
``relations/index.html`` with PNG figures beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pyarrow.compute as pc
import torch

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.encoders.item_text import read_catalog_once
from lrd_dist.errors import InputError
from lrd_dist.run_dir import RunDir
from lrd_dist.runtime import select_attention

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PAGE = jinja2.Template(
    """<!doctype html><html><head><meta charset="utf-8"><title>Discovered relations: {{ run }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;font-size:14px}h2{margin-top:1.6em}
.q{color:#555;width:4em}</style></head><body>
<h1>Discovered relations</h1>
<p>Run <code>{{ run }}</code>: {{ pairs }} distinct (history item, target) pairs of the training split,
{{ slots|length }} relation slots.</p>
<img src="usage.png" alt="pairs per relation" width="520">
<img src="heatmap.png" alt="against predefined" width="520">
{% for slot in slots %}<h2>{{ slot.name }}: {{ slot.won }} pairs ({{ "%.1f"|format(100 * slot.share) }}%)</h2>
<table><tr><th class="q">q</th><th>history item</th><th>target item</th></tr>
{% for pair in slot.top %}<tr><td class="q">{{ "%.3f"|format(pair.q) }}</td><td>{{ pair.head }}</td>
<td>{{ pair.tail }}</td></tr>{% endfor %}</table>{% endfor %}
</body></html>""",
    autoescape=True,
)


@torch.inference_mode()
def relation_report(run_dir: Path, top: int = 10, max_pairs: int = 200_000) -> Path:
    run = RunDir(run_dir)
    run.require_trained()
    config = run.config()
    if not config.lrd.enabled:
        raise InputError(run.config_file, "this run has no LRD module", "pick a run with lrd.enabled=true")
    trained = run.load(attention=select_attention(config.model.fused_attention))
    model, catalog, graph, data = trained.model, trained.catalog, trained.graph, trained.data_dir
    texts = catalog.texts.to_pylist()
    model.eval()

    heads, tails = _distinct_pairs(data, config.data.max_history, trained.manifest.num_items, max_pairs)
    with read_catalog_once(model.item_text):  # a tuned encoder: the catalog once, not per batch
        q = torch.cat(
            [
                model.relation_distribution(
                    torch.from_numpy(heads[i : i + 4096]), torch.from_numpy(tails[i : i + 4096])
                )
                for i in range(0, len(heads), 4096)
            ]
        ).numpy()
    winner = q.argmax(1)
    names = graph.slots.names()[model.lrd_first_slot :]
    out = run.relations
    out.mkdir(exist_ok=True)
    _usage_figure(names, np.bincount(winner, minlength=len(names)), out / "usage.png")
    predefined, labels = _predefined_relations(catalog, graph, heads, tails)
    _heatmap(names, winner, predefined, labels, out / "heatmap.png")
    against = np.zeros((len(names), len(labels)), dtype=np.int64)
    np.add.at(against, (winner, predefined), 1)
    entropy = -(q * np.log(np.clip(q, 1e-12, None))).sum(1)
    summary = {
        "pairs": len(heads),
        "slots": names,
        "won": np.bincount(winner, minlength=len(names)).tolist(),
        "share": (np.bincount(winner, minlength=len(names)) / max(len(heads), 1)).tolist(),
        "mean_q": q.mean(0).tolist(),
        "mean_entropy": float(entropy.mean()),
        "predefined": labels,
        "won_by_predefined": against.tolist(),  # [slot][predefined relation] pair counts
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    slots = []
    for slot, name in enumerate(names):
        order = np.argsort(-q[:, slot])[:top]
        slots.append(
            {
                "name": name,
                "won": int((winner == slot).sum()),
                "share": float((winner == slot).mean()),
                "top": [
                    {"q": float(q[i, slot]), "head": texts[heads[i] - 1], "tail": texts[tails[i] - 1]}
                    for i in order
                ],
            }
        )
    page = out / "index.html"
    page.write_text(PAGE.render(run=str(run.path), pairs=len(heads), slots=slots))
    return page


def _distinct_pairs(
    data: Path, max_history: int, num_items: int, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    stream = SequenceStream(
        data, "train", LoaderConfig(batch_size=4096, shuffle=False, max_history=max_history)
    )
    keys = []
    for batch in make_loader(stream):
        positions = torch.arange(batch["history_items"].shape[1])
        real = (positions[None, :] < batch["history_length"][:, None]) & batch["valid"][:, None]
        head = batch["history_items"][real]
        tail = batch["target"][:, None].expand_as(batch["history_items"])[real]
        keys.append(np.unique(head.numpy() * (num_items + 1) + tail.numpy()))
    unique = np.unique(np.concatenate(keys))
    if len(unique) > limit:
        unique = np.random.default_rng(0).choice(unique, limit, replace=False)
    return unique // (num_items + 1), unique % (num_items + 1)


def _predefined_relations(catalog: Catalog, graph: KnowledgeGraph, heads: np.ndarray, tails: np.ndarray):
    """For each pair, the first predefined relation holding between the two items (either
    direction for item-item relations), or 'none'."""
    labels = [*catalog.relations, *[f"same {a}" for a in catalog.attributes], "none"]
    assigned = np.full(len(heads), len(labels) - 1)
    n = catalog.num_items
    for index, lists in reversed(list(enumerate(catalog.relations.values()))):
        lengths = pc.list_value_length(lists).to_numpy()
        source = np.repeat(np.arange(1, n + 1), lengths)
        target = pc.list_flatten(lists).to_numpy().astype(np.int64)
        known = np.unique(np.concatenate([source * (n + 1) + target, target * (n + 1) + source]))
        assigned = np.where(np.isin(heads * (n + 1) + tails, known), index, assigned)
    for offset, values in enumerate(catalog.attributes.values()):
        index = len(catalog.relations) + offset
        same = (values[heads - 1] == values[tails - 1]) & (values[heads - 1] > 0)
        assigned = np.where(same & (assigned == len(labels) - 1), index, assigned)
    return assigned, labels


def _usage_figure(names: list[str], counts: np.ndarray, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    axis.bar(
        range(len(names)),
        counts,
        color=["#999"] * (len(names) - sum(n.startswith("latent") for n in names))
        + ["#3a7"] * sum(n.startswith("latent") for n in names),
    )
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("pairs won (argmax q)")
    axis.set_title("Pairs per relation slot")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _heatmap(
    names: list[str], winner: np.ndarray, predefined: np.ndarray, labels: list[str], path: Path
) -> None:
    table = np.zeros((len(names), len(labels)))
    np.add.at(table, (winner, predefined), 1)
    share = table / table.sum(0, keepdims=True).clip(min=1)  # per predefined relation: where its pairs go
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    image = axis.imshow(share, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_xlabel("predefined relation between the two items")
    axis.set_title("Share of each predefined relation's pairs per discovered slot")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
