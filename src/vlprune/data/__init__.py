"""Data: the field's annotation formats, image loading, datasets, the tokenizer and the built-in scenes data."""

from .formats import FORMATS, load_annotations, load_answer_list, read_json, validate
from .images import BadImageError, ImageLoader
from .tokenizer import TextTokenizer

__all__ = ["FORMATS", "load_annotations", "load_answer_list", "read_json", "validate", "BadImageError",
           "ImageLoader", "TextTokenizer"]
