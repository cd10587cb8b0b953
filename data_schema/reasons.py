"""The one enum of reject reason codes. Every stage writes its rejects with one of these."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    # ingest: identity and location
    INVALID_PRODUCT_ID = "invalid_product_id"
    UNSAFE_PATH = "unsafe_path"
    # ingest: reading and decoding a view
    UNREADABLE_FILE = "unreadable_file"
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    FILE_TOO_LARGE = "file_too_large"
    # ingest: fetching over HTTP(S)
    HTTP_ERROR = "http_error"
    FETCH_TIMEOUT = "fetch_timeout"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    WRONG_CONTENT_TYPE = "wrong_content_type"
    BLOCKED_ADDRESS = "blocked_address"
    BAD_URL = "bad_url"
    # ingest: product level
    NO_READABLE_VIEWS = "no_readable_views"
    # dedupe and filters
    DUPLICATE_VIEW = "duplicate_view"
    DUPLICATE_PRODUCT = "duplicate_product"
    TOO_FEW_VIEWS = "too_few_views"
    VIEW_BEYOND_LIMIT = "view_beyond_limit"
    IMAGE_TOO_SMALL = "image_too_small"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
    NOT_CLOTHING_CATEGORY = "not_clothing_category"
    # LMM stages
    INVALID_LMM_ANSWER = "invalid_lmm_answer"
    NOT_CLOTHING = "not_clothing"
    REMOVED_BY_VERIFIER = "removed_by_verifier"
    NO_CANDIDATES = "no_candidates"
    NO_TARGET_SELECTED = "no_target_selected"
    TARGET_WITHDRAWN = "target_withdrawn"  # an incremental build: every target the source had left the build
    TEXT_NOT_DISCRIMINATIVE = "text_not_discriminative"  # the text led the check to another candidate than its target


class RejectLevel(StrEnum):
    """What a reject row removes: a whole product or one of its views."""

    PRODUCT = "product"
    VIEW = "view"
