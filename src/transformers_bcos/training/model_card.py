"""Model cards rendered from the templates in the repository's ``model_cards/`` folder.

A template is Markdown with ``{{name}}`` placeholders; `render_model_card` fills them and refuses
to leave one unfilled or to accept a value the template does not use, so a template and its
caller cannot drift apart silently.
"""

import os
import re
from typing import Optional

# <repository>/model_cards/, beside src/ (this file is src/transformers_bcos/training/model_card.py).
MODEL_CARDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir, "model_cards")
IMAGE_CLASSIFICATION_TEMPLATE = os.path.normpath(os.path.join(MODEL_CARDS_DIR, "image-classification.md"))

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def template_placeholders(template: str) -> set:
    return set(PLACEHOLDER.findall(template))


def render_model_card(values: dict, template_path: Optional[str] = None) -> str:
    """Fill the ``{{name}}`` placeholders of the template at ``template_path`` with ``values``.

    Raises:
        FileNotFoundError: the template is missing (pass ``template_path``).
        KeyError: a placeholder has no value, or a value has no placeholder.
    """
    template_path = template_path or IMAGE_CLASSIFICATION_TEMPLATE
    if not os.path.isfile(template_path):
        raise FileNotFoundError(
            f"Model-card template {template_path} not found: pass its path (e.g. --model_card_template)."
        )
    with open(template_path, encoding="utf-8") as f:
        template = f.read()
    names = template_placeholders(template)
    missing = sorted(names - set(values))
    unused = sorted(set(values) - names)
    if missing or unused:
        raise KeyError(f"Model card {template_path}: placeholders without values {missing}, values without placeholders {unused}.")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


def markdown_rows(rows) -> str:
    """``[(key, value), ...]`` -> the body rows of a two-column Markdown table."""
    return "\n".join(f"| {key} | {value} |" for key, value in rows)
