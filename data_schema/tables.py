"""Explicit Arrow schemas of every table the pipeline writes.

Image bytes live only in the `images` table written at ingest; every later table refers to a product by
`(dataset, product_id)` and to a view by `view_index`. Each schema carries `SCHEMA_VERSION` in its metadata, and
the images schema also carries the Hugging Face `datasets` feature description so `load_dataset` decodes the
`image` column as an `Image`.
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"fashionmv.schema_version"
TABLE_NAME_KEY = b"fashionmv.table"

# The Hugging Face `Image` feature is stored as this struct.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

_PRODUCT_KEY = [
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("product_id", pa.string(), nullable=False),
]


def _schema(name: str, fields: list[pa.Field], hf_features: dict | None = None) -> pa.Schema:
    metadata = {SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(), TABLE_NAME_KEY: name.encode()}
    if hf_features is not None:
        metadata[b"huggingface"] = json.dumps({"info": {"features": hf_features}}).encode()
    return pa.schema(fields, metadata=metadata)


PRODUCTS = _schema(
    "products",
    [
        *_PRODUCT_KEY,
        pa.field("source_kind", pa.string(), nullable=False),
        # Products sharing a group key must land in one split (e.g. colour variants of one DeepFashion item).
        pa.field("group_key", pa.string(), nullable=False),
        pa.field("split", pa.string()),  # set only where the source has an official split
        pa.field("category", pa.string()),
        pa.field("n_views", pa.int16(), nullable=False),
        pa.field("licence", pa.string()),
        pa.field("source_uri", pa.string()),
    ],
)

IMAGES = _schema(
    "images",
    [
        *_PRODUCT_KEY,
        pa.field("view_index", pa.int16(), nullable=False),  # position in plain string sort of file names
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("view", pa.string()),  # front / back / side / detail / full / additional, where the source says
        pa.field("image", IMAGE_STRUCT, nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("phash", pa.uint64(), nullable=False),
        pa.field("dhash", pa.uint64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("licence", pa.string()),
        pa.field("source_stamp", pa.string()),  # the file's change stamp when read: unchanged files are not read again
    ],
    hf_features={
        "dataset": {"dtype": "string", "_type": "Value"},
        "product_id": {"dtype": "string", "_type": "Value"},
        "view_index": {"dtype": "int16", "_type": "Value"},
        "file_name": {"dtype": "string", "_type": "Value"},
        "view": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "format": {"dtype": "string", "_type": "Value"},
        "width": {"dtype": "int32", "_type": "Value"},
        "height": {"dtype": "int32", "_type": "Value"},
        "phash": {"dtype": "uint64", "_type": "Value"},
        "dhash": {"dtype": "uint64", "_type": "Value"},
        "sha256": {"dtype": "string", "_type": "Value"},
        "source_uri": {"dtype": "string", "_type": "Value"},
        "licence": {"dtype": "string", "_type": "Value"},
        "source_stamp": {"dtype": "string", "_type": "Value"},
    },
)

# The products that survive dedupe. A cluster is a product and its re-listed copies (rejected by dedupe); its id is
# the kept product's id, so later stages can keep a cluster in one split and never pair a product with a copy.
DEDUP_PRODUCTS = _schema(
    "dedup_products",
    [
        *_PRODUCT_KEY,
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("cluster_size", pa.int32(), nullable=False),  # 1 + the re-listed copies removed
        pa.field("group_key", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("category", pa.string()),
        pa.field("n_views", pa.int16(), nullable=False),  # 2-5 after the view rules
    ],
)

# The views each kept product keeps, in plain sorted file-name order: references into the ingest `images` table
# by (dataset, product_id, view_index), never bytes.
DEDUP_VIEWS = _schema(
    "dedup_views",
    [
        *_PRODUCT_KEY,
        pa.field("view_index", pa.int16(), nullable=False),  # the ingest view_index
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("view", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ],
)

# A view reference, used by every stage after ingest instead of image bytes.
VIEW_REF = pa.struct([("view_index", pa.int16()), ("view", pa.string())])

CAPTIONS = _schema(
    "captions",
    [
        *_PRODUCT_KEY,
        pa.field(
            "view_captions",
            pa.list_(
                pa.struct(
                    [
                        ("view_index", pa.int16()),
                        ("view_type", pa.string()),
                        ("wearer_left_on_image", pa.string()),  # "left" / "right" / "not_visible"
                        ("caption", pa.string()),
                    ]
                )
            ),
        ),
        pa.field("long_caption", pa.string()),
        pa.field("short_caption", pa.string()),
        pa.field("category", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("is_clothing", pa.bool_()),
        pa.field("request_sha256", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("model", pa.string()),
        pa.field("tokens_in", pa.int32()),
        pa.field("tokens_out", pa.int32()),
    ],
)

VERDICTS = _schema(
    "verdicts",
    [
        *_PRODUCT_KEY,
        pa.field("verdict", pa.string(), nullable=False),  # "pass" / "remove"
        pa.field("reason", pa.string()),
        pa.field("wrong_claims", pa.list_(pa.string())),
        pa.field("request_sha256", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("model", pa.string()),
        pa.field("tokens_in", pa.int32()),
        pa.field("tokens_out", pa.int32()),
    ],
)

TRIPLETS = _schema(
    "triplets",
    [
        pa.field("triplet_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("target_id", pa.string(), nullable=False),
        pa.field("modification_text_short", pa.string(), nullable=False),
        pa.field("modification_text_long", pa.string(), nullable=False),
        pa.field("views_involved", pa.list_(pa.string()), nullable=False),
        pa.field("candidate_ids", pa.list_(pa.string())),  # all candidates shown to the LMM, in shown order
        pa.field("request_sha256", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("model", pa.string()),
        # every short text of the triplet (triplets.paraphrases of them, distinct); the first is the column above
        pa.field("modification_texts_short", pa.list_(pa.string())),
        # Filled by the discriminability stage (null in select's table): the text it showed (index into the list
        # above; null when the check is off) and the candidate it picked.
        pa.field("check_text_index", pa.int16()),
        pa.field("check_picked_id", pa.string()),
        # whether the short text alone (against the shown candidates' short captions) or the source image alone
        # (against their images) already ranks the target first among the shown candidates, by the build's embeddings
        pa.field("text_alone_ranks_target_first", pa.bool_()),
        pa.field("image_alone_ranks_target_first", pa.bool_()),
    ],
)

HARD_NEGATIVES = _schema(
    "hard_negatives",
    [
        pa.field("triplet_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("negative_id", pa.string(), nullable=False),
        pa.field("rank_shown", pa.int16()),
    ],
)

REJECTS = _schema(
    "rejects",
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),  # the raw id as found, even when it is invalid
        pa.field("level", pa.string(), nullable=False),  # data_schema.reasons.RejectLevel
        pa.field("view_index", pa.int16()),
        pa.field("file_name", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # data_schema.reasons.RejectReason
        pa.field("detail", pa.string(), nullable=False),
        pa.field("related_id", pa.string()),  # e.g. the product or view this one duplicates
        pa.field("source_uri", pa.string()),
    ],
)

STATS = _schema(
    "stats",
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("counter", pa.string(), nullable=False),
        pa.field("value", pa.int64(), nullable=False),
    ],
)

# Stage 3. Every product that reached Stage 3, with its split: the galleries of both splits.
SPLIT_PRODUCTS = _schema(
    "split_products",
    [
        *_PRODUCT_KEY,
        pa.field("split", pa.string(), nullable=False),
        pa.field("group_key", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("gender", pa.string()),
    ],
)

# Each source's candidates, in the order the listwise LMM call shows them.
CANDIDATES = _schema(
    "candidates",
    [
        *_PRODUCT_KEY,
        pa.field("split", pa.string(), nullable=False),
        pa.field("candidate_ids", pa.list_(pa.string()), nullable=False),
        pa.field("union_ids", pa.list_(pa.string()), nullable=False),  # the union of the three paths, before sampling
        pa.field("union_size", pa.int32(), nullable=False),
        pa.field("source_digest", pa.string()),  # the source as mined: its caption request and captions
        pa.field("carried_over", pa.bool_()),  # kept from an earlier run: Stage 3 keeps its earlier answer
    ],
)

# Per-product embeddings (L2-normalised), cached so that mining never computes them twice.
EMBEDDINGS = _schema(
    "embeddings",
    [
        *_PRODUCT_KEY,
        pa.field("image", pa.list_(pa.float32()), nullable=False),
        pa.field("long_caption", pa.list_(pa.float32()), nullable=False),
        pa.field("short_caption", pa.list_(pa.float32()), nullable=False),
    ],
)

ALL = {
    s.metadata[TABLE_NAME_KEY].decode(): s
    for s in (
        PRODUCTS,
        IMAGES,
        DEDUP_PRODUCTS,
        DEDUP_VIEWS,
        CAPTIONS,
        VERDICTS,
        SPLIT_PRODUCTS,
        CANDIDATES,
        EMBEDDINGS,
        TRIPLETS,
        HARD_NEGATIVES,
        REJECTS,
        STATS,
    )
}
