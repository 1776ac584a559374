"""Multi-concept prompt sets for the concept-dominance analysis (``configs/prompt_sets/``) and
the text tokens that belong to each concept of a prompt.

A prompt set is a YAML file::

    name: artbench10_style_pairs
    template: "a {} painting and a {} painting"   # one {} per concept, in order
    pairs: all        # every ordered pair of the run's classes; or a list: [[baroque, ukiyo_e], ...]
    prompts:          # optional free-text prompts, each naming the concepts it holds
      - {text: "a baroque baroque painting and a ukiyo e painting", concepts: [baroque, ukiyo_e]}

Concept names are the run's class names (``_`` is written as a space in the text) or any other
words; only class names get a training frequency. Every prompt of a set has the same number of
concepts (at least two).

A concept's tokens are the positions of its words' tokens in the prompt, found by matching the
token ids of the words alone (CLIP's BPE tokenises each word on its own, so a word's tokens do
not depend on its neighbours). Every occurrence counts, so a concept written twice has twice the
tokens. Where one concept's words contain another's (``post impressionism`` and
``impressionism``) the longer concept claims its positions first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lt_diffusion.runtime import CONFIG_DIR

PROMPT_SET_DIR = Path(CONFIG_DIR) / "prompt_sets"


@dataclass(frozen=True)
class ConceptPrompt:
    """One prompt and the concepts it names, in the order they appear."""

    text: str
    concepts: tuple[str, ...]


def words(concept: str) -> str:
    """How a concept is written in a prompt (class names use ``_`` for spaces)."""
    return concept.replace("_", " ")


def available_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPT_SET_DIR.glob("*.yaml"))


def prompt_set_path(ref: str) -> Path:
    """The file of a prompt set: a name under ``configs/prompt_sets/`` or a path to a YAML file;
    a clear error when there is none."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = PROMPT_SET_DIR / f"{ref}.yaml"
    if named.is_file():
        return named
    raise FileNotFoundError(
        f"analysis.prompt_set={ref!r} is neither a file nor a prompt set under {PROMPT_SET_DIR} "
        f"({', '.join(available_prompt_sets()) or 'none'}): name one, or give the path of a YAML "
        "file with template / pairs / prompts (docs/analyses.md)"
    )


def read_prompt_set(ref: str) -> dict[str, Any]:
    """The prompt-set file as a dict, its keys checked (the class names come later)."""
    path = prompt_set_path(ref)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a prompt set is a mapping (template, pairs, prompts)")
    unknown = sorted(set(raw) - {"name", "template", "pairs", "prompts"})
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {unknown}; a prompt set has template, pairs, prompts"
        )
    if raw.get("pairs") is not None and "{}" not in str(raw.get("template", "")):
        raise ValueError(f"{path}: pairs need a template with one '{{}}' per concept")
    for i, p in enumerate(raw.get("prompts") or []):
        if not isinstance(p, dict) or not p.get("text") or len(p.get("concepts") or []) < 2:
            raise ValueError(
                f"{path}: prompts[{i}] must be {{text: ..., concepts: [at least two names]}}"
            )
    raw["path"] = str(path)
    return raw


def build_prompts(raw: dict[str, Any], class_names: Sequence[str]) -> list[ConceptPrompt]:
    """The prompts of a prompt set for a run with ``class_names`` (label order)."""
    where = raw.get("path", "prompt set")
    out: list[ConceptPrompt] = []
    pairs = raw.get("pairs")
    if pairs is not None:
        template = str(raw["template"])
        if pairs == "all":
            pairs = list(itertools.permutations(class_names, 2))
        unknown = sorted({str(c) for pair in pairs for c in pair} - set(class_names))
        if unknown:
            raise ValueError(
                f"{where}: pairs name {unknown}, which are not classes of this run "
                f"({', '.join(class_names)}): use the run's class names, or free-text prompts"
            )
        n = template.count("{}")
        for pair in pairs:
            if len(pair) != n:
                raise ValueError(f"{where}: template {template!r} takes {n} concepts, got {pair}")
            out.append(ConceptPrompt(template.format(*map(words, pair)), tuple(map(str, pair))))
    for p in raw.get("prompts") or []:
        out.append(ConceptPrompt(str(p["text"]), tuple(str(c) for c in p["concepts"])))
    if not out:
        raise ValueError(f"{where} holds no prompts: give pairs (or `pairs: all`) or prompts")
    sizes = {len(p.concepts) for p in out}
    if len(sizes) != 1:
        raise ValueError(
            f"{where}: every prompt must name the same number of concepts, got {sizes}"
        )
    return out


def concept_positions(
    prompt: ConceptPrompt, ids: Sequence[int], word_ids: Callable[[str], list[int]]
) -> list[list[int]]:
    """Per concept of ``prompt``, the positions of its tokens in ``ids`` (the prompt's token
    ids as the text encoder sees them); ``word_ids(text)`` gives the ids of text alone."""
    ids = [int(i) for i in ids]
    claimed: set[int] = set()
    found: dict[int, list[int]] = {}
    spans = {k: word_ids(words(c)) for k, c in enumerate(prompt.concepts)}
    for k in sorted(spans, key=lambda k: -len(spans[k])):  # longer concepts claim first
        span = spans[k]
        positions: list[int] = []
        start = 0
        while start + len(span) <= len(ids):
            window = range(start, start + len(span))
            if ids[start : start + len(span)] == span and not claimed & set(window):
                positions.extend(window)
                start += len(span)
            else:
                start += 1
        if not positions:
            raise ValueError(
                f"concept {prompt.concepts[k]!r} has no tokens in the prompt {prompt.text!r} as "
                f"the text encoder sees it ({len(ids)} tokens): is it written in the text, or cut "
                "off by the tokenizer's length?"
            )
        claimed.update(positions)
        found[k] = positions
    return [found[k] for k in range(len(prompt.concepts))]
