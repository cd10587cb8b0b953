"""The dataset card (`README.md`): YAML front matter the Hub reads, then what the data is, how it was built, the
statistics of `fashionmv report`, how to load it, and the licence caveat.

The card is a pure function of the build and the published folder (no clock), so a rerun writes the same bytes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from fashionmv_builder.core.build import TRIPLETS, Build, TableRef
from fashionmv_builder.core.config import LmmPrice, RunConfig
from fashionmv_builder.core.stage import Stage, Work
from fashionmv_builder.outputs.hub.tables import CONFIGS
from fashionmv_builder.pipeline import PIPELINE


def _answers_table(stage: type[Stage]) -> TableRef:
    """The table of an LMM stage's answers: the one whose rows record the model and the prompt version."""
    return next(TableRef(stage.name, t) for t, schema in stage.writes.items() if "prompt_version" in schema.names)


LMM_STAGES: dict[str, TableRef] = {cls.name: _answers_table(cls) for cls in PIPELINE if cls.work is Work.LMM}
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"
DESCRIPTIONS = {
    "triplets": "source product, target product, short modification texts (paraphrases; the first is FashionMV's "
    "field), long modification text, the views the change spans, the discriminability check's pick and the "
    "per-triplet redundancy flags",
    "captions": "per-view captions and long/short product captions (Stage 1)",
    "products": "every product with its split, source, licence and kept views (file name, source path, sha256)",
    "hard_negatives": "candidates shown with each triplet and not chosen, in shown order",
}


@dataclass
class StageCost:
    tokens_in: int = 0
    tokens_out: int = 0
    server_seconds: float = 0.0
    models: set[str] = field(default_factory=set)
    prompts: set[str] = field(default_factory=set)
    price: LmmPrice = field(default_factory=LmmPrice)

    @property
    def money(self) -> str:
        return f"{self.price.cost(self.tokens_in, self.tokens_out, self.server_seconds):.4g} {self.price.currency}"


@dataclass
class BuildInfo:
    name: str
    config_hash: str
    date: str
    licences: dict[str, str]  # dataset → licence recorded in the config
    stages: dict[str, StageCost]


@dataclass
class CardInput:
    repo_id: str
    licence: str
    with_images: bool
    files: dict[str, dict[str, list[str]]]  # config → split → shard paths
    rows: dict[str, dict[str, int]]  # config → split → rows
    removed: int  # products taken down since the build
    build: BuildInfo
    report: dict[str, Any] | None


def _build_date(config: RunConfig) -> str:
    """The day the last Stage 3 shard statistics were written (the build's end), in UTC."""
    build = Build(config.output_dir)
    times = [t for s in config.sources if (t := build.stats_modified(TRIPLETS.stage, s.dataset)) is not None]
    return max(times).astimezone(dt.UTC).date().isoformat() if times else "unknown"


def build_info(config: RunConfig) -> BuildInfo:
    """Models, prompt versions, tokens and server time of each LMM stage, from the stages' shards and stats."""
    build = Build(config.output_dir)
    stages = {stage: StageCost() for stage in LMM_STAGES}
    for source in config.sources:
        for stage, answers in LMM_STAGES.items():
            rows = build.rows(answers, source.dataset, ["model", "prompt_version"])
            cost = stages[stage]
            cost.models |= {r["model"] for r in rows if r["model"]}
            cost.prompts |= {r["prompt_version"] for r in rows if r["prompt_version"]}
            stats = build.stats(stage, source.dataset) or {}
            counts = stats.get("counts", {})
            cost.tokens_in += counts.get("tokens_in", 0)
            cost.tokens_out += counts.get("tokens_out", 0)
            # Every dataset of a stage runs on the same server at the same time: its seconds are the stage's.
            cost.server_seconds = max(cost.server_seconds, stats.get("server_seconds") or 0.0)
            if "price" in stats:
                cost.price = LmmPrice(**stats["price"])
    return BuildInfo(
        name=config.name,
        config_hash=config.config_hash(),
        date=_build_date(config),
        licences={s.dataset: s.licence or "unknown" for s in config.sources},
        stages=stages,
    )


def size_category(rows: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1M"


def front_matter(card: CardInput) -> DatasetCardData:
    """The metadata the Hub reads: licence, tags, size, and one config per table with its data files."""
    configs = []
    for config in CONFIGS:
        splits = card.files.get(config, {})
        if not splits:
            continue
        entry: dict[str, Any] = {"config_name": config}
        if config == "triplets":
            entry["default"] = True
        entry["data_files"] = [{"split": s, "path": f"data/{config}/{s}-*.parquet"} for s in sorted(splits)]
        configs.append(entry)
    # Keys DatasetCardData has no argument for (tags, configs, licence details) go in as extra metadata.
    extra: dict[str, Any] = {
        "tags": ["composed-image-retrieval", "fashion", "multi-view", "fashionmv"],
        "configs": configs,
    }
    if card.licence == "other":
        extra["license_name"] = "mixed"
        extra["license_details"] = "Annotations as stated in the card; images remain under their sources' licences."
    return DatasetCardData(
        pretty_name=f"{card.build.name} (fashionmv-builder)",
        license=card.licence,
        language=["en"],
        task_categories=["image-to-image", "text-to-image", "image-feature-extraction"],
        size_categories=[size_category(sum(card.rows.get("triplets", {}).values()))],
        **extra,
    )


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _contents(card: CardInput) -> list[str]:
    rows = [
        [f"`{c}`", DESCRIPTIONS[c], *(card.rows.get(c, {}).get(s, 0) for s in ("train", "val"))]
        for c in CONFIGS
        if c in card.files
    ]
    lines = ["## Contents", "", *_table(["config", "what", "train", "val"], rows)]
    lines += [
        "",
        "Products are keyed by `(dataset, product_id)`; `source_id`, `target_id`, `negative_id` and `candidate_ids` "
        "are product ids within the row's `dataset`. Splits are by product group, so no product or re-listed copy "
        "appears in both.",
    ]
    if card.with_images:
        lines += ["", "`products.images[i]` holds the image of `products.views[i]` (embedded with `--with-images`)."]
    else:
        lines += [
            "",
            "**Images are not included.** Each product lists its kept views by file name, with the source path and the "
            "sha256 of the bytes that were used; fetch the images from their sources under their licences.",
        ]
    if card.removed:
        lines += ["", f"{card.removed} product id(s) were taken down after the build, with every row naming them."]
    return lines


def _provenance(card: CardInput) -> list[str]:
    b = card.build
    rows = [
        [
            stage,
            ", ".join(sorted(c.models)) or "-",
            ", ".join(sorted(c.prompts)) or "-",
            c.tokens_in,
            c.tokens_out,
            round(c.server_seconds, 1),
            c.money,
        ]
        for stage, c in b.stages.items()
    ]
    lines = [
        "## How it was built",
        "",
        f"Built with fashionmv-builder from run `{b.name}` "
        f"(config hash `{b.config_hash[:12]}`), finished {b.date}. Stages: ingest, perceptual-hash dedupe, Stage 1 "
        "multi-view captions, Stage 2 hallucination verifier, Stage 3 split, candidate mining and listwise "
        "selection by a large multimodal model.",
        "",
    ]
    lines += _table(["stage", "model", "prompt version", "tokens in", "tokens out", "server-seconds", "cost"], rows)
    return [
        *lines,
        "",
        "Server-seconds are the stage's time on the LMM server (all datasets ran on it together); cost is from the "
        "price table of the run's config (per million tokens and per GPU-hour).",
    ]


def _statistics(card: CardInput) -> list[str]:
    lines = ["## Statistics", ""]
    report = card.report
    if report is None:
        return [*lines, "No `fashionmv report` was found for this build."]
    note = f"From `fashionmv report` (config hash `{str(report.get('config_hash'))[:12]}`"
    if report.get("config_hash") != card.build.config_hash:
        note += ", written for another version of the configuration"
    lines += [note + (", before the takedowns)." if card.removed else ")."), ""]
    rows = []
    for dataset, d in report.get("datasets", {}).items():
        rows.append(
            [
                dataset,
                d.get("products", {}).get("train", 0),
                d.get("products", {}).get("val", 0),
                d.get("triplets", {}).get("train", 0),
                d.get("triplets", {}).get("val", 0),
                d.get("triplets_per_source"),
                d.get("share_multi_view"),
                (d.get("words_short") or {}).get("mean"),
                (d.get("words_long") or {}).get("mean"),
                d.get("hard_negatives"),
            ]
        )
    header = ["dataset", "products train", "val", "triplets train", "val", "triplets/source", "share ≥2 views"]
    lines += _table([*header, "words short", "words long", "hard negatives"], rows)
    checks = [
        [
            dataset,
            d.get("paraphrases_per_triplet"),
            (d.get("discriminability") or {}).get("rejection_rate"),
            (d.get("redundancy_flags") or {}).get("text_alone_first"),
            (d.get("redundancy_flags") or {}).get("image_alone_first"),
        ]
        for dataset, d in report.get("datasets", {}).items()
    ]
    lines += [
        "",
        "Per triplet: the short texts written (paraphrases), the share the discriminability check rejected (its text "
        "did not lead an LMM from the source back to the target among the shown candidates), and the shares whose "
        "text alone or source image alone already ranks the target first among them (redundancy flags).",
        "",
    ]
    header = ["dataset", "paraphrases", "discriminability rejection rate", "text alone first", "image alone first"]
    lines += _table(header, checks)
    for dataset, d in report.get("datasets", {}).items():
        funnel = ", ".join(f"{s} {f.get('in')}→{f.get('out')}" for s, f in (d.get("funnel") or {}).items())
        redundancy = d.get("modality_redundancy") or {}
        recall = "; ".join(
            f"{name} R@1/5/10 {r.get('R@1')}/{r.get('R@5')}/{r.get('R@10')}"
            for name in ("text_only", "image_only", "composed")
            if isinstance(r := redundancy.get(name), dict)
        )
        lines += ["", f"- **{dataset}**: products through the stages: {funnel}."]
        if recall:
            lines.append(f"  Modality redundancy on val: {recall}. {redundancy.get('note', '')}".rstrip())
    return lines


def _loading(card: CardInput) -> list[str]:
    return [
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'triplets = load_dataset("{card.repo_id}", "triplets")  # DatasetDict with train and val',
        f'products = load_dataset("{card.repo_id}", "products", split="val")',
        f'captions = load_dataset("{card.repo_id}", "captions", split="train")',
        "```",
    ]


def _licence(card: CardInput) -> list[str]:
    rows = [[d, licence] for d, licence in sorted(card.build.licences.items())]
    lines = [
        "## Licence",
        "",
        f"The annotations (captions, modification texts, triplets, splits) are released under `{card.licence}`. "
        "**The source images carry their own licences** (DeepFashion, Fashion200K and FashionGen are for "
        "non-commercial research under their own terms) and are not covered by this licence. "
        "Images are embedded only for catalogues whose owner publishes them; otherwise obtain them from the sources.",
        "",
    ]
    lines += _table(["dataset", "source licence recorded at ingest"], rows)
    return [
        *lines,
        "",
        "To ask for a product to be removed, open a discussion on this repository; the maintainers run "
        "`fashionmv remove`, which drops the product and every row naming it and publishes a new revision.",
    ]


def render_card(card: CardInput) -> str:
    body = [f"# {card.build.name}: multi-view composed image retrieval triplets", ""]
    body += [
        "Product-level, multi-view composed image retrieval data in the style of FashionMV: each triplet pairs a "
        "source product (all its views) and a modification text with a target product.",
        "",
    ]
    for section in (_contents, _provenance, _statistics, _loading, _licence):
        body += [*section(card), ""]
    # The body is a template variable, not template text: braces in it are never read as Jinja.
    return str(DatasetCard.from_template(front_matter(card), template_str=CARD_TEMPLATE, body="\n".join(body)))
