"""SAA+ per-category prompt tables: the authors' data (caoyunkang/Segment-Any-Anomaly,
``SAA/prompts/*.py``), kept as data and overridable.

Each category has
  * manual text prompts: ``(caption, filtered_phrase)`` pairs; a detected box whose phrase
    contains ``filtered_phrase`` (the object itself) is dropped;
  * a property sentence, from which the authors read five values by word position
    (``split(' ')``: [7] object prompt, [5] object count, [12] top-K masks,
    [19] maximum defect area as a fraction of the object box area). :func:`parse_property_prompt`
    reproduces that parsing exactly, including its quirks (the object prompt keeps a trailing
    comma, e.g. ``"candle,"``).

The general prompts ``"defect on {}"``, ``"damage on {}"``, ``"flaw on {}"`` (filtered phrase: the
category name) come first, then the manual ones, as in the authors' evaluation script.

Quirk kept out: the authors' MTD table files its property sentence under the key ``'ksdd2'``;
here it is stored under ``'mtd'``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

__all__ = ["CategoryConfig", "GENERAL_PROMPTS", "MANUAL_PROMPTS", "PROPERTY_PROMPTS", "category_config",
           "datasets", "categories", "parse_property_prompt", "general_prompts"]

GENERAL_PROMPTS: Tuple[str, ...] = ("defect on {}", "damage on {}", "flaw on {}")

_MVTEC_MANUAL = {
    "carpet": [("black hole", "carpet"), ("thread", "carpet"), ("defect.", "carpet")],
    "grid": [("irregular pattern", "grid"), ("defect.", "grid")],
    "leather": [("defect.", "leather")],
    "tile": [("defect.", "tile")],
    "wood": [("defect.", "wood")],
    "bottle": [("broken part. contamination. white broken.", "bottle")],
    "cable": [("crack. flawed golden wire. black hole.", "cable")],
    "capsule": [("white crack. hole.", "capsule")],
    "hazelnut": [("white print. crack. thread.", "hazelnut")],
    "metal_nut": [("blue defect. black defect. red defect. scratch.", "nut")],
    "pill": [("red defect. yellow defect. blue defect. crack. scratch.", "pill")],
    "screw": [("defect.", "screw")],
    "toothbrush": [("defect.", "toothbrush")],
    "transistor": [("defect.", "transistor")],
    "zipper": [("crack. broken leather.", "zipper")],
}


def _mvtec_property(name: str, area: str) -> str:
    return (f"the image of {name} have 1 dissimilar {name}, with a maximum of 5 anomaly. "
            f"The anomaly would not exceed {area} object area. ")


_MVTEC_PROPERTY = {name: _mvtec_property(name, area) for name, area in (
    ("carpet", "0.9"), ("grid", "0.9"), ("leather", "0.9"), ("tile", "0.9"), ("wood", "0.9"),
    ("bottle", "0.3"), ("cable", "0.9"), ("capsule", "0.6"), ("hazelnut", "0.9"), ("metal_nut", "1."),
    ("pill", "1."), ("screw", "0.1"), ("toothbrush", "0.5"), ("transistor", "1."), ("zipper", "0.5"))}

_VISA_MANUAL = {
    "candle": [("color defect. hole. black defect. wick hole. spot. ", "candle")],
    "capsules": [("black melt. dark liquid.", "capsules"), ("bubble", "capsules")],
    "cashew": [("yellow defect. black defect. small holes. scratch. breakage. crack.", "cashew"),
               ("small spot.", "cashew")],
    "chewinggum": [("crack. yellow defect. color defect. black defect. thread.", "chewinggum")],
    "fryum": [("broken part. purple defect. black defect. red defect. color defect. color crack. break",
               "fryum")],
    "macaroni1": [("broken part. red defect. black defect. crack. hole. scratch. color crack.", "macaroni")],
    "macaroni2": [("broken part. red defect. black defect. crack. hole. scratch.", "macaroni"),
                  ("edge. spot. chip.", "macaroni")],
    "pcb1": [("bent wire on pcb", "pcb"), ("white scratch on pcb", "pcb"), ("white defect on pcb", "pcb"),
             ("white circle.", "pcb")],
    "pcb2": [("bent wire", "pcb"), ("pointed", "pcb"), ("wire", "pcb")],
    "pcb3": [("bent wire on pcb", "pcb"), ("scratch on pcb", "pcb"), ("defect on pcb", "pcb")],
    "pcb4": [("yellow paper on pcb", "pcb"), ("yellow defect on pcb", "pcb"), ("black defect on pcb", "pcb"),
             ("color defect on pcb", "pcb"), ("scratch on pcb", "pcb"), ("defect on pcb", "pcb")],
    "pipe_fryum": [("broken part. red defect. black defect. crack. hole. scratch.", "fryum")],
}

_VISA_PROPERTY = {
    "candle": "the image of candle have 4 similar candle, with a maximum of 1 anomaly. "
              "The anomaly would not exceed 0.3 object area. ",
    "capsules": "the image of capsule have 20 dissimilar capsule, with a maximum of 15 anomaly. "
                "The anomaly would not exceed 1. object area. ",
    "cashew": "the image of cashew have 1 dissimilar cashew, with a maximum of 17 anomaly. "
              "The anomaly would not exceed 0.05 object area. ",
    "chewinggum": "the image of chewinggum have 1 dissimilar chewinggum with a maximum of 50 anomaly. "
                  "The anomaly would not exceed 0.2 object area. ",
    "fryum": "the image of fryum have 1 dissimilar fryum, with a maximum of 5 anomaly. "
             "The anomaly would not exceed 1. object area. ",
    "macaroni1": "the image of macaroni1 have 4 similar macaroni, with a maximum of 5 anomaly. "
                 "The anomaly would not exceed 0.3 object area. ",
    "macaroni2": "the image of macaroni2 have 4 dissimilar macaroni, with a maximum of 50 anomaly. "
                 "The anomaly would not exceed 0.3 object area. ",
    "pcb1": "the image of pcb1 have 1 dissimilar printed_circuit_board, with a maximum of 1 anomaly. "
            "The anomaly would not exceed 0.3 object area. ",
    "pcb2": "the image of pcb2 have 1 dissimilar pcb, with a maximum of 9 anomaly. "
            "The anomaly would not exceed 0.3 object area. ",
    "pcb3": "the image of pcb3 have 1 dissimilar printed_circuit_board, with a maximum of 5 anomaly. "
            "The anomaly would not exceed 0.3 object area. ",
    "pcb4": "the image of pcb4 have 1 dissimilar pcb, with a maximum of 7 anomaly. "
            "The anomaly would not exceed 0.3 object area. ",
    "pipe_fryum": "the image of pipe_fryum have 1 dissimilar pipe_fryum, with a maximum of 19 anomaly. "
                  "The anomaly would not exceed 0.3 object area. ",
}

MANUAL_PROMPTS: Dict[str, Dict[str, List[Tuple[str, str]]]] = {
    "mvtec": _MVTEC_MANUAL,
    "visa": _VISA_MANUAL,
    "ksdd2": {"ksdd2": [("black hole.", "ksdd2"), ("defect.", "ksdd2")]},
    "mtd": {"mtd": [("black hole. blow hole. break. crack. fray. uneven.", "mtd"), ("defect.", "mtd")]},
}

PROPERTY_PROMPTS: Dict[str, Dict[str, str]] = {
    "mvtec": _MVTEC_PROPERTY,
    "visa": _VISA_PROPERTY,
    "ksdd2": {"ksdd2": "the image of ksdd2 have 1 dissimilar ksdd2, with a maximum of 5 anomaly. "
                       "The anomaly would not exceed 0.9 object area. "},
    "mtd": {"mtd": "the image of ksdd2 have 1 dissimilar mtd, with a maximum of 5 anomaly. "
                   "The anomaly would not exceed 0.9 object area. "},
}

# The authors' dataset names that share a table.
_ALIASES = {"visa_public": "visa", "visa_challenge": "visa"}


@dataclass(frozen=True)
class CategoryConfig:
    """Everything SAA+ needs to know about one category.

    Attributes:
        name: category name (used in the general prompts).
        text_prompts: ``(caption, filtered_phrase)`` pairs, general ones first.
        object_prompt: caption of the object detection pass.
        object_number: objects per image; 1 selects single-object saliency, more the
            multi-instance saliency; the object boxes are capped at ``1 / object_number`` of the image.
        k_mask: masks kept by the confidence prompt (top-K).
        defect_area_threshold: a defect box must be smaller than this fraction of the largest object box.
    """

    name: str
    text_prompts: Tuple[Tuple[str, str], ...]
    object_prompt: str
    object_number: int
    k_mask: int
    defect_area_threshold: float
    similar: str = field(default="dissimilar")

    @property
    def object_max_area(self) -> float:
        return 1.0 / self.object_number

    def with_overrides(self, **changes) -> "CategoryConfig":
        """A copy with some fields replaced (e.g. ``k_mask=3``)."""
        if "text_prompts" in changes:
            changes["text_prompts"] = tuple((str(c), str(f)) for c, f in changes["text_prompts"])
        return replace(self, **changes)


def parse_property_prompt(sentence: str) -> dict:
    """The authors' positional parsing of a property sentence (``Model.set_property_text_prompts``)."""
    words = sentence.split(" ")
    try:
        return {"object_prompt": words[7], "object_number": int(words[5]), "k_mask": int(words[12]),
                "defect_area_threshold": float(words[19]), "similar": words[6]}
    except (IndexError, ValueError) as exc:
        raise ValueError(f"SAA+ property prompt {sentence!r} does not follow the authors' template "
                         f"('the image of X have N similar|dissimilar OBJ, with a maximum of K anomaly. "
                         f"The anomaly would not exceed A object area.'): {exc}") from None


def general_prompts(category: str) -> List[Tuple[str, str]]:
    return [(g.format(category), category) for g in GENERAL_PROMPTS]


def _table_key(dataset: str) -> str:
    key = _ALIASES.get(dataset, dataset)
    if key not in MANUAL_PROMPTS:
        raise ValueError(f"fastad.models.SAAPlus: unknown dataset {dataset!r}; tables exist for "
                         f"{sorted(MANUAL_PROMPTS) + sorted(_ALIASES)}")
    return key


def datasets() -> List[str]:
    return sorted(MANUAL_PROMPTS)


def categories(dataset: str) -> List[str]:
    return sorted(MANUAL_PROMPTS[_table_key(dataset)])


def category_config(dataset: str, category: str, **overrides) -> CategoryConfig:
    """The authors' configuration of ``category`` in ``dataset`` (mvtec, visa, ksdd2, mtd),
    with any field overridden by keyword (see :class:`CategoryConfig`)."""
    key = _table_key(dataset)
    if category not in MANUAL_PROMPTS[key]:
        raise ValueError(f"fastad.models.SAAPlus: no category {category!r} in dataset {dataset!r}; "
                         f"known: {categories(key)}")
    parsed = parse_property_prompt(PROPERTY_PROMPTS[key][category])
    prompts = tuple(general_prompts(category)) + tuple(MANUAL_PROMPTS[key][category])
    cfg = CategoryConfig(name=category, text_prompts=prompts, **parsed)
    return cfg.with_overrides(**overrides) if overrides else cfg
