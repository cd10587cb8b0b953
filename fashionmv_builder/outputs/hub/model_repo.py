"""`fashionmv publish-model`: a trained ProCIR checkpoint to a Hub model repo, with a model card, through the same
resumable uploader as datasets (upload.py).

What goes up: the files transformers loads (config, weights, tokenizer, processor, chat template), the training
summary, every `eval_results.json` given, and the card. The resume checkpoint (optimiser state) and the step log stay
local. Nothing in the repo is deleted: a model repo may hold files we did not put there.

The card is a pure function of its inputs (no clock), so a rerun writes the same bytes and uploads nothing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from fashionmv_builder.core.config import ConfigError
from fashionmv_builder.outputs.hub.upload import CARD, RetryPolicy, UploadResult, upload_folder
from fashionmv_builder.procir.recall import RESULTS_FILE
from fashionmv_builder.procir.train import SUMMARY_FILE

REPO_TYPE = "model"
# What transformers reads from a model folder (plus sharded weights and their index).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
)
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


@dataclass
class ModelPublishOptions:
    repo_id: str
    base_model: str | None = None  # None: what `fashionmv train` recorded
    data_repo: str | None = None  # the Hub dataset repo the model was trained on
    data_revision: str | None = None
    results: list[Path] = field(default_factory=list)  # eval_results.json files (default: the model folder's)
    private: bool = False
    revision: str = "main"
    licence: str = "apache-2.0"
    endpoint: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def model_files(model_dir: Path) -> list[Path]:
    names = set(MODEL_FILES)
    files = [p for p in model_dir.iterdir() if p.is_file() and (p.name in names or p.suffix == ".safetensors")]
    if not any(p.suffix == ".safetensors" for p in files) or not (model_dir / "config.json").exists():
        raise ConfigError(f"{model_dir} is not a model folder (no config.json or *.safetensors)")
    return sorted(files)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _results_section(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Results (FashionMV protocol)", ""]
    if not results:
        return [*lines, "No `fashionmv evaluate` results were published with this model."]
    lines += [
        "R@K in percent from `fashionmv evaluate`, FashionMV's published protocol: per-dataset product galleries "
        "(all val sources and targets with images, the source not excluded), two-turn queries, source reuse. "
        "`dtype` is the precision the whole model ran in (the authors' script runs bf16).",
        "",
    ]
    rows = []
    for name, values in results.items():
        scores = {k: v for k, v in values.items() if "_R@" in k}
        for key in sorted(scores):
            rows.append([name, values.get("dtype", "not recorded"), key, scores[key]])
    return lines + _table(["results file", "dtype", "metric", "value"], rows)


def render_model_card(
    repo_id: str, summary: dict[str, Any], options: ModelPublishOptions, results: dict[str, dict[str, Any]]
) -> str:
    base = options.base_model or summary.get("base_model") or "unknown"
    config = summary.get("config", {})
    data = {"repo": options.data_repo, "revision": options.data_revision or "main"} if options.data_repo else None
    card_data = ModelCardData(
        license=options.licence,
        library_name="transformers",
        pipeline_tag="feature-extraction",
        base_model=base if base != "unknown" and not Path(base).exists() else None,
        datasets=[options.data_repo] if options.data_repo else None,
        tags=["composed-image-retrieval", "fashion", "multi-view", "procir", "fashionmv"],
    )
    body = [
        f"# {repo_id.split('/')[-1]}: a ProCIR composed image retrieval model",
        "",
        "A Qwen3.5 embedding model trained with fashionmv-builder's ProCIR trainer (FashionMV, arXiv 2604.10297): "
        "the embedding is the last hidden state at the `<emb_all>` token, for a product's views (document) or for "
        "the views followed by a modification text (two-turn query).",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`",
        (
            f"- Training data: [`{data['repo']}`](https://huggingface.co/datasets/{data['repo']}) "
            f"at revision `{data['revision']}`"
            if data
            else f"- Training data: {summary.get('data', 'not recorded')}"
        ),
        f"- Variant: `{summary.get('variant', 'unknown')}`, {summary.get('triplets', '?')} training triplets",
    ]
    negatives = summary.get("hard_negatives")
    if negatives:
        body.append(
            f"- Hard negatives: {negatives.get('per_triplet')} per triplet "
            f"({negatives.get('triplets_with_some')} triplets had some)"
        )
    body += ["", "Configuration (`train_summary.json` holds it, with the last step's losses):", ""]
    body += _table(["option", "value"], [[f"`{k}`", f"`{v}`"] for k, v in sorted(config.items())])
    body += ["", *_results_section(results), ""]
    body += [
        "## Use",
        "",
        "An ordinary Qwen3.5 checkpoint: `AutoProcessor.from_pretrained` (Qwen3VLProcessor; its video processor "
        "needs torchvision) and `Qwen3_5ForConditionalGeneration.from_pretrained(..., dtype=torch.bfloat16)` load it, "
        "as FashionMV's `evaluate.py` does. Or with fashionmv-builder:",
        "",
        "```bash",
        f"fashionmv evaluate --model {repo_id} --data-dir FashionMV/data --image-root FashionMV/images --dtype bf16",
        "```",
    ]
    return str(ModelCard.from_template(card_data, template_str=CARD_TEMPLATE, body="\n".join(body)))


def publish_model(
    model_dir: Path, options: ModelPublishOptions, dry_run: bool = False
) -> tuple[Path, UploadResult | None]:
    """Stage the upload in a temporary folder (links to the model's files, the card) and upload it; with
    `dry_run`, keep the staged folder in `model_dir/.publish` and upload nothing."""
    if options.repo_id.count("/") != 1:
        raise ConfigError(f"--repo-id must be ORG/NAME, got {options.repo_id!r}")
    files = model_files(model_dir)
    summary = _read_json(model_dir / SUMMARY_FILE)
    result_paths = options.results or ([model_dir / RESULTS_FILE] if (model_dir / RESULTS_FILE).exists() else [])
    results = {}
    for path in result_paths:
        if not path.exists():
            raise ConfigError(f"--results {path} does not exist")
        results[f"results/{path.parent.name or 'eval'}/{RESULTS_FILE}"] = _read_json(path)
    card = render_model_card(options.repo_id, summary, options, results)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".publish-") as tmp:
        stage = Path(tmp) if not dry_run else model_dir / ".publish"
        stage.mkdir(exist_ok=True)
        for path in files + ([model_dir / SUMMARY_FILE] if summary else []):
            (stage / path.name).unlink(missing_ok=True)
            (stage / path.name).symlink_to(path.resolve())
        for name, values in results.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_text(json.dumps(values, indent=2) + "\n")
        (stage / CARD).write_text(card)
        if dry_run:
            return stage, None
        api = HfApi(endpoint=options.endpoint)  # token: HF_TOKEN or the stored login, read by the client itself
        result = upload_folder(
            api,
            stage,
            options.repo_id,
            revision=options.revision,
            private=options.private,
            message="Publish ProCIR model",
            policy=options.retry,
            repo_type=REPO_TYPE,
            delete_under=None,
        )
        return Path(options.repo_id), result
